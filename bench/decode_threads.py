"""Decoding a shard's images on a thread pool against decoding them one at a time.

    .venv/bin/python bench/decode_threads.py [--samples 5000] [--image-size 256] [--repeats 3] [--threads 0]

Peer, named: `experts.images.sample_outputs(..., threads=1)`, the one-thread
loop the split ran before, on the same samples. Measured: the same call with
`threads` (0 = every usable core), shard by shard (1,000 samples) as the
split calls it, in `validate: decode` mode (every image is decoded). Prints
samples/s of both and their ratio; the answers are checked to be identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from split_throughput import make_input

    from experts.images import sample_outputs
    from pipelines.core.devices import usable_cores
    from pipelines.shardio.shards import iter_samples

    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: every usable core")
    args = parser.parse_args()
    threads = args.threads or usable_cores()
    with tempfile.TemporaryDirectory() as tmp:
        shards = [list(iter_samples(path)) for path in make_input(Path(tmp), args.samples, args.image_size)]

    def run(count: int) -> tuple[float, list]:
        t0 = time.perf_counter()
        answers = [sample_outputs(shard, "decode", count) for shard in shards]
        return time.perf_counter() - t0, answers

    serial, pooled = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        seconds, one = run(1)
        serial.append(seconds)
        seconds, many = run(threads)
        pooled.append(seconds)
        assert many == one, "the pool changed an answer"
    one_s, many_s = statistics.median(serial), statistics.median(pooled)
    print(f"one thread: {args.samples / one_s:,.0f} samples/s; {threads} threads: {args.samples / many_s:,.0f} "
          f"samples/s ({args.samples} samples, {args.image_size} px, validate=decode)")
    print(f"thread pool vs one thread (samples/s ratio): {one_s / many_s:.2f}x")


if __name__ == "__main__":
    main()
