"""A task's images streamed from its shards: decoded on worker threads, encoded batch by batch.

Why: holding a task's images decoded in memory needs tens of GB for ImageNet's
50,000 validation images. Here a task keeps only where its images are (its
shards and how many samples each holds); each model's pass reads the shards
again in order, decodes and preprocesses on `workers` threads at most two
batches ahead of the model, and keeps only the (N, D) features, so memory
does not grow with the number of images.

Why threads, not DataLoader processes: evaluate runs inside Prefect flows and
on Dask workers, where forked loader processes died (seen here under
Prefect's test server: "DataLoader worker exited unexpectedly") or may not be
started at all (Dask's workers are daemon processes); PIL's decoders and
torchvision's resize release the GIL, so threads overlap decoding with the
model's forward pass.

Image features of a (model, task) pair are cached in the run folder under the
model's and the task's content fingerprints: rerunning evaluate, or
evaluating after one more expert is added, encodes only the pairs not seen.
"""

from __future__ import annotations

import io
import json
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.clip_features import inference, to_device
from pipelines.core.devices import is_cuda, usable_cores
from pipelines.core.manifest import atomic_path, atomic_write_json, combine, file_sha256
from pipelines.shardio.shards import iter_samples

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")  # clip_benchmark's order: a sample's first one is its image


class ImageError(ValueError):
    """An evaluation image that does not decode (the message names the shard, the key and the fix)."""


def decode(raw: bytes | None, shard: Path, key: str) -> Image.Image:
    if raw is None:
        raise ImageError(f"{shard}: sample {key!r} has no image (no {', '.join('.' + e for e in IMAGE_EXTS)} "
                         "member); add one or remove the sample")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB")
    except Exception as err:  # PIL raises many types for damaged data
        raise ImageError(f"{shard}: sample {key!r}: the image does not decode ({type(err).__name__}: "
                         f"{without_address(err)}); replace it or remove the sample") from None


def without_address(err: Exception) -> str:
    """An error's text without the memory addresses PIL puts in it (`<_io.BytesIO object at 0x7f..>`),
    so the same bad image gives the same message (and the same bytes in what records it) every run."""
    return re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", str(err))


def image_bytes(files: dict[str, bytes]) -> bytes | None:
    return next((files[e] for e in IMAGE_EXTS if e in files), None)


@dataclass(frozen=True)
class TaskImages:
    """Where a task's images are: its shards, in order, and how many samples each holds."""

    shards: tuple[Path, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def __len__(self) -> int:
        return self.total

    def decoded(self) -> Iterator[Image.Image]:
        """Every image in order, decoded one at a time (for tools and tests)."""
        for shard in self.shards:
            for sample in iter_samples(shard):
                yield decode(image_bytes(sample.files), shard, sample.key)


def task_samples(images: TaskImages) -> Iterator[tuple[Path, str, bytes]]:
    """(shard, key, image bytes) of every sample of a task, in order."""
    for shard in images.shards:
        for sample in iter_samples(shard):
            yield shard, sample.key, image_bytes(sample.files)


@dataclass
class Batch:
    """A batch of the task's images in order: the preprocessed ones stacked, and the ones that did
    not decode (`unreadable`: position in the batch, shard, key, why)."""

    pixels: object | None  # (B', 3, H, W) tensor of the readable images, None when none is
    size: int
    unreadable: list[tuple[int, Path, str, str]]
    keys: list[str]        # every sample's key, readable or not, in order

    @property
    def readable(self) -> np.ndarray:
        mask = np.ones(self.size, dtype=bool)
        mask[[i for i, *_ in self.unreadable]] = False
        return mask


def preprocessed_batches(samples: Iterator[tuple[Path, str, bytes | None]], preprocess, batch_size: int,
                         workers: int, skip_unreadable: bool = False) -> Iterator[Batch]:
    """(shard, key, image bytes) samples (`task_samples`, or `moda infer`'s shards) in order, in
    batches: the tar read here, each image decoded and preprocessed
    on one of `workers` threads (0: here), at most two batches ahead of the consumer. An image that
    does not decode raises ImageError, or with `skip_unreadable` is left out of the batch's pixels
    and listed in its `unreadable`."""
    import torch

    def prepare(item):
        shard, key, raw = item
        try:
            return preprocess(decode(raw, shard, key))
        except ImageError as err:
            if not skip_unreadable:
                raise
            return err

    def batch(prepared: list, chunk: list) -> Batch:
        bad = [(i, shard, key, str(out)) for i, (out, (shard, key, _)) in enumerate(zip(prepared, chunk))
               if isinstance(out, ImageError)]
        good = [out for out in prepared if not isinstance(out, ImageError)]
        return Batch(torch.stack(good) if good else None, len(chunk), bad, [key for _, key, _ in chunk])

    if workers <= 0:
        for chunk in _chunks(samples, batch_size):
            yield batch([prepare(item) for item in chunk], chunk)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="eval-decode") as pool:
        ahead: deque = deque()
        for chunk in _chunks(samples, batch_size):
            ahead.append(([pool.submit(prepare, item) for item in chunk], chunk))
            if len(ahead) > 2:
                futures, done = ahead.popleft()
                yield batch([f.result() for f in futures], done)
        while ahead:
            futures, done = ahead.popleft()
            yield batch([f.result() for f in futures], done)


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def decode_threads(workers: int, device: str) -> int:
    """`evaluate.workers`, with -1 resolved: 2 on a CPU (bench/decode_threads.py: more compete with the
    model's own threads), all usable cores but one on a GPU (the GPU waits on decoding)."""
    if workers >= 0:
        return workers
    return max(2, usable_cores() - 1) if is_cuda(device) else 2


