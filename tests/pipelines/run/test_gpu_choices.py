"""What a run chooses on a GPU (device, slots, precision, commands), checked on a CPU with faked GPU
lists: every branch here only picks, so it needs no device."""

import pytest

from clustering.embed import worker_devices
from experts.launch import gpu_slots, resolve_precision, run_gpus, trainer_command, trainer_device
from pipelines.core.config import EmbedConfig, TrainConfig
from pipelines.core.devices import cuda_index, device_gpus, is_cuda
from pipelines.run.sweep import gpu_shares


def test_any_cuda_device_string_is_a_gpu():
    assert is_cuda("cuda") and is_cuda("cuda:0") and is_cuda("cuda:7")
    assert not is_cuda("cpu") and not is_cuda("mps") and not is_cuda("cudax") and not is_cuda("cuda:x")
    assert cuda_index("cuda:3") == 3 and cuda_index("cuda") is None and cuda_index("cpu") is None


def test_an_explicit_cuda_n_trains_in_bf16_like_cuda():
    for device in ("cuda", "cuda:0", "cuda:1"):
        assert resolve_precision(TrainConfig(), device) == "amp_bf16", device
    assert resolve_precision(TrainConfig(), "cpu") == "fp32"


def test_cuda_n_trains_on_the_nth_visible_gpu_only():
    visible = ["2", "5"]  # CUDA_VISIBLE_DEVICES=2,5: torch's cuda:1 is GPU 5
    assert run_gpus("cuda:1", visible=visible) == ["5"]
    assert run_gpus("cuda", visible=visible) == ["2", "5"]
    assert run_gpus("cpu", visible=visible) == []
    assert run_gpus("cuda", ["5"], visible=visible) == ["5"]
    with pytest.raises(ValueError, match="only 2 GPU"):
        device_gpus("cuda:2", visible)
    with pytest.raises(ValueError, match=r"train.gpus \['2'\]"):
        run_gpus("cuda:1", ["2"], visible=visible)


def test_the_trainer_is_told_cuda_with_its_slot_as_its_mask():
    assert trainer_device("cuda:1") == "cuda" and trainer_device("cpu") == "cpu"
    cmd = trainer_command(TrainConfig(), model_spec="ViT-B-32", train_data="a.tar", num_samples=None,
                          logs=__import__("pathlib").Path("logs"), name="x", epochs=2, resume=None,
                          device=trainer_device("cuda:1"))
    assert cmd[cmd.index("--device") + 1] == "cuda" and cmd[cmd.index("--precision") + 1] == "amp_bf16"


def test_several_small_models_share_a_gpu_round_robin():
    assert gpu_slots(["0", "1"], 1, models_per_gpu=3) == [["0"], ["1"]] * 3
    assert gpu_slots(["0"], 1, models_per_gpu=1) == [["0"]]
    assert gpu_slots([], 1, models_per_gpu=4) == [[]]  # a CPU still trains one model at a time
    with pytest.raises(ValueError, match="models_per_gpu"):
        gpu_slots(["0", "1"], 2, models_per_gpu=2)


def test_sweep_points_pack_onto_one_gpu_only_when_allowed():
    assert gpu_shares(["0", "1"], 2, 1) == [["0"], ["1"]]
    assert gpu_shares(["0"], 4, 1, models_per_gpu=4) == [["0"]] * 4
    assert gpu_shares(["0", "1"], 3, 1, models_per_gpu=2) == [["0"], ["1"], ["0"]]
    with pytest.raises(ValueError, match="raise models_per_gpu"):
        gpu_shares(["0"], 2, 1)


def test_embed_runs_one_process_on_a_named_gpu(monkeypatch):
    assert worker_devices(EmbedConfig(device="cuda:1")) == ["cuda:1"]
    assert worker_devices(EmbedConfig(device="cpu", processes=2)) == ["cpu", "cpu"]
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert worker_devices(EmbedConfig(device="cuda")) == ["cuda:0", "cuda:1", "cuda:2"]
    assert worker_devices(EmbedConfig(device="cuda", processes=2)) == ["cuda:0", "cuda:1"]


def test_the_trainers_webdataset_loader_pins_memory_on_a_gpu_only():
    import webdataset

    from experts.trainer_main import pinned_loader

    seen = {}

    class Loader:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)

    pinned_loader(Loader, True)([], batch_size=None)
    assert seen["pin_memory"] is True
    pinned_loader(Loader, False)([])
    assert seen["pin_memory"] is False
    pinned_loader(Loader, True)([], pin_memory=False)  # a caller's own choice is kept
    assert seen["pin_memory"] is False
    assert pinned_loader(webdataset.WebLoader, False).__name__ == "WebLoader"


def test_evaluation_decodes_on_every_core_but_one_on_a_gpu_and_two_on_a_cpu(monkeypatch):
    import evaluation.image_stream as evaluate

    monkeypatch.setattr(evaluate, "usable_cores", lambda: 16)
    assert evaluate.decode_threads(-1, "cpu") == 2
    assert evaluate.decode_threads(-1, "cuda:0") == 15
    assert evaluate.decode_threads(4, "cuda") == 4 and evaluate.decode_threads(0, "cuda") == 0


def test_inference_is_fp32_on_a_cpu_and_bf16_autocast_on_a_gpu():
    import torch

    from evaluation.clip_features import autocast_dtype, inference, to_device

    with inference("cpu"):
        assert not torch.is_grad_enabled() and not torch.is_autocast_enabled("cuda")
    batch = torch.zeros(2, 3)
    assert to_device(batch, "cpu") is batch  # no copy on a CPU
    assert autocast_dtype("cpu") is None
    assert autocast_dtype("cuda:0") == autocast_dtype("cuda") == torch.bfloat16


def test_patch_dropout_draws_on_the_tokens_device_and_keeps_a_cpu_runs_bits():
    import open_clip.transformer
    import torch

    from experts.trainer_main import patch_dropout_on_device

    layer = open_clip.transformer.PatchDropout(0.5).train()
    x = torch.randn(4, 17, 8)
    torch.manual_seed(3)
    theirs = layer(x)
    torch.manual_seed(3)
    ours = patch_dropout_on_device(layer, x)
    assert torch.equal(ours, theirs)  # the same draws on a CPU
    # tokens on another device: every index is made there (open_clip's forward mixes in CPU indices)
    meta = patch_dropout_on_device(layer, torch.empty(4, 17, 8, device="meta"))
    assert meta.shape == (4, 1 + 8, 8) and meta.device.type == "meta"
    assert torch.equal(patch_dropout_on_device(layer.eval(), x), x)


def test_torch_compile_caches_live_in_the_run_folder(tmp_path, monkeypatch):
    from experts.launch import compile_cache_env

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    env = compile_cache_env(tmp_path / "compile_cache")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile_cache")
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/scratch/mine")
    assert compile_cache_env(tmp_path)["TORCHINDUCTOR_CACHE_DIR"] == "/scratch/mine"  # the user's choice kept
