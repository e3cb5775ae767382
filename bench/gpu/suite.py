"""The one-call GPU suite: what moda does on one H100/H200, measured against the peer each figure names.

    bash bench/gpu/run.sh OUT            # on a lent device (wheels carried: bench/gpu/wheels.txt)
    bash bench/gpu/run.sh --smoke OUT    # the same code paths at toy sizes on a CPU (a CI test runs it)

Why one script (and why it is over 400 lines): a device is lent by chance, for minutes, to whichever
issue draws it; whatever is to be measured there must be ready, tested and cheap to start. Each
step gets a time cap from what is left of `--budget-s`, its result is written
(OUT/gpu_<device>_<date>.json and .md) as soon as it ends, and a step cut short or failing is
recorded and the suite goes on, so a killed call still brings back every finished step.

Steps, in order of what a first GPU run most needs to know:
- env: device, driver, torch and CUDA versions, the packages moda runs with.
- embed: captions/s of moda's encode (clustering/encoder.py, what the embed stage calls) against
  plain `SentenceTransformer.encode` (convert_to_numpy) on the same captions, bf16, same batch,
  interleaved repeats, for a MiniLM-size and a BERT-base-size encoder (random weights from a
  config: speed does not depend on them).
- attention: which SDPA kernel each tower runs (torch.profiler kernel names) for ViT-B/16.
- train: samples/s (open_clip_train's own per-batch figure after warm-up), MFU (experts/flops.py
  FLOPs per sample on the real model over the card's bf16 peak) and data-loader wait of experts
  trained through moda's launcher (experts/launch.py), patch dropout 0 and 0.5, torch.compile,
  LAMB; and the launcher against `python -m open_clip_train.main` by hand, wall clock from launch
  to final checkpoint.
- assign: the balanced assignment's candidate search and nearest-centre assignment on the GPU
  (clustering/kmeans.py CentreSearch, torch) against the CPU (FAISS), 1M x 384 into 1,024 centres.
- e2e: every stage, embed to report, through `moda stage` on a small synthetic set, its
  manifests kept (OUT/manifests.json).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM), FLOP/s
RATE = re.compile(r"Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+), ([\d.]+)/s,")
CARRY_LIMIT = 64 * 2**20  # what the device tool carries: the working tree plus the wheels

# Sizes: the real run on a device, and the smoke run on a CPU (same code paths, toy sizes).
SIZES = {
    "gpu": {"captions": 100_000, "embed_models": {"minilm": (384, 6, 12, 1536), "bert-base": (768, 12, 12, 3072)},
            "embed_batch": 512, "repeats": 3, "train_models": ["ViT-B-32", "ViT-B-16"], "train_samples": 20_480,
            "train_batch": 256, "image_size": 224, "points": 1_000_000, "dim": 384, "centres": 1024,
            "e2e_pairs": 8000, "workers": 8},
    "smoke": {"captions": 256, "embed_models": {"minilm": (32, 2, 2, 64)}, "embed_batch": 64, "repeats": 2,
              "train_models": ["moda-micro"], "train_samples": 96, "train_batch": 16, "image_size": 32,
              "points": 4000, "dim": 32, "centres": 64, "e2e_pairs": 240, "workers": 1},
}


class Suite:
    """The steps' shared state: where results go, the time left, the sizes."""

    def __init__(self, out: Path, smoke: bool, budget_s: float):
        import torch

        self.out, self.smoke, self.deadline = out, smoke, time.monotonic() + budget_s
        self.sizes = SIZES["smoke" if smoke else "gpu"]
        self.cuda = torch.cuda.is_available() and not smoke
        self.device = "cuda" if self.cuda else "cpu"
        name = torch.cuda.get_device_name(0) if self.cuda else "cpu"
        self.card = next((k for k in PEAK_BF16 if k in name), None)
        self.slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") if self.cuda else "cpu"
        self.stem = f"gpu_{self.slug}_{datetime.date.today().isoformat()}"
        self.work = Path(os.environ.get("MODA_GPU_WORK", "/tmp/moda-gpu-suite"))
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.results: dict = {"device": self.device, "card": name, "smoke": smoke, "steps": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, step, share: float) -> None:
        """Run `step` with `share` of the time left as its cap (recorded, never fatal)."""
        cap = max(5.0, self.left() * share)
        started = time.monotonic()
        print(f"[suite] {name}: up to {cap:.0f} s ({self.left():.0f} s left)", flush=True)
        if self.left() < 5:
            self.results["steps"][name] = {"status": "skipped: no time left"}
        else:
            try:
                self.results["steps"][name] = {"status": "ok", **step(self, cap)}
            except Exception as err:  # a step's failure is a finding; the next step still runs
                self.results["steps"][name] = {"status": f"failed: {type(err).__name__}: {err}",
                                               "traceback": traceback.format_exc()[-3000:]}
        self.results["steps"][name]["seconds"] = round(time.monotonic() - started, 1)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.stem}.json").write_text(json.dumps(self.results, indent=2, default=str))
        (self.out / f"{self.stem}.md").write_text(markdown(self.results))


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "torchvision", "open_clip_torch", "webdataset", "faiss-cpu", "sentence-transformers",
                 "transformers", "timm", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def step_env(suite: Suite, cap: float) -> dict:
    import torch

    smi = shutil.which("nvidia-smi")
    driver = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=cap).stdout.strip() if smi else None
    carried = sum(p.stat().st_size for p in (ROOT / ".whl").glob("*.whl")) if (ROOT / ".whl").is_dir() else 0
    tree = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True).stdout.split(b"\0")
    tracked = sum((ROOT / p.decode()).stat().st_size for p in tree if p and (ROOT / p.decode()).is_file())
    return {"python": platform.python_version(), "torch_cuda": torch.version.cuda, "nvidia_smi": driver,
            "cpu_cores": os.cpu_count(), "versions": versions(), "carried_bytes": carried + tracked,
            "carry_within_64MiB": carried + tracked <= CARRY_LIMIT}


