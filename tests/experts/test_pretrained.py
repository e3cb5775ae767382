"""A pretrained CLIP as the seed (train.seed_checkpoint): open_clip's NAME:TAG names and hf-hub: ids
resolved by open_clip's own loader, offline from a Hugging Face cache (made here, in the hub's
layout); .safetensors files; the QuickGELU/GELU mistake refused in one line."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from experts.pretrained import PretrainedSeed, check_model_matches, parse_pretrained, seed_architecture

ROOT = Path(__file__).resolve().parents[2]


def hub_cache(cache: Path, repo: str, folder: Path, commit: str = "0" * 40) -> None:
    """A model as `huggingface_hub` caches it: models--org--name/{refs/main, snapshots/<commit>/...}."""
    base = cache / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copyfile(folder / name, snapshot / name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache under a temporary HF_HOME, offline (as on a cluster without internet)."""
    import huggingface_hub.constants as hf

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))  # read when the library was imported
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    return cache


def tiny_folder(folder: Path, **changes) -> dict:
    from open_clip.model import CLIP

    from experts.models import model_config_dict, write_model_folder

    cfg = {**model_config_dict(str(ROOT / "experts" / "model_configs" / "moda-tiny.json")), **changes}
    torch.manual_seed(0)
    write_model_folder(folder, cfg, CLIP(**cfg).state_dict())
    return cfg


def test_a_seed_names_a_pretrained_model_or_a_path():
    assert parse_pretrained("ViT-B-32:laion2b_s34b_b79k") == PretrainedSeed("ViT-B-32", "laion2b_s34b_b79k")
    assert parse_pretrained("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K").hub
    assert str(parse_pretrained("ViT-B-16-quickgelu:metaclip_400m")) == "ViT-B-16-quickgelu:metaclip_400m"
    for path in ("runs/x/train/logs/seed/checkpoints/epoch_2.pt", "seed.safetensors", "local-dir:/models/seed",
                 "/abs/dir", ""):
        assert parse_pretrained(path) is None, path
    with pytest.raises(ValueError, match="needs a repository"):
        parse_pretrained("hf-hub:")


def test_openai_weights_on_a_gelu_architecture_are_refused_naming_the_quickgelu_model():
    with pytest.raises(ValueError) as err:
        seed_architecture(PretrainedSeed("ViT-B-32", "openai"))
    assert str(err.value) == ("train.seed_checkpoint: the openai weights were trained with QuickGELU but "
                              "ViT-B-32 builds GELU: use ViT-B-32-quickgelu:openai")
    assert seed_architecture(PretrainedSeed("ViT-B-32-quickgelu", "openai"))["quick_gelu"] is True
    assert not seed_architecture(PretrainedSeed("ViT-B-32", "laion2b_s34b_b79k")).get("quick_gelu", False)
    with pytest.raises(ValueError, match="ViT-B-32-quickgelu has no pretrained tag 'laion2b_s34b_b79k'; its tags: "
                                         "openai"):  # open_clip lists GELU weights under the GELU name only
        seed_architecture(PretrainedSeed("ViT-B-32-quickgelu", "laion2b_s34b_b79k"))


def test_an_unknown_tag_or_model_is_named_with_what_exists():
    with pytest.raises(ValueError, match=r"ViT-B-32 has no pretrained tag 'laion5b'; its tags: .*laion2b_s34b_b79k"):
        seed_architecture(PretrainedSeed("ViT-B-32", "laion5b"))
    with pytest.raises(ValueError, match="'ViT-Q-99' is not an open_clip model"):
        seed_architecture(PretrainedSeed("ViT-Q-99", "x"))


def test_a_train_model_that_contradicts_the_seed_is_refused_and_the_default_defers_to_it():
    seed = PretrainedSeed("ViT-B-32-quickgelu", "openai")
    seed_cfg = seed_architecture(seed)
    gelu = {k: v for k, v in seed_cfg.items() if k != "quick_gelu"}
    check_model_matches("experts/model_configs/moda-tiny.json", "experts/model_configs/moda-tiny.json",
                        {"embed_dim": 1}, seed_cfg, seed)  # the default: the seed's architecture, no complaint
    with pytest.raises(ValueError, match="train.model ViT-B-32 builds GELU but the seed ViT-B-32-quickgelu:openai "
                                         "was trained with QuickGELU: use train.model: ViT-B-32-quickgelu"):
        check_model_matches("ViT-B-32", "default.json", gelu, seed_cfg, seed)
    with pytest.raises(ValueError, match="is not the architecture of the seed"):
        check_model_matches("ViT-L-14", "default.json", {**seed_cfg, "embed_dim": 768}, seed_cfg, seed)


def test_a_hub_model_missing_from_the_offline_cache_is_named_with_the_fix(offline_hub):
    with pytest.raises(FileNotFoundError, match="hf-hub:nobody/none has no open_clip_config.json in the Hugging "
                                                "Face cache .*huggingface-cli download nobody/none"):
        seed_architecture(PretrainedSeed("hf-hub:nobody/none"))


