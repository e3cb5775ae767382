"""Contact sheets: what each expert's data looks like, before GPU days are spent on it.

The cluster report's sizes and top terms say how the data was cut, not what it is. For each expert
the cluster stage draws a sheet of example images with their captions (`cluster/contact/
expert_000.png`), and lists example captions of every fine cluster (`cluster/examples.md`): the
first thing a person checks (is one expert all stock-photo boilerplate? does a fine cluster mix
two topics?).

Examples are the samples nearest their fine centre (cosine), taken from the first
`contact_shards` input shards only, so the sheets cost a couple of shard reads whatever the data's
size (at LAION scale one example per shard would mean fetching thousands of 400 MB shards). An
expert's images go round its fine clusters, best first, so a sheet shows its range rather than
one cluster. An image that is missing or does not decode is drawn as its caption alone: the
sheets are a view, and never fail the stage.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from clustering.embeddings import read_embeddings
from pipelines.core.layout import RunLayout, expert_name, shard_id
from pipelines.core.manifest import atomic_path, atomic_write_text
from pipelines.shardio.shards import ShardError, find_shards, iter_samples

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def nearest_per_fine(scores: np.ndarray, fine: np.ndarray, per_fine: int) -> dict[int, list[int]]:
    """For every fine cluster present, the rows of its `per_fine` highest `scores` (cosine to its own
    centre), best first (ties by row)."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    out: dict[int, list[int]] = {}
    for row in order.tolist():
        chosen = out.setdefault(int(fine[row]), [])
        if len(chosen) < per_fine:
            chosen.append(row)
    return out


def expert_examples(best: dict[int, list[int]], expert_of_row: np.ndarray, experts: int,
                    per_expert: int) -> list[list[int]]:
    """Each expert's example rows: round the fine clusters its rows fall in, taking each one's next
    best row in turn (clusters in order of their best row's position in `best`), up to `per_expert`."""
    out: list[list[int]] = [[] for _ in range(experts)]
    queues: list[list[list[int]]] = [[] for _ in range(experts)]
    for fine in sorted(best):
        by_expert: dict[int, list[int]] = {}
        for row in best[fine]:
            by_expert.setdefault(int(expert_of_row[row]), []).append(row)
        for expert, rows in by_expert.items():
            queues[expert].append(rows)
    for expert in range(experts):
        depth = 0
        while len(out[expert]) < per_expert and any(depth < len(q) for q in queues[expert]):
            for rows in queues[expert]:
                if depth < len(rows) and len(out[expert]) < per_expert:
                    out[expert].append(rows[depth])
            depth += 1
    return out


def read_images(shard, keys: set[str]) -> dict[str, bytes]:
    """The image bytes of `keys` in one input shard (what it has of them)."""
    found: dict[str, bytes] = {}
    try:
        for sample in iter_samples(shard):
            if sample.key in keys:
                raw = next((sample.files[e] for e in IMAGE_EXTS if e in sample.files), None)
                if raw is not None:
                    found[sample.key] = bytes(raw)
    except (ShardError, OSError):
        pass  # a view: what was read before the damage is drawn, the rest as captions
    return found


def thumbnail(raw: bytes | None, size: int) -> np.ndarray | None:
    if raw is None:
        return None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return np.asarray(image.convert("RGB").resize((size, size)))
    except Exception:  # not decodable: drawn as its caption alone
        return None


def draw_sheet(path: Path, title: str, items: list[tuple[np.ndarray | None, str]], columns: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(items) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.2, rows * 2.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (pixels, caption) in zip(axes.flat, items):
        if pixels is not None:
            ax.imshow(pixels)
        ax.set_title("\n".join(textwrap.wrap(caption, 28)[:3]), fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def write_contact_sheets(layout: RunLayout, files: list[Path], fine_per_file: list[np.ndarray],
                         expert_per_file: list[np.ndarray], fine_centroids: np.ndarray, experts: int,
                         train_shards: str, images: int, captions: int, shards: int) -> list[Path]:
    """The sheets and examples.md from the first `shards` embed files; the paths written."""
    if images <= 0 or not files:
        return []
    chosen = files[:max(1, shards)]
    table, vectors = read_embeddings(chosen)
    fine = np.concatenate(fine_per_file[:len(chosen)])
    expert = np.concatenate(expert_per_file[:len(chosen)])
    norms = np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
    scores = np.einsum("nd,nd->n", vectors, fine_centroids[fine]) / norms
    keys, shard_ids, texts = (table.column(c).to_pylist() for c in ("key", "shard", "caption"))
    best = nearest_per_fine(scores, fine, max(captions, images))
    per_expert = expert_examples(best, expert, experts, images)
    wanted: dict[str, set[str]] = {}
    for rows in per_expert:
        for row in rows:
            wanted.setdefault(shard_ids[row], set()).add(keys[row])
    try:
        paths = {shard_id(p): p for p in find_shards(train_shards)[0]} if wanted else {}
    except (OSError, ValueError):  # the inputs moved or cannot be listed: captions alone
        paths = {}
    pixels: dict[tuple[str, str], bytes] = {}
    for shard, shard_keys in wanted.items():
        if shard in paths:
            pixels.update({(shard, k): v for k, v in read_images(paths[shard], shard_keys).items()})
    written, drawn = [], []
    for e, rows in enumerate(per_expert):
        items = [(thumbnail(pixels.get((shard_ids[r], keys[r])), 96), texts[r]) for r in rows]
        draw_sheet(layout.contact_sheet(e), f"{expert_name(e)}: {len(rows)} examples nearest its fine centres",
                   items)
        written.append(layout.contact_sheet(e))
        drawn.append((len(rows), sum(pixels is not None for pixels, _ in items)))
    atomic_write_text(layout.cluster_examples, examples_markdown(best, fine, expert, texts, captions, drawn))
    return [*written, layout.cluster_examples]


def examples_markdown(best: dict[int, list[int]], fine: np.ndarray, expert: np.ndarray, texts: list[str],
                      captions: int, drawn: list[tuple[int, int]]) -> str:
    out = ["# Example captions per fine cluster", "",
           "The captions nearest each fine centre, among the samples of the first input shards; each expert's "
           "images are in `contact/`.", ""]
    for e, (examples, images) in enumerate(drawn):
        out += [f"## {expert_name(e)}", "", f"![{expert_name(e)}](contact/{expert_name(e)}.png)", "",
                f"{examples} examples on the sheet, {images} with their image.", ""]
        for f in sorted(best):
            rows = [r for r in best[f] if expert[r] == e][:captions]
            if rows:
                out.append(f"- fine {f} ({int((fine == f).sum())} here): " + " | ".join(texts[r] for r in rows))
        out.append("")
    return "\n".join(out)