def random_encoder(folder: Path, hidden: int, layers: int, heads: int, ffn: int, words: list[str]) -> Path:
    """A BERT encoder of that size with random weights and a word-level vocabulary, as a local folder
    that moda's `embed.model` (pooling: mean) and sentence-transformers load offline."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=128)
              ).save_pretrained(folder)
    return folder


def synth_captions(count: int) -> list[str]:
    from pipelines.core.config import SynthConfig
    from pipelines.synth.generate import _draw_train

    cfg = SynthConfig(num_train=count, image_size=16)
    return [_draw_train(cfg, i).caption for i in range(count)]


def interleaved(a, b, repeats: int, cap: float) -> tuple[list[float], list[float]]:
    """Seconds of a() and b() run A B A B ... (drift on the machine hits both alike), within `cap`."""
    ta, tb, end = [], [], time.monotonic() + cap
    for _ in range(repeats):
        for fn, times in ((a, ta), (b, tb)):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        if time.monotonic() > end:
            break
    return ta, tb


def embed_rates(encoder, captions: list[str], batch: int, repeats: int, cap: float) -> dict:
    """moda's encode against plain encode on one encoder: interleaved, per-pair ratios."""
    from clustering.encoder import encode

    encode(encoder, captions[:batch], batch)  # warm-up: kernels, allocator
    ta, tb = interleaved(lambda: encode(encoder, captions, batch),
                         lambda: encoder.encode(captions, batch_size=batch, convert_to_numpy=True,
                                                normalize_embeddings=True), repeats, cap)
    ratios = [b / a for a, b in zip(ta, tb)]
    return {"moda_captions_per_s": round(len(captions) / statistics.median(ta)),
            "plain_encode_captions_per_s": round(len(captions) / statistics.median(tb)),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)], "pairs": len(ratios), "batch": batch}


def step_embed(suite: Suite, cap: float) -> dict:
    import torch

    from clustering.encoder import load_encoder

    captions = synth_captions(suite.sizes["captions"])
    words = [w for c in captions for w in c.lower().replace(",", " ").replace(".", " ").split()]
    out, end = {}, time.monotonic() + cap
    for name, shape in suite.sizes["embed_models"].items():
        folder = random_encoder(suite.work / f"encoder-{name}", *shape, words)
        encoder = load_encoder(str(folder), "mean", suite.device, "bf16" if suite.cuda else "fp32")
        out[name] = {**embed_rates(encoder, captions, suite.sizes["embed_batch"], suite.sizes["repeats"],
                                   max(1.0, end - time.monotonic()) / 2),
                     "precision": "bf16" if suite.cuda else "fp32", "shape": shape}
        if suite.cuda:
            torch.cuda.empty_cache()
    return out


def model_cfg_of(name: str, image_size: int | None = None) -> dict:
    from experts.models import model_config_dict

    spec = str(ROOT / "experts" / "model_configs" / f"{name}.json") if name.startswith("moda-") else name
    cfg = model_config_dict(spec)
    if image_size is not None and name.startswith("moda-"):
        cfg = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "image_size": image_size}}
    return cfg


