"""What the split does with a sample's image: pass it through, convert it to RGB JPEG, or reject it.

The split's own question is cheaper than "does this decode?": an 8-bit
3-component JPEG with a sane frame header and its end-of-image marker is
passed through byte for byte (`validate: header`); anything else is decoded
by PIL and converted, or rejected with a reason. `plain_jpeg_verdicts` gives
the same verdict for every JPEG of a shard at once, leaving to `clean_image`
only the images it cannot settle from headers.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from pipelines.shardio.jpeg import ends_with_eoi, jpeg_frame, jpeg_frames
from pipelines.shardio.sample_table import PASS_THROUGH
from pipelines.shardio.shards import Sample, jpeg_bytes

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_PIXELS = 8192 * 8192
PASS, HUGE, UNSETTLED = 0, 1, 2


def clean_image(files: dict[str, bytes], validate: str = "header") -> tuple[bytes | None, str | None]:
    """The sample's image as RGB JPEG bytes, or (None, reason) when unusable.

    An image that needs no change is returned as the very object given
    (bytes or a memoryview), which is how the split knows it may pass the
    sample through as it lies in the input tar.

    `header`: an RGB JPEG is checked by its header and its end-of-image
    marker (catches truncation) and passed through byte for byte; `decode`
    also decodes it fully. Any other format or mode is decoded and converted.
    """
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        dotted = any(e.rpartition(".")[2] in IMAGE_EXTS for e in files if "." in e)
        return None, "key_contains_dot" if dotted else "missing_image"
    raw = files[ext]
    if not raw:
        return None, "empty_image"
    if validate == "header" and ext in ("jpg", "jpeg"):
        frame = jpeg_frame(raw)
        if frame is not None and frame[0] == 3 and frame[1] == 8 and frame[2] and frame[3]:
            # An 8-bit 3-component JPEG (PIL opens it as RGB): checked by its frame
            # header and end-of-image marker, passed through byte for byte.
            if frame[2] * frame[3] > MAX_PIXELS:
                return None, "huge_image"
            if ends_with_eoi(raw):
                return raw, None
            # No end marker at the very end: truncated, or bytes after it that decoders skip
            # (a camera's trailer): decoded below, and passed through if it decodes.
    try:
        with Image.open(io.BytesIO(raw)) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                return None, "huge_image"
            if image.format == "JPEG" and image.mode == "RGB":
                if validate == "decode" or not ends_with_eoi(raw):
                    image.load()  # raises on a truncated image (PIL's LOAD_TRUNCATED_IMAGES is off)
                return raw, None
            image.load()
            if image.mode.startswith("I"):  # 16/32-bit integer greyscale
                image = Image.fromarray((np.asarray(image, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
            return jpeg_bytes(image.convert("RGB")), None
    except Image.DecompressionBombError:  # over PIL's own pixel limit: it refuses to open it
        return None, "huge_image"
    except Exception:  # PIL raises many types for damaged data
        return None, "corrupt_image"


def sample_output(sample: Sample, validate: str) -> tuple[memoryview | dict | None, str | None]:
    """What the split writes for a sample: its tar bytes as they lie (a memoryview) when its jpg,
    txt and json need no change, else its files rebuilt around the cleaned image; or (None, reason)."""
    if sample.problem:
        return None, sample.problem
    if "txt" not in sample.files:  # never written without its caption, whatever the embed saw
        return None, "missing_caption"
    image, reason = clean_image(sample.files, validate)
    if reason is not None:
        return None, reason
    if sample.raw is not None and image is sample.files.get("jpg") and all(e in PASS_THROUGH for e in sample.files):
        return sample.raw, None
    files = {"jpg": image, "txt": sample.files["txt"]}
    if "json" in sample.files:
        files["json"] = sample.files["json"]
    return files, None


def sample_outputs(samples: list[Sample], validate: str, threads: int = 1) -> list[tuple]:
    """`sample_output` of each sample, in order, on up to `threads` threads.

    Pillow releases the GIL while it decodes and encodes, so the samples the
    headers cannot settle (every one under `validate: decode`; PNGs, CMYK and
    the like under `header`) are decoded on all the cores a split process has
    instead of one.
    """
    threads = min(threads, len(samples))
    if threads <= 1:
        return [sample_output(sample, validate) for sample in samples]
    # A few contiguous slices a thread, not a task a sample: a task costs a future and GIL
    # hand-offs, which ate most of the gain on 2 cores (bench/decode_threads.py: 1.06x, against
    # 1.65-2.0x in slices); several slices a thread, so one slow image does not hold up the rest.
    slices = min(len(samples), 4 * threads)
    bounds = [len(samples) * t // slices for t in range(slices + 1)]

    def decide(begin: int, end: int) -> list[tuple]:
        return [sample_output(sample, validate) for sample in samples[begin:end]]

    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        return [answer for part in pool.map(decide, bounds[:-1], bounds[1:]) for answer in part]


def plain_jpeg_verdicts(data: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """`clean_image`'s header-mode verdict on many JPEGs at once: PASS, HUGE, or UNSETTLED (ask it).

    PASS and HUGE only where `clean_image` would say the same from the frame
    header and the last two bytes; anything else (another mode, a missing or
    padded end marker, an odd segment layout) is left UNSETTLED.
    """
    frames = jpeg_frames(data, starts, sizes)
    rgb8 = frames.known & frames.found & (frames.components == 3) & (frames.bits == 8) \
        & (frames.width > 0) & (frames.height > 0)
    huge = rgb8 & (frames.width * frames.height > MAX_PIXELS)
    last = np.where(rgb8, starts + sizes - 1, 1)
    ends_ok = (data[last - 1] == 0xFF) & (data[last] == 0xD9)
    verdict = np.full(len(starts), UNSETTLED, np.int8)
    verdict[rgb8 & ~huge & ends_ok] = PASS
    verdict[huge] = HUGE
    return verdict
