"""The scaling stage's markdown and plots: scaling.md and one log-log PNG a task.

A verdict is stated only when its interval says so, and on what was
measured: MoDE-n "beat" (or "lost to") the single model when the paired
interval of their error difference at the largest compute excludes zero,
otherwise "no significant difference". The laws' crossing and compute
multiplier are given with their intervals as the size of the effect; they
carry no verdict, because a law's extrapolation near its floor turns a small
error difference into a large compute ratio.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np

from pipelines.core.manifest import atomic_path


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _span(pair, fmt) -> str:
    low, high = pair if pair else (None, None)
    if low is None or high is None or not np.isfinite(low) or not np.isfinite(high):
        return "[-]"
    return f"[{fmt(low)}, {fmt(high)}]"


def _flops(value) -> str:
    return "-" if value is None else ("inf" if not np.isfinite(value) else f"{value:.3g}")


def verdict(difference: dict, seeds: int) -> str:
    """What the measured error difference at the largest compute (other minus single) says: with one
    trainer seed a lead ("ahead of", "behind"), "beat" and "lost to" need two seeds or more."""
    low, high = difference["interval"]
    if high < 0:
        return "beat the single model" if seeds >= 2 else "ahead of the single model"
    if low > 0:
        return "lost to the single model" if seeds >= 2 else "behind the single model"
    return "no significant difference from the single model"


def points_table(summary: dict) -> list[str]:
    labels = summary["labels"]  # the systems in their order (scaling.json sorts its keys)
    head = ["point", "model", "params", "GFLOPs/sample", "epochs (seed + rest)", "samples seen",
            *[f"FLOPs {label}" for label in labels], "FLOPs all", "wall s (train + evaluate)", "GPU-hours"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for p in summary["points"]:
        g = p["gflops_per_sample"]
        gflops = f"{g['unmasked']:.3g}" if abs(g["masked"] - g["unmasked"]) < 1e-12 else \
            f"{g['masked']:.3g} masked / {g['unmasked']:.3g}"
        seen = " / ".join(f"{p['samples'][label]:,}" for label in labels)
        gpu = "-" if p["gpu_hours"] is None else f"{p['gpu_hours']:.3f}"
        cells = [p["name"], p["model"], f"{p['params'] / 1e6:.2f}M", gflops,
                 f"{p['epochs']} ({p['seed_epochs']} + {p['epochs'] - p['seed_epochs']})", seen,
                 *[_flops(p["flops"][label]) for label in labels], _flops(p["total_flops"]),
                 f"{p['wall_seconds']:.0f}", gpu]
        out.append("| " + " | ".join(cells) + " |")
    return out


def errors_table(summary: dict) -> list[str]:
    labels, tasks = summary["labels"], summary["tasks"]
    head = ["point", *[f"{label}: {task}" for task in tasks for label in labels]]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for p in summary["points"]:
        out.append("| " + " | ".join([p["name"], *[_pct(p["error"][label][task]) for task in tasks
                                                    for label in labels]]) + " |")
    return out


def fits_table(summary: dict) -> list[str]:
    out = ["| task | system | alpha | E_inf (%) | error at the largest compute (%) | at 10x it (%) | "
           "held out: predicted / measured at the largest budget (%) | redraws fitted |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for task in summary["tasks"]:
        for label in summary["labels"]:
            f = summary["fits"][label][task]
            if f["law"] is None:
                out.append(f"| {task} | {label} | no law: {f['why']} | | | | | |")
                continue
            law, (top, beyond), held = f["law"], f["predictions"], f["holdout"]
            held_text = "too few budgets" if held["predicted"] is None else \
                f"{_pct(held['predicted'])} / {_pct(held['observed'])} ({100 * held['error']:+.1f})"
            out.append(f"| {task} | {label} | {law['alpha']:.3f} {_span(f['alpha_interval'], lambda v: f'{v:.3f}')} | "
                       f"{_pct(law['e_inf'])} {_span(f['e_inf_interval'], _pct)} | "
                       f"{_pct(top['error'])} {_span(top['interval'], _pct)} | "
                       f"{_pct(beyond['error'])} {_span(beyond['interval'], _pct)} | {held_text} | "
                       f"{f['redraws_fitted']}/{f['redraws']} |")
    return out


def answer(summary: dict) -> list[str]:
    out = ["| task | system | error difference at the largest compute (points) | verdict | "
           "crossing with the single model (FLOPs) | compute multiplier at each budget |", "|---|---|---:|---|---|---|"]
    for label in [lb for lb in summary["labels"] if lb in summary["comparisons"]]:
        for task in summary["tasks"]:
            c = summary["comparisons"][label][task]
            d = c["difference_at_largest"]
            measured = f"{100 * d['value']:+.1f} {_span(d['interval'], lambda v: f'{100 * v:+.1f}')}"
            if not c["multipliers"]:
                out.append(f"| {task} | {label} | {measured} | {verdict(d, summary['seeds'])} | no law to compare | |")
                continue
            low, high = c["range"]
            cross = f"{_flops(c['crossing'])} {_span(c['crossing_interval'], _flops)}, in " \
                    f"{c['redraws_crossing']}/{c['redraws']} redraws" if c["crossing"] is not None else \
                f"no crossing in {_flops(low)}-{_flops(high)} ({c['redraws_crossing']}/{c['redraws']} redraws cross)"
            steps = "; ".join(f"{_flops(m['compute'])}: {m['value']:.2f}x {_span(m['interval'], lambda v: f'{v:.2f}')}"
                              for m in c["multipliers"])
            out.append(f"| {task} | {label} | {measured} | {verdict(d, summary['seeds'])} | {cross} | {steps} |")
    return out


def scaling_markdown(summary: dict) -> str:
    points = summary["points"]
    models = sorted({p["model"] for p in points}, key=[p["model"] for p in points].index)
    lines = [
        "# Scaling laws: MoDE against the single model",
        "",
        f"{len(points)} points ({len(models)} models x {len(points) // max(1, len(models))} budgets), "
        f"{summary['seeds']} trainer seed(s) each. At each point the seed trains the first epochs of the "
        "budget; the single model (the fair baseline: the seed continued on all data, one cosine schedule) "
        "and every MoDE-n's experts train the rest, so every system at a point costs about the same. Laws "
        "err(C) = A (C / C0)^-alpha + E_inf are fitted on each system's compute-Pareto frontier over all "
        f"points; intervals are {summary['confidence']:.0%} percentile intervals over {summary['resamples']} "
        "redraws of the test samples, the same redraw for every point and system. Test samples per task: "
        + ", ".join(f"{t} {n}" for t, n in summary["test_samples"].items()) + ".",
        "",
        "## Where MoDE pays",
        "",
        "The verdict rests on the measured error difference (MoDE-n minus the single model, negative: MoDE-n "
        "better) at the largest compute, with the paired interval of that point's report (over its trainer "
        "seeds and test samples)" + (": with one trainer seed it covers test-sample noise only, not training "
        "noise, so a verdict here is a lead to rerun with `--seeds 3`, not a finding." if summary["seeds"] == 1
                                     else ".") + " The compute multiplier at a budget C is the "
        "compute the single model's law needs to reach MoDE-n's error at C, over C (above 1: the experts are "
        "worth more compute than they used); it and the crossing are the laws' estimates, with intervals.",
        "",
        *answer(summary),
        "",
        "## Fits",
        "",
        *fits_table(summary),
        "",
        "## Points",
        "",
        *points_table(summary),
        "",
        "## Test error per point (%)",
        "",
        *errors_table(summary),
        "",
        "Plots: " + ", ".join(f"![{t}]({t}.png)" for t in summary["tasks"]),
        "",
    ]
    return "\n".join(lines)


def plot_task(summary: dict, task: str, path: Path) -> Path:
    """Every system's points and fitted law on one task, log-log, the law drawn to 10x the largest compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    models = list(dict.fromkeys(p["model"] for p in summary["points"]))
    markers = "osD^vP*X"
    for i, label in enumerate(summary["labels"]):
        color = f"C{i}"
        compute = np.array([p["flops"][label] for p in summary["points"]])
        err = np.array([p["error"][label][task] for p in summary["points"]])
        for m, model in enumerate(models):
            mine = [j for j, p in enumerate(summary["points"]) if p["model"] == model]
            ax.scatter(compute[mine], err[mine], color=color, marker=markers[m % len(markers)], s=22,
                       label=f"{label}, {Path(model).stem}")
        law = summary["fits"][label][task]["law"]
        if law is not None:
            grid = np.geomspace(compute.min(), 10 * compute.max(), 200)
            ax.plot(grid, law["a"] * (grid / law["c0"]) ** (-law["alpha"]) + law["e_inf"], color=color, lw=1.2)
    ax.set_xscale("log")
    ax.set_yscale("log", nonpositive="mask")  # a task some model solves (error 0) has no point there
    ax.set_xlabel("training FLOPs (seed + its continuation)")
    ax.set_ylabel("test error" + (" (mean over classification tasks)" if task == "mean" else f" ({task})"))
    ax.set_title(f"{task}: error against compute, fitted on each system's Pareto frontier", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def inline_plots(markdown: str, folder: Path) -> str:
    """The markdown with each `![task](task.png)` made a data URI, for a Prefect artifact."""
    def inline(match: re.Match) -> str:
        png = folder / match.group(2)
        if not png.is_file():
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"
    return re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", inline, markdown)