def step_attention(suite: Suite, cap: float) -> dict:
    """The kernels each tower's attention ran, from the profiler (forward and backward, bf16)."""
    import open_clip
    import torch
    from torch.profiler import ProfilerActivity, profile

    name = suite.sizes["train_models"][-1]
    model = open_clip.model.CLIP(**model_cfg_of(name, suite.sizes["image_size"])).to(suite.device).train()
    size = model.visual.image_size if hasattr(model.visual, "image_size") else (224, 224)
    images = torch.randn(8, 3, *size, device=suite.device)
    tokens = torch.randint(0, 49408, (8, model.context_length), device=suite.device)
    activities = [ProfilerActivity.CUDA] if suite.cuda else [ProfilerActivity.CPU]
    out = {}
    for tower, run in (("image", lambda: model.encode_image(images)), ("text", lambda: model.encode_text(tokens))):
        with torch.autocast(suite.device, dtype=torch.bfloat16, enabled=suite.cuda), \
                profile(activities=activities) as prof:
            run().float().sum().backward()
        names = [e.key for e in prof.key_averages()]
        attention = sorted({n for n in names if re.search(r"flash|fmha|efficient|attention|sdpa|cudnn_attn", n,
                                                          re.I)})
        out[tower] = {"kernels": attention[:12],
                      "flash": any(re.search(r"flash", n, re.I) for n in attention),
                      "memory_efficient": any(re.search(r"efficient|fmha_cutlass", n, re.I) for n in attention)}
    return {"model": name, **out}


