"""Real sentence embeddings for the cluster bench, made offline: docstring sentences of the
installed packages, embedded by the pipeline's default encoder.

    .venv/bin/python bench/sentence_embeddings.py --out /tmp/sentences.npy [--n 200000] [--max-words 20]
    .venv/bin/python bench/cluster_balance.py --embeddings /tmp/sentences.npy [--k 1024]

Why: the cluster bench's synthetic stand-in is a mixture of tight, far-apart
blobs, and how much inertia a balanced clustering costs depends on how the
data is spread. Web captions cannot be downloaded here, but real English
sentences can be found on any machine: the docstrings of the Python packages
in the environment (hundreds of thousands of them, about many topics, with a
natural skew). They are not captions, so the figures on them are a second
data point, not a replacement for a run on real caption embeddings.

Sentences: every paragraph of every module, class and function docstring,
split at sentence ends; 5 to 20 words (caption length), mostly words, distinct; files in
sorted order and a seeded sample of them, so the set depends only on the
installed packages (listed in the .json written beside the .npy). Embedded with `embed.model`'s default
(all-MiniLM-L6-v2 from its PyPI package), unit-normalised, float32.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import sysconfig
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_WORD = re.compile(r"[A-Za-z]{2,}")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def docstrings(path: Path) -> list[str]:
    """The docstrings of a Python file's module, classes and functions (none if it does not parse)."""
    try:
        tree = ast.parse(path.read_text("utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in ast.walk(tree) if isinstance(node, kinds) and (doc := ast.get_docstring(node))]


def sentences(doc: str, max_words: int = 20) -> list[str]:
    """Prose sentences of a docstring: 5 to `max_words` words (caption length), at least 70% of
    them words (not code or tables)."""
    out = []
    for paragraph in doc.split("\n\n"):
        for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
            words = sentence.split()
            if 5 <= len(words) <= max_words and len(_WORD.findall(sentence)) >= 0.7 * len(words):
                out.append(sentence)
    return out


def harvest(root: Path, limit: int, max_words: int = 20, seed: int = 0) -> list[str]:
    """`limit` distinct sentences drawn (seeded) from all the .py files under `root`, so every
    package contributes in proportion to its prose, not only the first ones in sorted order."""
    import random

    from tqdm import tqdm

    seen: dict[str, None] = {}
    for path in tqdm(sorted(root.rglob("*.py")), desc="docstrings", unit="file"):
        for doc in docstrings(path):
            for sentence in sentences(doc, max_words):
                seen.setdefault(sentence, None)
    found = list(seen)
    return random.Random(seed).sample(found, min(limit, len(found)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True, help="where to write the (N, 384) .npy")
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--max-words", type=int, default=20, help="longest sentence kept (captions are short)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--site-packages", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    args = parser.parse_args()

    from clustering.encoder import load_encoder
    from pipelines.core.config import EmbedConfig

    t0 = time.perf_counter()
    texts = harvest(args.site_packages, args.n, args.max_words)
    harvested = time.perf_counter() - t0
    model = EmbedConfig().model
    encoder = load_encoder(model)
    t1 = time.perf_counter()
    vectors = encoder.encode(texts, batch_size=args.batch_size, show_progress_bar=True,
                             convert_to_numpy=True, normalize_embeddings=True).astype(np.float32)
    encoded = time.perf_counter() - t1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, vectors)
    packages = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                      if d.metadata["Name"])
    args.out.with_suffix(".json").write_text(json.dumps({
        "sentences": len(texts), "model": model, "site_packages": str(args.site_packages),
        "harvest_seconds": round(harvested, 1), "encode_seconds": round(encoded, 1),
        "examples": texts[:: max(1, len(texts) // 20)][:20], "packages": packages}, indent=1))
    print(f"{len(texts)} sentences -> {args.out} ({vectors.shape[1]}-d) "
          f"in {harvested:.0f} s + {encoded:.0f} s encoding")


if __name__ == "__main__":
    main()
