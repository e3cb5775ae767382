"""The documents that describe code are checked against it: the run-folder listing against
RunLayout, the configuration reference against the config dataclasses, and the README's length."""

import dataclasses
import re
from pathlib import Path

import yaml

from pipelines.core.config import RUN_ONLY, Config
from pipelines.core.layout import tree

ROOT = Path(__file__).resolve().parents[1]
GENERATED = re.compile(r"<!-- run-folder tree: generated -->\n```\n(.*?)```\n", re.S)


def config_fields() -> dict[str, dataclasses.Field]:
    """`section.key` (or a top-level key) -> its dataclass field, for every key a config may set."""
    out = {}
    for top in dataclasses.fields(Config):
        section = top.default_factory() if top.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(section):
            out.update({f"{top.name}.{f.name}": f for f in dataclasses.fields(section)})
        else:
            out[top.name] = top
    return out


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def documented() -> dict[str, tuple[str, bool]]:
    """docs/configuration.md's table: key -> (default as written, marked run-only)."""
    rows = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        keys_cell, default_cell, meaning = (c.strip() for c in line.strip("|").split(" | ", 2))
        keys = re.findall(r"`([a-z_.0-9]+)`", keys_cell)
        defaults = [default_cell] if len(keys) == 1 else [d.strip() for d in default_cell.split(", ")]
        assert len(defaults) == len(keys), f"{keys}: one default each, got {default_cell!r}"
        for key, default in zip(keys, defaults):
            assert key not in rows, f"{key} documented twice"
            rows[key] = (default, "*(run-only)*" in meaning)
    return rows


def as_value(cell: str, like):
    value = yaml.safe_load(cell.strip("`")) if cell.strip("`") else ""
    if isinstance(like, float) and not isinstance(like, bool):
        return float(value)
    if isinstance(like, str):
        return "" if value is None else str(value)
    return value


def test_the_run_folder_listing_in_the_docs_is_what_runlayout_names():
    text = (ROOT / "docs" / "run-folder.md").read_text()
    found = GENERATED.search(text)
    assert found, "docs/run-folder.md lost its generated run-folder listing"
    assert found.group(1) == tree() + "\n", (
        "docs/run-folder.md's listing differs from RunLayout: paste `python -m pipelines.core.layout` into it")


def test_the_listing_names_every_path_runlayout_knows():
    listing = tree()
    for path in ("embed/SHARD.parquet", "cluster/assignments.parquet", "split/expert_000/00000.tar",
                 "train/registry.json", "evaluate/per_sample.parquet", "report/report.md",
                 "seeds/replicate_1/", "sweep/NAME/", "ablations/VARIANT/", "added/registry.json",
                 "cache/image_features"):
        assert f"  {path}" in listing, path


def test_every_config_key_is_documented_with_its_default_and_nothing_else_is():
    fields, docs = config_fields(), documented()
    assert sorted(set(fields) - set(docs)) == [], "keys missing from docs/configuration.md"
    assert sorted(set(docs) - set(fields)) == [], "docs/configuration.md documents keys the config lacks"
    wrong = {key: (docs[key][0], default_of(f)) for key, f in fields.items()
             if as_value(docs[key][0], default_of(f)) != default_of(f)}
    assert wrong == {}, "documented default (left) differs from the dataclass (right)"


def test_keys_marked_run_only_in_the_docs_are_the_run_only_fields():
    fields, docs = config_fields(), documented()
    code = {key for key, f in fields.items() if f.metadata == RUN_ONLY}
    # `executor` and every field of the dask section are in no fingerprint by their contract (Config's
    # and DaskConfig's docstrings): the sections below a stage mark theirs field by field
    by_contract = {key for key in fields if key == "executor" or key.startswith("dask.")}
    marked = {key for key, (_, run_only) in docs.items() if run_only}
    assert marked - by_contract == code - by_contract


def test_the_readme_is_a_front_door_of_at_most_250_lines_linking_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"README does not link {page.name}"