def stream_image_features(clip, images: TaskImages, batch_size: int = 256, workers: int = 0,
                          unreadable: list[dict] | None = None) -> np.ndarray:
    """(N, D) unit image embeddings of every image of a task, in the task's order.

    An image that does not decode raises ImageError naming its shard and key; when `unreadable` is
    a list, its row is NaN instead and {"index", "shard", "key", "error"} is appended to the list
    (the caller leaves it out of every model's scores and reports it)."""
    import torch

    out: np.ndarray | None = None
    seen = 0
    bad: list[dict] = []
    with inference(clip.device):
        for batch in preprocessed_batches(task_samples(images), clip.preprocess, batch_size, workers,
                                          unreadable is not None):
            bad += [{"index": seen + i, "shard": str(shard), "key": key, "error": why}
                    for i, shard, key, why in batch.unreadable]
            if batch.pixels is not None:
                pixels = to_device(batch.pixels, clip.device)
                feats = torch.nn.functional.normalize(clip.model.encode_image(pixels).float(), dim=-1)
                if out is None:
                    out = np.zeros((images.total, feats.shape[1]), dtype=np.float32)
                if seen + batch.size <= images.total:
                    out[seen:seen + batch.size][batch.readable] = feats.cpu().numpy()
            seen += batch.size
    if seen != images.total:
        raise RuntimeError(f"read {seen} images where the task's shards held {images.total} when it was loaded; "
                           f"a shard changed during evaluation: {[str(p) for p in images.shards[:3]]}")
    if out is None:
        raise ImageError(f"none of the {images.total} images in {images.shards[0]}... decodes "
                         f"(first: {bad[0]['error'] if bad else '?'})")
    for entry in bad:
        out[entry["index"]] = np.nan
    if unreadable is not None:
        unreadable += bad
    return out


_model_hashes: dict[tuple, str] = {}


def model_fingerprint(model_dir: Path) -> str:
    """The content of a model folder (config and weights), hashed once per process per file state."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file())
    state = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if state not in _model_hashes:
        _model_hashes[state] = combine([(p.name, file_sha256(p)) for p in files])
    return _model_hashes[state]


def cached_image_features(clip, model_dir: Path, images: TaskImages, task_fingerprint: str, cache: Path | None,
                          batch_size: int, workers: int, unreadable: list[dict] | None = None) -> np.ndarray:
    """`stream_image_features`, read from `cache` when this (model, task) pair was encoded before (the
    unreadable images it found kept beside the features, `<hash>.unreadable.json`)."""
    if cache is None:
        return stream_image_features(clip, images, batch_size, workers, unreadable)
    path = cache / f"{combine(model_fingerprint(model_dir), task_fingerprint)[:32]}.npy"
    bad_path = path.with_suffix(".unreadable.json")
    if path.is_file():
        feats = np.load(path)
        bad = json.loads(bad_path.read_text(encoding="utf-8")) if bad_path.is_file() else []
        if bad and unreadable is None:
            raise ImageError(f"{bad[0]['shard']}: sample {bad[0]['key']!r}: {bad[0]['error']}")
        if unreadable is not None:
            unreadable += bad
        return feats
    found: list[dict] = []
    feats = stream_image_features(clip, images, batch_size, workers, found if unreadable is not None else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    if found:
        atomic_write_json(bad_path, found)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, feats)
    if unreadable is not None:
        unreadable += found
    return feats
