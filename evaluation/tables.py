"""One evaluation's tables and plots: results.md, routing_weights.png, accuracy.png.

Pure formatting of the results dict the evaluate stage computes; the only
I/O is writing the two PNGs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.core.layout import RunLayout
from pipelines.core.manifest import atomic_path


def headline(kind: str) -> str:
    """The metric a task's verdict (and the oracle's choice) is stated in."""
    return "top1" if kind == "classification" else "i2t_r1"


def markdown_report(results: dict) -> str:
    rows = results["rows"]
    out = [f"# MoDE evaluation ({results['routing']} routing)", ""]
    cls = [t for t, v in results["tasks"].items() if v["kind"] == "classification"]
    ret = [t for t, v in results["tasks"].items() if v["kind"] == "retrieval"]
    if cls:
        out += ["Zero-shot top-1 accuracy (%):", "",
                "| model | " + " | ".join(cls) + " | mean |", "|---|" + "---:|" * (len(cls) + 1)]
        for row in rows:
            vals = [results["tasks"][t][row]["top1"] * 100 for t in cls]
            out.append(f"| {row} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {np.mean(vals):.1f} |")
        out.append("")
    recalls = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    for t in ret:
        out += [f"Retrieval `{t}` (recall %):", "",
                "| model | " + " | ".join(m.replace("_r", " R@") for m in recalls) + " |",
                "|---|" + "---:|" * len(recalls)]
        for row in rows:
            r = results["tasks"][t][row]
            out.append(f"| {row} | " + " | ".join(f"{r[m] * 100:.1f}" if r.get(m) is not None else "-"
                                                   for m in recalls) + " |")
        out.append("")
    for t, rows_of in results.get("linear_probe", {}).items():
        shots = sorted({k for r in rows_of.values() for k in r if k.startswith("k")}, key=lambda k: int(k[1:]))
        out += [f"Linear probe `{t}` (top-1 %, logistic regression on frozen image features; C chosen on the "
                "train split):", "", "| model | full | " + " | ".join(f"{k[1:]}-shot" for k in shots) + " |",
                "|---|---:|" + "---:|" * len(shots)]
        for row, r in rows_of.items():
            out.append(f"| {row} | {r['full']['top1'] * 100:.1f} | "
                       + " | ".join(f"{r[k]['top1'] * 100:.1f}" if k in r else "-" for k in shots) + " |")
        out.append("")
    for t, entries in results.get("unreadable_images", {}).items():
        shown = ", ".join(f"`{Path(e['shard']).name}:{e['key']}`" for e in entries[:5])
        more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
        out += [f"Task `{t}`: {len(entries)} image(s) that do not decode left out of every model's scores "
                f"({shown}{more}; results.json lists each with its error).", ""]
    lam = results.get("lambda", {}).get("MoDE", {})
    out += [f"One trainer seed; the comparisons with intervals are in the report stage (report/report.md). "
            f"Routing lambda {results['lam']:g} ({lam.get('source', 'config')}).", ""]
    out += ["Routing weights (experts 0..n-1):", ""]
    for t, v in results["tasks"].items():
        chance = f", chance top-1 {100 / v['num_classes']:.1f}%" if v["kind"] == "classification" else ""
        out.append(f"- {t}: [" + ", ".join(f"{w:.3f}" for w in v["routing_weights"]) + f"]{chance}")
    return "\n".join(out) + "\n"


def plot_report(results: dict, layout: RunLayout) -> list[Path]:
    """routing_weights.png (tasks x experts heatmap) and accuracy.png (per task and row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    weights = np.array([results["tasks"][t]["routing_weights"] for t in tasks])
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * weights.shape[1], 0.9 + 0.5 * len(tasks)))
    im = ax.imshow(weights, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(weights.shape[1]), [f"expert {e}" for e in range(weights.shape[1])], rotation=30)
    ax.set_yticks(range(len(tasks)), tasks)
    for i in range(len(tasks)):
        for j in range(weights.shape[1]):
            ax.text(j, i, f"{weights[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label="routing weight")
    ax.set_title("MoDE routing weights")
    fig.tight_layout()
    paths = [layout.routing_plot, layout.accuracy_plot]
    with atomic_path(paths[0]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(tasks), 3.8))
    width = 0.8 / len(rows)
    for r, row in enumerate(rows):
        vals = [results["tasks"][t][row][headline(results["tasks"][t]["kind"])] * 100 for t in tasks]
        ax.bar(np.arange(len(tasks)) + r * width, vals, width, label=row)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2,
                  [f"{t}\n({headline(results['tasks'][t]['kind'])})" for t in tasks])
    ax.set_ylabel("%")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Held-out tasks")
    fig.tight_layout()
    with atomic_path(paths[1]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return paths
