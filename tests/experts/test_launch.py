"""Trainer command lines, GPU slots and parallel scheduling (no training here)."""

import threading
import time
from pathlib import Path

import pytest

from experts.jobs import tune_epochs
from experts.launch import gpu_slots, resolve_precision, trainer_command, visible_gpus
from experts.train import model_config_dict, run_on_slots, run_parallel
from pipelines.core.config import TrainConfig, load_config


def command(cfg=TrainConfig(), **kw):
    args = dict(model_spec="ViT-B-32", train_data="a.tar", num_samples=None, logs=Path("logs"), name="x",
                epochs=3, resume=None, device="cuda")
    args.update(kw)
    return trainer_command(cfg, **args)


def test_visible_gpus_respect_an_existing_mask():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,5,7"}) == ["2", "5", "7"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({}, count=2) == ["0", "1"]


def test_gpu_slots_are_disjoint_groups():
    assert gpu_slots(["2", "5", "7"], 1) == [["2"], ["5"], ["7"]]
    assert gpu_slots(["0", "1", "2", "3", "4"], 2) == [["0", "1"], ["2", "3"]]
    assert gpu_slots([], 1) == [[]]  # CPU: one slot, experts one after another
    with pytest.raises(ValueError, match="gpus_per_expert=4 but only 2"):
        gpu_slots(["0", "1"], 4)


def test_precision_auto_is_bf16_on_gpu_and_fp32_on_cpu():
    assert resolve_precision(TrainConfig(), "cuda") == "amp_bf16"
    assert resolve_precision(TrainConfig(), "cpu") == "fp32"
    assert resolve_precision(TrainConfig(precision="fp16"), "cuda") == "fp16"


def test_efficient_training_switches_become_trainer_flags():
    cmd = command(TrainConfig(optimizer="lamb", grad_checkpointing=True, torchcompile=True, local_loss=True,
                              weight_decay=0.05))
    joined = " ".join(cmd)
    for flag in ("--opt timm/lamb", "--beta1 0.9", "--beta2 0.98", "--eps 1e-06", "--wd 0.05",
                 "--grad-checkpointing", "--torchcompile", "--local-loss", "--gather-with-grad",
                 "--precision amp_bf16", "--report-to tensorboard"):
        assert flag in joined, flag
    assert "--force-patch-dropout" not in joined
    assert "--force-patch-dropout 0" in " ".join(command(unmasked=True))


def test_several_gpus_per_model_launch_through_torchrun():
    cmd = command(nproc=4)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=4" in cmd and "experts.trainer_main" in cmd


def test_unmasked_tune_takes_the_configured_share_of_expert_epochs():
    assert tune_epochs(TrainConfig(patch_dropout=0.5, unmasked_tune_share=0.2), 5) == 1
    assert tune_epochs(TrainConfig(patch_dropout=0.5, unmasked_tune_share=0.5), 5) == 3
    assert tune_epochs(TrainConfig(patch_dropout=0.0), 5) == 0
    assert tune_epochs(TrainConfig(unmasked_tune_share=0.0), 5) == 0


def test_experts_never_share_a_slot_and_use_every_slot():
    slots = [["0"], ["1"]]
    running, peak, used = set(), [0], []
    lock = threading.Lock()

    def job(i):
        def run(slot):
            with lock:
                assert tuple(slot) not in running
                running.add(tuple(slot))
                peak[0] = max(peak[0], len(running))
                used.append(tuple(slot))
            time.sleep(0.05)
            with lock:
                running.remove(tuple(slot))
            return i
        return run

    results = run_on_slots([job(i) for i in range(6)], slots, run_parallel)
    assert results == list(range(6))
    assert peak[0] == 2 and set(used) == {("0",), ("1",)}


@pytest.mark.parametrize("preset", ["vit-b-32", "vit-b-16", "vit-l-14"])
def test_gpu_presets_load_and_name_open_clip_models(preset):
    cfg = load_config(f"configs/presets/{preset}.yaml")
    assert cfg.train.optimizer == "lamb" and cfg.train.precision == "amp_bf16"
    assert cfg.train.patch_dropout == 0.5
    assert model_config_dict(cfg.train.model)["vision_cfg"]["patch_size"] in (14, 16, 32)


