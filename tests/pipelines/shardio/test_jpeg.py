"""The JPEG header scan: one image at a time, or a shard's worth at once, with the same answers."""

import io
import random

import numpy as np
import pytest
from PIL import Image

from pipelines.shardio.jpeg import jpeg_frame, jpeg_frames


def jpeg(mode, size=(33, 17), **kw):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="JPEG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode,components", [("RGB", 3), ("L", 1), ("CMYK", 4)])
def test_the_jpeg_frame_scan_reads_components_and_size(mode, components):
    assert jpeg_frame(jpeg(mode)) == (components, 8, 33, 17)


def test_the_jpeg_frame_scan_reads_a_progressive_jpeg():
    assert jpeg_frame(jpeg("RGB", progressive=True)) == (3, 8, 33, 17)


def test_the_jpeg_frame_scan_rejects_what_is_not_a_jpeg():
    assert jpeg_frame(b"\x89PNG\r\n") is None
    assert jpeg_frame(jpeg("RGB")[:20]) is None


def frames_of(images):
    """`jpeg_frames` of images laid end to end in one buffer, as `jpeg_frame`'s tuples (or "unknown")."""
    data = np.frombuffer(b"".join(images) + bytes(16), np.uint8)
    sizes = np.array([len(i) for i in images])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    f = jpeg_frames(data, starts, sizes)
    return [("unknown" if not f.known[i] else
             (int(f.components[i]), int(f.bits[i]), int(f.width[i]), int(f.height[i])) if f.found[i] else None)
            for i in range(len(images))]


def variants():
    """Encoder output of several kinds, every truncation of one, and one-byte damage to the headers."""
    rng = random.Random(0)
    base = [jpeg("RGB"), jpeg("L"), jpeg("CMYK"), jpeg("RGB", progressive=True), jpeg("RGB", (1, 70000 // 7)),
            jpeg("RGB", quality=5), b"", b"\xff", b"\xff\xd8", b"\xff\xd8\xff\xff\xff\xc0", b"\x89PNG\r\n"]
    exif = Image.new("RGB", (9, 9)).getexif()
    exif[0x010F] = "camera"
    buf = io.BytesIO()
    Image.new("RGB", (9, 9)).save(buf, format="JPEG", exif=exif, icc_profile=b"p" * 300)
    base.append(buf.getvalue())
    cut = [base[0][:n] for n in range(0, 200)]
    flipped = []
    for _ in range(600):
        image = bytearray(rng.choice(base[:6] + base[-1:]))
        image[rng.randrange(min(len(image), 400))] = rng.randrange(256)
        flipped.append(bytes(image))
    return base + cut + flipped


def test_the_shard_wide_scan_agrees_with_the_single_image_scan():
    images = variants()
    vector = frames_of(images)
    assert [v for v in vector if v != "unknown"]  # it settles the common case itself
    for image, answer in zip(images, vector):
        if answer != "unknown":
            assert answer == jpeg_frame(image), image[:40]


def test_the_shard_wide_scan_leaves_long_segment_chains_to_the_single_image_scan():
    many_segments = b"\xff\xd8" + b"\xff\xfe\x00\x04ab" * 40 + jpeg("RGB")[2:]
    assert frames_of([many_segments]) == ["unknown"] and jpeg_frame(many_segments) == (3, 8, 33, 17)