def train_data(suite: Suite) -> tuple[str, int]:
    """The training shards at the suite's image size, written once by moda's generator on every core."""
    from pipelines.core.config import SynthConfig
    from pipelines.synth.generate import generate_train

    folder = suite.work / "train-data"
    if not (folder / "sizes.json").is_file():
        cfg = SynthConfig(num_train=suite.sizes["train_samples"], image_size=suite.sizes["image_size"],
                          shard_size=max(64, suite.sizes["train_samples"] // 16))
        generate_train(cfg, folder, processes=os.cpu_count() or 1)
    shards = sorted(folder.glob("*.tar"))
    return "::".join(str(p) for p in shards), suite.sizes["train_samples"]


@functools.cache
def model_flops(model_cfg_json: str, batch_size: int) -> float:
    """Training FLOPs a sample (experts/flops.py, counted once per architecture: each count builds the
    model on the CPU and runs it four times, seconds for a ViT-B)."""
    from experts.flops import flops_per_sample

    return flops_per_sample(json.loads(model_cfg_json), batch_size)["masked"]


def train_once(suite: Suite, model: str, variant: dict, by_hand: bool, cap: float, tag: str) -> dict:
    """One expert-like training through moda's launcher (or open_clip_train.main by hand): rates
    from its log, wall clock from launch to the final checkpoint."""
    from experts.launch import TRAINER, run_trainer, trainer_command
    from experts.models import write_model_folder
    from pipelines.core.config import TrainConfig

    data, samples = train_data(suite)
    cfg = TrainConfig(batch_size=suite.sizes["train_batch"], warmup=10, workers=suite.sizes["workers"],
                      patch_dropout=variant.get("patch_dropout", 0.0), optimizer=variant.get("optimizer", "adamw"),
                      torchcompile=variant.get("compile", False), unmasked_tune_share=0.0, keep_checkpoints="needed",
                      lr=1e-3 if variant.get("optimizer") == "lamb" else 5e-4)
    model_cfg = model_cfg_of(model, suite.sizes["image_size"])
    if cfg.patch_dropout:
        model_cfg = {**model_cfg, "vision_cfg": {**model_cfg["vision_cfg"], "patch_dropout": cfg.patch_dropout}}
    arch = suite.work / f"arch-{tag}"
    write_model_folder(arch, model_cfg)
    logs = suite.work / f"logs-{tag}"
    cmd = trainer_command(cfg, model_spec=f"local-dir:{arch}", train_data=data, num_samples=samples, logs=logs,
                          name="run", epochs=1, resume=None, device=suite.device)
    log = suite.work / f"{tag}.log"
    if by_hand:
        cmd[cmd.index(TRAINER)] = "open_clip_train.main"
    # `timeout` caps both alike (a torch.compile that outlasts the step's time ends the run, not the suite)
    cmd = ["timeout", "-s", "KILL", str(int(cap)), *cmd]
    started = time.perf_counter()
    if by_hand:
        with open(log, "w") as sink:
            subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, check=True,
                           env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"} if suite.cuda else None)
    else:
        run_trainer(cmd, log, ["0"] if suite.cuda else None)
    wall = time.perf_counter() - started
    lines = RATE.findall(log.read_text())[1:] or RATE.findall(log.read_text())  # after the first (warm-up)
    rate = statistics.median(float(r) for _, _, r in lines)
    data_wait = statistics.median(float(d) / float(b) for d, b, _ in lines if float(b) > 0)
    out = {**variant, "by_hand": by_hand, "wall_s": round(wall, 1), "samples_per_s": round(rate, 1),
           "data_wait_share": round(data_wait, 3),
           "checkpoint": (logs / "run" / "checkpoints" / "epoch_1.pt").is_file()}
    flops = model_flops(json.dumps(model_cfg, sort_keys=True), cfg.batch_size)
    out["tflops_per_s"] = round(rate * flops / 1e12, 1)
    if suite.card:
        out["mfu"] = round(rate * flops / PEAK_BF16[suite.card], 3)
    return out


def step_train(suite: Suite, cap: float) -> dict:
    models = suite.sizes["train_models"]
    big, small = models[-1], models[0]
    plan = [("plain", big, {}, False), ("patch_dropout=0.5", big, {"patch_dropout": 0.5}, False),
            ("by_hand", big, {}, True)]
    if not suite.smoke:  # torch.compile and LAMB: the GPU's figures (on a CPU they only cost minutes)
        plan += [("compile", big, {"compile": True}, False), ("lamb", big, {"optimizer": "lamb"}, False)]
    if small != big:
        plan.append(("plain", small, {}, False))
    runs, end = [], time.monotonic() + cap
    for i, (label, model, variant, by_hand) in enumerate(plan):
        left = end - time.monotonic()
        row = {"run": label, "model": model}
        if left < 10:
            runs.append({**row, "status": "skipped: the step's time was used"})
            continue
        try:
            runs.append({**row, **train_once(suite, model, variant, by_hand, left, f"train{i}")})
        except Exception as err:
            runs.append({**row, "status": f"failed: {type(err).__name__}: {err}"})
    done = {(r["run"], r["model"]): r for r in runs if "samples_per_s" in r}
    base, summary = done.get(("plain", big)), {}
    if base and ("patch_dropout=0.5", big) in done:
        summary["patch_dropout_0.5_speedup"] = round(done[("patch_dropout=0.5", big)]["samples_per_s"]
                                                     / base["samples_per_s"], 2)
    if base and ("by_hand", big) in done:  # > 1: moda's launch took less wall time than by hand
        summary["launcher_wall_ratio_hand_over_moda"] = round(done[("by_hand", big)]["wall_s"] / base["wall_s"], 3)
    return {"runs": runs, "summary": summary}


def step_assign(suite: Suite, cap: float) -> dict:
    import math

    import numpy as np

    from clustering.kmeans import balanced_assign, normalize_rows
    from clustering.search import CentreSearch

    rng = np.random.default_rng(0)
    n, d, k = suite.sizes["points"], suite.sizes["dim"], suite.sizes["centres"]
    x = normalize_rows(rng.normal(size=(n, d)).astype(np.float32))
    centres = normalize_rows(x[rng.choice(n, k, replace=False)] + 0.1 * rng.normal(size=(k, d)).astype(np.float32))
    capacity = np.full(k, math.ceil(n / k * 1.05), dtype=np.int64)
    out = {"points": n, "dim": d, "centres": k}
    engines = [("cpu_faiss", "cpu", "faiss"), ("torch_" + suite.device, suite.device, "torch")]
    labels = {}
    for name, device, engine in engines:
        search = CentreSearch(centres, device, engine)
        search.top(x[:1024], 8)  # warm-up (upload, kernels)
        started = time.perf_counter()
        search.top(x, 1)
        nearest = time.perf_counter() - started
        started = time.perf_counter()
        labels[name] = balanced_assign(x, centres, capacity, 8, search)
        balanced = time.perf_counter() - started
        out[name] = {"nearest_s": round(nearest, 3), "balanced_assign_s": round(balanced, 3)}
    gpu, cpu = out[engines[1][0]], out["cpu_faiss"]
    out["speedup_nearest"] = round(cpu["nearest_s"] / gpu["nearest_s"], 2)
    out["speedup_balanced"] = round(cpu["balanced_assign_s"] / gpu["balanced_assign_s"], 2)
    out["same_assignments_share"] = float((labels["cpu_faiss"] == labels[engines[1][0]]).mean())
    return out


def step_e2e(suite: Suite, cap: float) -> dict:
    """Every stage through `moda stage`, on a small synthetic set, the manifests kept."""
    import yaml

    from pipelines.core.config import SynthConfig
    from pipelines.synth.generate import generate

    data = suite.work / "e2e-data"
    generate(SynthConfig(out_dir=str(data), num_train=suite.sizes["e2e_pairs"], shard_size=max(80, suite.sizes[
        "e2e_pairs"] // 8), eval_per_class=4, val_per_class=4, retrieval_pairs=40), data,
        processes=os.cpu_count() or 1)
    encoder = suite.work / "encoder-minilm"
    if not encoder.is_dir():
        random_encoder(encoder, *SIZES["smoke"]["embed_models"]["minilm"], synth_captions(200))
    config = {"name": "gpu-e2e", "data": {"train_shards": str(data / "train"), "eval_tasks": str(data / "eval"),
                                          "val_tasks": str(data / "val")},
              "embed": {"model": str(encoder), "pooling": "mean", "batch_size": 256},
              "cluster": {"num_fine": 16, "num_experts": 2, "niter": 6, "balance_iters": 2},
              "split": {"shard_size": 200},
              "train": {"model": str(ROOT / "experts/model_configs/moda-tiny.json"), "seed_epochs": 1,
                        "expert_epochs": 1, "batch_size": 32 if suite.smoke else 256, "warmup": 5,
                        "patch_dropout": 0.0, "unmasked_tune_share": 0.0, "workers": 1,
                        "models_per_gpu": 1 if suite.smoke else 2},
              "report": {"resamples": 200}}
    path = suite.work / "e2e.yaml"
    path.write_text(yaml.safe_dump(config))
    run, stages, end = suite.work / "e2e-run", {}, time.monotonic() + cap
    for stage in ("embed", "cluster", "split", "train", "evaluate", "report"):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipelines.run.cli", "stage", stage, str(path),
                               "--run-dir", str(run)], capture_output=True, text=True, cwd=ROOT,
                              timeout=max(5.0, end - time.monotonic()))
        stages[stage] = {"seconds": round(time.perf_counter() - started, 1), "exit": proc.returncode}
        if proc.returncode:
            stages[stage]["error"] = (proc.stderr or proc.stdout)[-1500:]
            break
    manifests = {p.parent.name: json.loads(p.read_text()) for p in sorted(run.glob("*/manifest.json"))}
    (suite.out / "manifests.json").write_text(json.dumps(manifests, indent=1, default=str))
    embed = manifests.get("embed", {}).get("counts", {})
    return {"stages": stages, "all_ran": all(s["exit"] == 0 for s in stages.values()) and len(stages) == 6,
            "embed_stage_captions_per_s": embed.get("captions_per_second"),
            "train_device": manifests.get("train", {}).get("device"),
            "train_gpu_slots": manifests.get("train", {}).get("gpu_slots")}


def markdown(results: dict) -> str:
    """The results as the page committed under bench/results/ (the JSON beside it holds everything)."""
    lines = [f"# GPU suite: {results['card']} ({'smoke, CPU' if results['smoke'] else results['device']})", "",
             "Made by `bash bench/gpu/run.sh" + (" --smoke" if results["smoke"] else "")
             + " OUT` (bench/gpu/suite.py); every figure below is from this run. Step status and seconds first.", ""]
    for name, step in results["steps"].items():
        lines.append(f"## {name}: {step.get('status')} ({step.get('seconds', '?')} s)")
        body = {k: v for k, v in step.items() if k not in ("status", "seconds", "traceback")}
        lines += ["```", json.dumps(body, indent=1, default=str)[:6000], "```", ""]
    return "\n".join(lines)


# Order: what a first GPU run most needs first (every stage running on the GPU, then the trainer's
# figures); each step's cap is its share of the time left when it starts.
STEPS = [("env", step_env, 0.05), ("attention", step_attention, 0.1), ("embed", step_embed, 0.2),
         ("e2e", step_e2e, 0.5), ("train", step_train, 0.75), ("assign", step_assign, 1.0)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on a CPU, the same code paths")
    parser.add_argument("--budget-s", type=float, default=None, help="all steps together (default 520; smoke 300)")
    parser.add_argument("--steps", default=",".join(name for name, _, _ in STEPS))
    args = parser.parse_args(argv)
    # smoke: about 110 s of work alone, more inside a loaded test run (e2e once ran out at 102 s)
    suite = Suite(args.out, args.smoke, args.budget_s or (300.0 if args.smoke else 520.0))
    if not suite.smoke and not suite.cuda:
        print("bench/gpu/run.sh: no CUDA device here; run it with --smoke on a CPU", file=sys.stderr)
        return 2
    for name, step, share in STEPS:
        if name in args.steps.split(","):
            suite.run(name, step, share)
    failed = [n for n, s in suite.results["steps"].items() if s["status"] != "ok"]
    print(f"[suite] wrote {suite.out / suite.stem}.json and .md; steps not ok: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
