"""The expert phase's length in the report: each length's ensembles against the single model
continued from the same seed epoch (`evaluate.ablations: expert_epochs=<e>`, issue #34).

Every length costs the same in total (the seed shortened by what the experts train longer), so
the comparison that answers "is the expert phase too short?" is each length's ensemble against
the baseline that continued the same seed epoch for the same samples, paired over trainer seeds;
the report's main table still compares every row with the run's own baseline.
"""

from __future__ import annotations

import json

from pipelines.core.layout import RunLayout
from reporting.stats import Interval, interval_text
from routing.systems import ROUTED, UNIFORM

REFERENCE = "baseline"


def phase_lengths(layout: RunLayout, ablations: dict[str, str], references: dict[str, str]) -> list[dict]:
    """The expert phase's lengths compared (`expert_epochs=<e>` variants and the run's own), shortest
    first: each length's seed epochs and the rows that compare its experts with its own baseline."""
    if not references:
        return []
    registry = json.loads(layout.registry.read_text(encoding="utf-8"))
    total = registry["epochs_total"]
    own = total - registry["seed"]["epochs"]
    names = [f"expert_{e:03d}" for e in range(len(registry["experts"]))]
    phases = [{"expert_epochs": own, "seed_epochs": total - own, "baseline": REFERENCE,
               "routed": ROUTED, "uniform": UNIFORM, "experts": {name: name for name in names}}]
    for variant in dict.fromkeys(ablations[row] for row in references):
        e = int(variant.partition("=")[2])
        rows = [row for row, v in ablations.items() if v == variant and row in references]
        phases.append({"expert_epochs": e, "seed_epochs": total - e, "baseline": references[rows[0]],
                       "routed": next(r for r in rows if r.endswith(ROUTED)),
                       "uniform": next(r for r in rows if r.endswith(UNIFORM)),
                       "experts": {name: f"{variant} {name}" for name in names if f"{variant} {name}" in rows}})
    return sorted(phases, key=lambda p: p["expert_epochs"])


def phase_markdown(report: dict, columns: list[str], headline: list[str]) -> list[str]:
    """The expert phase's lengths: each length's routed and uniform ensembles against the baseline
    continued from the same seed epoch (the same total compute), with intervals."""
    phases = report.get("phases")
    if not phases:
        return []
    table = report["table"]
    out = ["", "The expert phase's length (the same total epochs; the experts and a baseline each continue the "
           "seed from the same epoch; points against that baseline):", "",
           "| expert epochs (seed epochs) | ensemble | baseline's mean top1 | " + " | ".join(headline) + " |",
           "|---|---|---:|" + "---:|" * len(columns)]
    for phase in phases:
        base = table[phase["baseline"]].get("mean", {}).get("mean")
        for kind in ("routed", "uniform"):
            row = table[phase[kind]]
            key = "vs_baseline" if phase["baseline"] == REFERENCE else "vs_reference"
            cells = [row[c].get(key) for c in columns]
            out.append(f"| {phase['expert_epochs']} ({phase['seed_epochs']}) | {kind} | "
                       + (f"{base * 100:.1f}" if base is not None else "") + " | "
                       + " | ".join(interval_text(Interval(**c)) if c else "" for c in cells) + " |")
    owned = {spec["model"]: spec.get("own_task") for spec in report.get("specialists", [])}
    if any(owned.values()):  # the clusters are the run's at every length: each expert's own task is the same
        names = list(owned)
        out += ["", "Each expert on the task routed to it most, against the baseline of its length (points):", "",
                "| expert epochs (seed epochs) | " + " | ".join(f"{n} ({owned[n] or '-'})" for n in names) + " |",
                "|---|" + "---:|" * len(names)]
        for phase in phases:
            key = "vs_baseline" if phase["baseline"] == REFERENCE else "vs_reference"
            cells = []
            for name in names:
                row, task = phase["experts"].get(name), owned[name]
                c = table.get(row, {}).get(task, {}).get(key) if row and task else None
                cells.append(interval_text(Interval(**c)) if c else "")
            out.append(f"| {phase['expert_epochs']} ({phase['seed_epochs']}) | " + " | ".join(cells) + " |")
    return out
