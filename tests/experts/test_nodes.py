"""One model over several hosts: the nodes of a launch agree on one rendezvous endpoint through a file,
the command starts them through the configured launcher, and on loopback two nodes of one process
each train one model together (gloo on CPU)."""

import re
import sys
import threading
from pathlib import Path

import pytest

from experts import nodes
from experts.launch import trainer_command
from experts.shard_sets import check_shard_counts
from pipelines.core.config import ConfigError, TrainConfig, load_config, section_hash


def command(cfg, **kw):
    args = dict(model_spec="ViT-B-32", train_data="a.tar", num_samples=None, logs=Path("logs"), name="x",
                epochs=3, resume=None, device="cuda", nproc=8)
    return trainer_command(cfg, **(args | kw))


def test_the_nodes_of_a_launch_agree_on_one_endpoint_that_exactly_one_of_them_serves(tmp_path):
    path, results = tmp_path / "rdzv" / "expert_000-abc", []
    threads = [threading.Thread(target=lambda i=i: results.append(nodes.rendezvous(path, f"node{i}")))
               for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    endpoints = {endpoint for endpoint, _ in results}
    assert len(endpoints) == 1 and sum(hosting for _, hosting in results) == 1
    host, port = endpoints.pop().split(":")
    assert host.startswith("node") and int(port) > 0
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the offers are cleaned up


def test_a_node_whose_host_never_appears_gives_up_naming_the_file(tmp_path):
    path = tmp_path / "x"
    path.write_text("")  # created, never filled
    with pytest.raises(TimeoutError, match=str(path)):
        nodes.rendezvous(path, "me", timeout=0.5)


def test_a_launch_over_two_nodes_starts_them_through_srun_or_on_this_host(tmp_path):
    rdzv = tmp_path / "seed-0123"
    srun = TrainConfig(nodes_per_expert=2, node_launcher=["srun", "--nodes={nodes}", "--ntasks-per-node=1"])
    cmd = command(srun, rendezvous=rdzv)
    torchrun = cmd.index("torch.distributed.run")
    assert cmd[:torchrun - 2] == ["srun", "--nodes=2", "--ntasks-per-node=1", sys.executable, "-m", "experts.nodes",
                                  str(rdzv), "--"]
    assert cmd[torchrun + 1:torchrun + 6] == ["--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d",
                                              "--rdzv_id=seed-0123", nodes.RENDEZVOUS]
    local = command(TrainConfig(nodes_per_expert=2), rendezvous=rdzv)
    assert local[3:7] == ["--copies", "2", str(rdzv), "--"]
    assert "--standalone" not in local and "--standalone" in command(TrainConfig())
    with pytest.raises(ValueError, match="rendezvous"):
        command(TrainConfig(nodes_per_expert=2))


def test_one_failed_node_stops_the_launch_with_its_code(tmp_path, capfd):
    fake = tmp_path / "torchrun"  # prints its arguments; the joining node fails
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint(' '.join(sys.argv[1:]), flush=True)\n"
                    "sys.exit(0 if 'is_host=1' in ' '.join(sys.argv) else 3)\n")
    fake.chmod(0o755)
    assert nodes.main(["--copies", "2", str(tmp_path / "rdzv"), "--", str(fake), "--nnodes=2", nodes.RENDEZVOUS]) == 3
    lines = sorted(line for line in capfd.readouterr().out.splitlines() if line.startswith("--"))
    assert [re.sub(r":\d+ ", ":PORT ", line) for line in lines] == [
        f"--nnodes=2 --rdzv_endpoint={nodes.socket.gethostname()}:PORT --rdzv_conf=is_host={i}" for i in (0, 1)]


def test_nodes_per_expert_is_checked_and_changes_the_fingerprint_only_when_used(tmp_path):
    with pytest.raises(ConfigError, match="train.nodes_per_expert must be > 0"):
        load_config("configs/demo.yaml", overrides={"train": {"nodes_per_expert": 0}})
    assert section_hash(TrainConfig()) == section_hash(TrainConfig(nodes_per_expert=1, node_launcher=["srun"]))
    assert section_hash(TrainConfig(nodes_per_expert=2)) != section_hash(TrainConfig())


def test_a_loader_that_could_be_dealt_less_than_a_batch_is_refused_before_it_spins_forever():
    cfg = TrainConfig(workers=1, batch_size=16)
    with pytest.raises(ValueError, match=r"dealt only 6 samples, less than one batch of 16"):
        check_shard_counts(cfg, {"expert_000": [60, 60, 6]}, processes=2)  # 2 loaders: one may get [6]
    check_shard_counts(cfg, {"expert_000": [60, 60, 6]}, processes=1)  # one loader gets all 126
    check_shard_counts(TrainConfig(workers=1, batch_size=4), {"expert_000": [60, 60, 6]}, processes=2)
    check_shard_counts(TrainConfig(workers=1, batch_size=16, dataset_resampled=True), {"e": [6]}, processes=2)
    with pytest.raises(ValueError, match="fewer shards than the 4 data loaders"):
        check_shard_counts(TrainConfig(workers=2), {"expert_000": [600, 600, 600]}, processes=2)


@pytest.mark.slow
def test_two_nodes_on_loopback_train_one_model_together(tiny_run, tmp_path, monkeypatch):
    from experts.jobs import Job
    from experts.models import write_model_folder
    from experts.shard_sets import shard_set
    from experts.train import model_config, train_job
    from pipelines.core.layout import RunLayout
    from pipelines.shardio.brace import compact_shards

    monkeypatch.setenv(nodes.ADDRESS_VAR, "127.0.0.1")
    # batch 4: each node's loader is dealt one of the expert's shards, the smallest holding 6 samples
    cfg = load_config(tiny_run["config"],
                      overrides={"train": {"nodes_per_expert": 2, "device": "cpu", "batch_size": 4}}).train
    layout = RunLayout(tmp_path / "run")
    paths, sizes = shard_set(RunLayout(tiny_run["run_dir"]).expert_shards(0))
    model_cfg = model_config(cfg)
    write_model_folder(layout.model_config, model_cfg)
    job = Job("expert_000", compact_shards([str(p) for p in paths]), None, 1, 0, None, "fp")
    final = train_job(cfg, job, layout=layout, model_spec=f"local-dir:{layout.model_config.resolve()}",
                      model_cfg=model_cfg, device="cpu", gpus=None)
    assert final.is_file() and (layout.model("expert_000") / "open_clip_model.safetensors").is_file()
    log = layout.trainer_log("expert_000").read_text()
    assert "--nnodes=2" in log and "(is_host=1)" in log and "(is_host=0)" in log
    assert "total 2" in log  # open_clip_train: "Process (global: 0, local 0), total 2."
    assert not list((layout.train / "rendezvous").iterdir())  # the launch's file is removed
