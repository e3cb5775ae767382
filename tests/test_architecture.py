"""The code's shape as a specification: floors that import only downward, no cycles, no
module-level surprises, small files, and one place that spells the run folder's file names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "clustering", "experts", "routing", "evaluation", "reporting", "serving")

# Floors, lowest first: a module may import its own floor and those below, never above.
FLOORS = [
    ("pipelines.core",),
    ("pipelines.shardio",),
    ("pipelines.synth",),
    ("clustering",),
    ("experts",),
    ("routing",),
    ("evaluation",),
    ("reporting",),
    ("serving",),
    ("pipelines.run",),
]
# Third-party modules that may be imported inside a function (heavy or optional, so a stage that
# is skipped, or a command that does not need them, never pays their import). Anything else, and
# every moda module, is imported at the top of the file.
LAZY = {"torch", "open_clip", "open_clip_train", "faiss", "dask", "distributed", "prefect_dask",
        "sentence_transformers", "safetensors", "matplotlib", "transformers", "scipy", "sklearn",
        "clip_benchmark", "fsspec", "zstandard", "uvicorn", "huggingface_hub",
        "webdataset"}  # imports torch
# moda modules that may be imported inside a function, and why.
LAZY_INTERNAL = {"pipelines.run.flows": "the Prefect layer: its import costs ~2 s, paid only by commands that "
                                        "start a flow (moda run, add-expert), not by moda stage/verify/predict",
                 "serving.service": "FastAPI, pydantic and uvicorn: paid only by moda serve"}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def floor(module: str) -> int:
    for rank, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no floor; add its package to FLOORS")


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            found.append((name, node.lineno, id(node) in top))
    return found


def internal(name: str, known: dict[str, Path]) -> str | None:
    """The moda module `name` refers to (a module, or a name inside one), or None."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        for name, _, _ in imports(path, known):
            target = internal(name, known)
            if target and target != module:
                edges[module].add(target)
    return edges


def test_every_module_imports_only_its_own_floor_and_those_below():
    wrong = [f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
             for m, targets in graph().items() for t in targets if floor(t) > floor(m)]
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else nxt)
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_imports_sit_at_the_top_of_the_file_except_heavy_optional_libraries():
    known = modules()
    late = []
    for path in known.values():
        for name, line, at_top in imports(path, known):
            if at_top or name.split(".")[0] in LAZY or any(name == m or name.startswith(m + ".")
                                                            for m in LAZY_INTERNAL):
                continue
            late.append(f"{path.relative_to(ROOT)}:{line} imports {name} inside a function")
    assert not late, "\n".join(late)


def test_no_source_file_is_over_400_lines_without_a_reason_at_its_top():
    long = []
    for path in modules().values():
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > MAX_LINES and "Why this file is long" not in "\n".join(lines[:40]):
            long.append(f"{path.relative_to(ROOT)}: {len(lines)} lines")
    assert not long, long


RUN_FILES = ("manifest.json", "registry.json", "fine_centroids.npy", "expert_of_fine.npy",
             "expert_centroids.npy", "assignments.parquet", "rejects.parquet", "plan.json",
             "results.json", "results.md", "results.jsonl", "routing.json", "report.json", "request.json", "sizes.json")


def test_only_the_run_layout_spells_run_folder_file_names():
    layout = ROOT / "pipelines" / "core" / "layout.py"
    spelled = []
    for path in modules().values():
        if path == layout:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in RUN_FILES:
                spelled.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not spelled, "\n".join(spelled)


def test_the_flow_layer_names_no_stage():
    """flows.py iterates the stage list and reads what each stage says it needs (pipelines/core/stage.py
    `Stage`): a stage name spelled there would be a second place to edit when stages change."""
    from pipelines.run.stages import NAMES

    flows = ROOT / "pipelines" / "run" / "flows.py"
    named = [f"{flows.relative_to(ROOT)}:{node.lineno}: {node.value!r}"
             for node in ast.walk(ast.parse(flows.read_text(encoding="utf-8")))
             if isinstance(node, ast.Constant) and node.value in NAMES]
    assert not named, "\n".join(named)


def test_only_a_stage_module_builds_a_stage_under_a_pipeline_stages_name():
    """A step that stands in for a stage's outputs (an added expert's assignment, its subset split)
    has a name of its own and says which folder it writes (`Stage.writes`)."""
    from pipelines.run.stages import NAMES

    wrong = []
    for path in modules().values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        stage_values = {id(node.value) for node in tree.body if isinstance(node, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == "STAGE" for t in node.targets)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Stage" \
                    and id(node) not in stage_values:
                names = [k.value.value for k in node.keywords if k.arg == "name" and isinstance(k.value, ast.Constant)]
                if names and names[0] in NAMES:
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: Stage(name={names[0]!r})")
    assert not wrong, "\n".join(wrong)


def test_the_command_line_and_the_stage_list_import_no_torch():
    """`moda --help`, `moda verify`, a split process: none needs torch (2 s and ~450 MB a process
    here); only the stages' work imports it (a trainer, the embed, the evaluation)."""
    import subprocess
    import sys

    probe = ("import sys, pipelines.run.cli, pipelines.run.stages\n"
             "print(sorted({'torch', 'webdataset'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"