def test_a_hub_model_is_read_offline_from_the_cache_by_open_clip(offline_hub, tmp_path):
    from safetensors.torch import load_file

    from experts.pretrained import seed_state_dict

    cfg = tiny_folder(tmp_path / "model", quick_gelu=True)
    hub_cache(offline_hub, "moda-test/tiny-clip", tmp_path / "model")
    seed = parse_pretrained("hf-hub:moda-test/tiny-clip")
    assert seed_architecture(seed) == cfg  # the architecture comes from the source, QuickGELU included
    saved, loaded = load_file(str(tmp_path / "model" / "open_clip_model.safetensors")), seed_state_dict(seed)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_a_safetensors_file_is_a_seed_of_weights_only(tmp_path):
    from safetensors.torch import load_file

    from experts.models import given_seed, write_model_folder
    from pipelines.core.layout import RunLayout

    cfg = tiny_folder(tmp_path / "model")
    layout = RunLayout(tmp_path / "run")
    write_model_folder(layout.model_config, cfg)  # the run's architecture, as the train stage writes it first
    ckpt, epoch = given_seed(str(tmp_path / "model" / "open_clip_model.safetensors"), layout)
    assert (ckpt, epoch) == (layout.seed_init.resolve(), 0)
    saved = load_file(str(tmp_path / "model" / "open_clip_model.safetensors"))
    exported = load_file(str(layout.model("seed") / "open_clip_model.safetensors"))
    assert all(torch.equal(saved[k], exported[k]) for k in saved)
    with pytest.raises(FileNotFoundError, match=r"train.seed_checkpoint: .*missing.safetensors not found"):
        given_seed(str(tmp_path / "missing.safetensors"), layout)


def test_a_pretrained_tag_brings_its_own_preprocessing_and_the_defaults_stay_implicit():
    from experts.pretrained import full_preprocess, seed_preprocess

    assert seed_preprocess("ViT-B-16-SigLIP:webli") == {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"}
    assert seed_preprocess("ViT-B-32:laion2b_s34b_b79k") == {}  # OpenAI's mean/std: a run keeps its files
    assert seed_preprocess("") == {} and seed_preprocess("runs/x/epoch_3.pt") == {}
    full = full_preprocess({"vision_cfg": {"image_size": 64}}, {"resize_mode": "squash"})
    assert full["size"] == 64 and full["resize_mode"] == "squash" and full["interpolation"] == "bicubic"


@pytest.mark.slow
def test_experts_fine_tune_an_hf_hub_seed_read_offline(tiny_run, tmp_path, offline_hub):
    """The train stage with `seed_checkpoint: hf-hub:...`: no seed trained, the run's architecture
    the hub model's (QuickGELU here, which train.model's default lacks), the experts started from
    the hub's weights, nothing fetched (offline)."""
    from safetensors.torch import load_file

    from experts.models import read_model_config, read_preprocess
    from pipelines.core.config import load_config
    from pipelines.run.stages import run_stage

    from conftest import write_config

    seed_folder = tiny_run["run_dir"] / "train" / "seed"
    hub_folder = tmp_path / "published"
    shutil.copytree(seed_folder, hub_folder)
    arch = read_model_config(hub_folder)
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"}  # SigLIP's
    (hub_folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {**arch, "quick_gelu": True}, "preprocess_cfg": preprocess}))
    hub_cache(offline_hub, "moda-test/tiny-seed", hub_folder)
    config = write_config(tmp_path / "c.yaml", Path(load_config(tiny_run["config"]).synth.out_dir),
                          train={"seed_checkpoint": "hf-hub:moda-test/tiny-seed", "expert_init": "weights",
                                 "expert_epochs": 1, "baseline": False, "batch_size": 16, "warmup": 2})
    run = tmp_path / "run"
    run.mkdir()
    for stage in ("embed", "cluster", "split"):
        os.symlink(tiny_run["run_dir"] / stage, run / stage)
    manifest = run_stage("train", load_config(config), run)
    assert read_model_config(run / "train" / "model_config")["quick_gelu"] is True
    for model in ("model_config", "seed", "expert_000", "expert_001"):  # trained and exported with the hub's
        assert read_preprocess(run / "train" / model) == preprocess, model
    assert not (run / "train" / "seed.log").exists()  # no seed trained
    hub = load_file(str(hub_folder / "open_clip_model.safetensors"))
    seed = load_file(str(run / "train" / "seed" / "open_clip_model.safetensors"))
    assert all(torch.equal(hub[k], seed[k]) for k in hub)
    log = (run / "train" / "expert_000.log").read_text()
    assert "loaded checkpoint" in log and "Start epoch 0" in log
    assert manifest["counts"]  # the stage finished and wrote its manifest


def test_the_finetune_preset_starts_experts_from_pretrained_weights_at_a_fine_tuning_rate():
    from experts.train import model_config
    from pipelines.core.config import TrainConfig, load_config

    cfg = load_config(ROOT / "configs" / "finetune.yaml").train
    arch = model_config(cfg)  # the seed's architecture, from open_clip's tables (nothing fetched)
    assert arch["vision_cfg"]["patch_size"] == 32 and not arch.get("quick_gelu", False)
    assert cfg.expert_init == "weights" and cfg.lr <= TrainConfig.lr / 10 and cfg.patch_dropout == 0
