"""Stage 3 on a clustered run of 12 input shards: out-of-cluster mixing, minimum shards, verify,
a killed split, several split processes (the slower half of the split's tests)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
from test_split import published, split_both_ways

from experts.split.verify import verify_split
from pipelines.core.config import load_config
from pipelines.core.layout import shard_id
from pipelines.core.manifest import file_sha256
from pipelines.run.stages import run_stage
from pipelines.shardio.shards import ShardSetWriter, iter_samples
from pipelines.synth.generate import generate

from conftest import write_config


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """1,200 synthetic pairs in 12 input shards, embedded and clustered (4 experts)."""
    root = tmp_path_factory.mktemp("split_run")
    config = write_config(root / "c.yaml", root / "data",
                          synth={"num_train": 1200, "shard_size": 100, "eval_per_class": 1, "retrieval_pairs": 4},
                          cluster={"num_fine": 16, "num_experts": 4, "niter": 10},
                          split={"shard_size": 25, "ooc_ratio": 0.05})
    cfg = load_config(config)
    generate(cfg.synth)
    for stage in ("embed", "cluster"):
        run_stage(stage, cfg, root / "run")
    return config, cfg, root


def split_outputs(run_dir):
    split = run_dir / "split"
    return {str(p.relative_to(split)): file_sha256(p) for p in sorted(split.glob("expert_*/*"))
            if p.is_file()} | {"rejects.parquet": file_sha256(split / "rejects.parquet")}


def fresh_run(root, name):
    """A run folder sharing the embed and cluster stages, with no split yet."""
    run = root / name
    run.mkdir()
    for stage in ("embed", "cluster"):
        os.symlink(root / "run" / stage, run / stage)
    return run


def test_out_of_cluster_mixing_is_deterministic_and_verified(clustered):
    _, cfg, root = clustered
    a, b = fresh_run(root, "ooc_a"), fresh_run(root, "ooc_b")
    ma = run_stage("split", cfg, a)
    run_stage("split", cfg, b)
    assert split_outputs(a) == split_outputs(b)
    copies = ma["counts"]["ooc_copies"]
    assert 0.5 * 0.05 * 1200 < copies < 2 * 0.05 * 1200
    assert sum(ma["counts"]["experts"]) == 1200 + copies
    problems, summary = verify_split(a)
    assert problems == [] and summary["ooc_copies"] == copies


def test_each_expert_gets_at_least_min_shards(clustered):
    config, _, root = clustered
    cfg = load_config(write_config(root / "m.yaml", root / "data",
                                   cluster={"num_fine": 16, "num_experts": 4, "niter": 10},
                                   split={"shard_size": 10_000, "min_shards": 3}))
    run = fresh_run(root, "min_shards")
    run_stage("split", cfg, run)
    for e in range(4):
        sizes = json.loads((run / "split" / f"expert_{e:03d}" / "sizes.json").read_text())
        assert len(sizes) >= 3 and all(n > 0 for n in sizes.values())


def test_verify_catches_a_lost_sample(clustered, capsys):
    from pipelines.run.cli import main as cli_main

    _, cfg, root = clustered
    run = fresh_run(root, "tampered")
    run_stage("split", cfg, run)
    assert cli_main(["verify", str(run)]) == 0
    shard = run / "split" / "expert_001" / "00000.tar"
    samples = list(iter_samples(shard))[1:]  # drop one sample
    tmp = run / "rewrite"
    writer = ShardSetWriter(tmp, shard_size=10**6)
    for s in samples:
        writer.write(s.key, s.files)
    writer.close()
    os.replace(tmp / "00000.tar", shard)
    assert cli_main(["verify", str(run)]) == 1
    err = capsys.readouterr().err
    assert "sizes.json says" in err and "neither in an expert nor rejected" in err


def test_verify_from_the_embed_stages_records_agrees_with_reading_the_inputs_and_names_a_changed_one(clustered):
    """`moda verify --inputs recorded` takes the input keys from what the embed stage read, once each
    input is shown to be the one the split read; an input changed since is named, not trusted."""
    from pipelines.run.cli import main as cli_main

    _, cfg, root = clustered
    run = fresh_run(root, "verify_recorded")
    run_stage("split", cfg, run)
    assert verify_split(run, "recorded") == verify_split(run, "read")
    assert verify_split(run)[0] == [] and verify_split(run)[1]["samples_in"] == 1200
    shard = sorted((root / "data" / "train").glob("*.tar"))[3]
    data, stat = shard.read_bytes(), shard.stat()
    try:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes: hashed, fine
        assert verify_split(run, "recorded")[0] == []
        shard.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])  # a byte of a payload changed
        problems, _ = verify_split(run, "recorded")
        assert problems == [f"input shard {shard} is not the one the split read (its sha256 changed): verify it "
                            "with --inputs read, or rerun from the embed stage"]
        assert cli_main(["verify", str(run), "--inputs", "recorded"]) == 1
    finally:
        shard.write_bytes(data)
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_killed_split_resumes_to_the_same_outputs(clustered):
    config, cfg, root = clustered
    reference = fresh_run(root, "uninterrupted")
    run_stage("split", cfg, reference)
    expected = split_outputs(reference)
    killed_mid_way = 0
    for point, kill_after in enumerate([1, 6, 14]):
        run = fresh_run(root, f"killed_{point}")
        records = run / "split" / "progress" / "outputs"
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.run.cli", "stage", "split", str(config),
                                 "--run-dir", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            if records.is_dir() and len(list(records.glob("*.json"))) >= kill_after:
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait()
        if not (run / "split" / "manifest.json").is_file():
            killed_mid_way += 1
        resumed = run_stage("split", cfg, run)
        assert not resumed.get("skipped")
        assert split_outputs(run) == expected
        assert verify_split(run)[0] == []
    assert killed_mid_way >= 2  # the test really interrupted the stage


def test_a_resumed_split_reads_ahead_only_the_input_shards_it_has_left(clustered, monkeypatch):
    """Read ahead (for a remote shard: fetched into a temporary copy) is the work left, not the
    shards after it that a rerun skips."""
    import experts.split.stage as split_stage
    from pipelines.core.layout import RunLayout

    _, cfg, root = clustered
    one = dataclasses.replace(cfg, split=dataclasses.replace(cfg.split, processes=1))
    run = fresh_run(root, "resumed_read_ahead")
    run_stage("split", one, run)
    expected = split_outputs(run)
    middle = sorted((root / "data" / "train").glob("*.tar"))[5]
    (run / "split" / "manifest.json").unlink()
    RunLayout(run).input_record(shard_id(middle)).unlink()  # as if killed before its record landed
    read_ahead = []
    monkeypatch.setattr(split_stage, "prefetch", read_ahead.append)
    run_stage("split", one, run)
    assert [shard_id(p) for p in read_ahead] == [shard_id(middle)]
    assert split_outputs(run) == expected


@pytest.mark.parametrize("processes", [2, 5])
def test_several_split_processes_write_the_same_bytes_as_one(clustered, processes):

    from experts.split.plan import boundary_shards
    from experts.split.plan import input_runs as _chunks

    _, cfg, root = clustered
    one, many = fresh_run(root, f"one_{processes}"), fresh_run(root, f"many_{processes}")
    run_stage("split", dataclasses.replace(cfg, split=dataclasses.replace(cfg.split, processes=1)), one)
    manifest = run_stage("split", dataclasses.replace(cfg, split=dataclasses.replace(cfg.split,
                                                                                     processes=processes)), many)
    plan = json.loads((many / "split" / "plan.json").read_text())
    chunks = [[p.stem for p in chunk] for chunk in _chunks(sorted((root / "data" / "train").glob("*.tar")),
                                                           processes)]
    assert len(chunks) == processes and boundary_shards(plan, chunks, 4)  # shards were joined from fragments
    assert split_outputs(many) == split_outputs(one)
    assert manifest["counts"]["samples_in"] == 1200 and verify_split(many)[0] == []
    assert not list((many / "split").glob("expert_*/.*"))  # no fragment or temp file left


def test_the_number_of_split_processes_does_not_change_the_fingerprint(clustered):

    _, cfg, root = clustered
    run = fresh_run(root, "processes_fp")
    run_stage("split", cfg, run)
    again = run_stage("split", dataclasses.replace(cfg, split=dataclasses.replace(cfg.split, processes=3)), run)
    assert again.get("skipped")


@pytest.mark.parametrize("partitions", [None, 3])  # keys in one spill partition, or spread over three
def test_verify_names_a_stranger_a_repeat_and_a_sample_in_the_wrong_expert(clustered, monkeypatch, partitions):
    import experts.split.verify

    if partitions:
        monkeypatch.setattr(experts.split.verify, "partitions_for", lambda records: partitions)
    _, cfg, root = clustered
    run = fresh_run(root, f"tampered_more_{partitions}")
    run_stage("split", cfg, run)
    assert verify_split(run)[0] == []
    shard = run / "split" / "expert_000" / "00000.tar"
    samples = list(iter_samples(shard))
    other = next(iter_samples(run / "split" / "expert_001" / "00000.tar"))
    extra = [samples[0], other, type(samples[0])(key="stranger", files=samples[0].files)]
    writer = ShardSetWriter(run / "rewrite", shard_size=10**6)
    for s in samples + extra:
        writer.write(s.key, s.files)
    writer.close()
    os.replace(run / "rewrite" / "00000.tar", shard)
    problems, _ = verify_split(run)
    text = "\n".join(problems)
    assert f"1 keys are written more than once to their expert, e.g. {shard}: {samples[0].key!r} (2 times)" in text
    assert "were never assigned by the cluster stage, e.g." in text and "'stranger'" in text
    assert f"neither theirs nor one of their out-of-cluster copies, e.g. {shard}: {other.key!r}" in text
    assert "1 samples are accounted for more often than they occur in the input" in text


def test_the_array_path_agrees_on_a_clustered_run_with_out_of_cluster_copies(clustered, monkeypatch):
    _, cfg, root = clustered
    cfg = dataclasses.replace(cfg, split=dataclasses.replace(cfg.split, processes=1))  # patches reach one process
    runs = {}

    def split(name):
        runs[name] = fresh_run(root, name)
        return run_stage("split", cfg, runs[name])

    fast, slow, taken = split_both_ways(monkeypatch, split)
    assert len(taken) == 12 and fast["counts"]["ooc_copies"] > 0
    assert published(runs["split_arrays"] / "split") == published(runs["split_samples"] / "split")
    assert fast["counts"] == slow["counts"]