def test_resume_point_is_the_newest_complete_checkpoint(tmp_path):
    import torch

    from experts.train import ensure_latest

    assert ensure_latest(tmp_path) is False
    torch.save({"epoch": 2}, tmp_path / "epoch_2.pt")
    (tmp_path / "epoch_3.pt").write_bytes(b"PK\x03\x04 truncated while saving")
    assert ensure_latest(tmp_path) is True
    assert torch.load(tmp_path / "epoch_latest.pt", weights_only=False)["epoch"] == 2
    assert not (tmp_path / "epoch_3.pt").exists()
    torch.save({"epoch": 4}, tmp_path / "epoch_4.pt")  # newer than the latest copy
    assert ensure_latest(tmp_path) is True
    assert torch.load(tmp_path / "epoch_latest.pt", weights_only=False)["epoch"] == 4


def test_a_cpu_trainer_gets_its_thread_count_whatever_the_environment_says(tmp_path, monkeypatch):
    """A CPU run's numbers depend on its thread count; Dask's local cluster leaves OMP_NUM_THREADS=1
    in the process that started it, which must not reach the trainers launched after it."""
    import sys

    from experts.launch import run_trainer

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    lines = []
    run_trainer([sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"], tmp_path / "log",
                on_line=lines.append, threads=3)
    assert lines == ["3"]


def test_a_run_that_stops_before_its_schedule_ends_asks_the_trainer_to_stop():
    from experts.trainer_main import STOP_FLAG, stop_after

    cmd = command(epochs=5, stop_after=3)
    assert cmd[cmd.index("--epochs") + 1] == "5" and cmd[cmd.index(STOP_FLAG) + 1] == "3"
    assert STOP_FLAG not in command(epochs=5, stop_after=5)  # the schedule's end: nothing to stop
    assert stop_after(["--epochs", "5", STOP_FLAG, "3", "--seed", "0"]) == (["--epochs", "5", "--seed", "0"], 3)
    assert stop_after(["--epochs", "5"]) == (["--epochs", "5"], None)


def test_the_seed_is_the_first_part_of_the_schedule_the_experts_finish():
    from experts.jobs import Job

    job = Job("seed", "a.tar", 10, epochs=2, start_epoch=0, start_from=None, fingerprint="f", schedule=3)
    assert job.schedule_epochs == 3
    assert Job("x", "a.tar", 10, 2, 0, None, "f").schedule_epochs == 2


def test_a_trainer_imports_transformers_only_for_a_model_that_may_use_it(tmp_path):
    """A local-dir model without an HF text tower or tokenizer, and no CoCa, starts without the ~0.7 s
    import; the moda model trains with it absent from the process (checked in a fresh interpreter)."""
    import json
    import subprocess
    import sys

    from experts.models import write_model_folder
    from experts.trainer_main import needs_transformers

    plain, hf = tmp_path / "plain", tmp_path / "hf"
    cfg = model_config_dict("experts/model_configs/moda-micro.json")
    write_model_folder(plain, cfg)
    write_model_folder(hf, {**cfg, "text_cfg": {**cfg["text_cfg"], "hf_model_name": "bert-base-uncased"}})
    assert not needs_transformers(["--model", f"local-dir:{plain}", "--epochs", "1"])
    assert needs_transformers(["--model", f"local-dir:{hf}"])
    assert needs_transformers(["--model", "ViT-B-32"]) and needs_transformers(["--epochs", "1"])
    assert needs_transformers(["--model", f"local-dir:{tmp_path / 'missing'}"])
    probe = ("import json, sys\nimport experts.trainer_main as t\ntry:\n"
             f"    t.main(['--model', 'local-dir:{plain}', '--help'])\n"
             "except SystemExit:\n    pass\n"
             "print(json.dumps(sys.modules.get('transformers', 'absent') is None))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) is True


def test_the_trainers_log_holds_each_line_as_it_is_printed(tmp_path):
    """The live progress (pipelines/run/progress.py) reads the trainer's log while it trains: a line
    printed must be in the log before the trainer goes on, not when a buffer fills or the run ends."""
    import sys
    import threading

    from experts.launch import run_trainer

    go, log = tmp_path / "go", tmp_path / "trainer.log"
    wait = ("import pathlib, sys, time\nprint('Train Epoch: 1 [ 64/640 (10%)]', flush=True)\n"
            "for _ in range(400):\n    if pathlib.Path(sys.argv[1]).exists():\n        break\n    time.sleep(0.05)\n")
    trainer = threading.Thread(target=run_trainer, args=([sys.executable, "-c", wait, str(go)], log))
    trainer.start()
    deadline = time.monotonic() + 15
    while "Train Epoch: 1" not in (log.read_text() if log.is_file() else "") and time.monotonic() < deadline:
        time.sleep(0.05)
    seen_while_running = trainer.is_alive() and "Train Epoch: 1" in log.read_text()
    go.touch()
    trainer.join(timeout=30)
    assert seen_while_running
