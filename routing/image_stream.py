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
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.core.manifest import atomic_path, combine, file_sha256
from pipelines.shardio.shards import iter_samples

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")  # clip_benchmark's order: a sample's first one is its image


class ImageError(ValueError):
    """An evaluation image that does not decode (the message names the shard, the key and the fix)."""


def decode(raw: bytes, shard: Path, key: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB")
    except Exception as err:  # PIL raises many types for damaged data
        raise ImageError(f"{shard}: sample {key!r}: the image does not decode ({type(err).__name__}: {err}); "
                         "replace it or remove the sample") from None


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


def _samples(images: TaskImages) -> Iterator[tuple[Path, str, bytes]]:
    for shard in images.shards:
        for sample in iter_samples(shard):
            yield shard, sample.key, image_bytes(sample.files)


def preprocessed_batches(images: TaskImages, preprocess, batch_size: int, workers: int) -> Iterator:
    """(B, 3, H, W) tensors of the task's images in order: the tar read here, each image decoded and
    preprocessed on one of `workers` threads (0: here), at most two batches ahead of the consumer."""
    import torch

    def prepare(item):
        shard, key, raw = item
        return preprocess(decode(raw, shard, key))

    if workers <= 0:
        for chunk in _chunks(_samples(images), batch_size):
            yield torch.stack([prepare(item) for item in chunk])
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="eval-decode") as pool:
        ahead: deque = deque()
        for chunk in _chunks(_samples(images), batch_size):
            ahead.append([pool.submit(prepare, item) for item in chunk])
            if len(ahead) > 2:
                yield torch.stack([f.result() for f in ahead.popleft()])
        while ahead:
            yield torch.stack([f.result() for f in ahead.popleft()])


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def stream_image_features(clip, images: TaskImages, batch_size: int = 256, workers: int = 0) -> np.ndarray:
    """(N, D) unit image embeddings of every image of a task, in the task's order."""
    import torch

    out: np.ndarray | None = None
    seen = 0
    with torch.no_grad():
        for batch in preprocessed_batches(images, clip.preprocess, batch_size, workers):
            feats = torch.nn.functional.normalize(clip.model.encode_image(batch.to(clip.device)).float(), dim=-1)
            if out is None:
                out = np.zeros((images.total, feats.shape[1]), dtype=np.float32)
            if seen + len(feats) <= images.total:
                out[seen:seen + len(feats)] = feats.cpu().numpy()
            seen += len(feats)
    if seen != images.total:
        raise RuntimeError(f"read {seen} images where the task's shards held {images.total} when it was loaded; "
                           f"a shard changed during evaluation: {[str(p) for p in images.shards[:3]]}")
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
                          batch_size: int, workers: int) -> np.ndarray:
    """`stream_image_features`, read from `cache` when this (model, task) pair was encoded before."""
    if cache is None:
        return stream_image_features(clip, images, batch_size, workers)
    path = cache / f"{combine(model_fingerprint(model_dir), task_fingerprint)[:32]}.npy"
    if path.is_file():
        return np.load(path)
    feats = stream_image_features(clip, images, batch_size, workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, feats)
    return feats
