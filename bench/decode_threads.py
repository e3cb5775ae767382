"""Decoding a shard's images on a thread pool against decoding them one at a time.

    .venv/bin/python bench/decode_threads.py [--samples 5000] [--image-size 256] [--repeats 5] [--threads 0]

Peer, named: `experts.split.images.sample_outputs(..., threads=1)`, the one-thread
loop the split ran before, on the same samples. Measured: the same call with
`threads` (0 = every usable core), shard by shard (1,000 samples) as the
split calls it, in `validate: decode` mode (every image is decoded). Prints
samples/s of both (medians) and the per-pair ratio over interleaved pairs of alternating order
(bench/pairs.py), median and range; the answers are checked to be identical.
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
from bench.pairs import Ratio, alternate  # noqa: E402


def main() -> None:
    from split_throughput import make_input

    from experts.split.images import sample_outputs
    from pipelines.core.devices import usable_cores
    from pipelines.shardio.shards import iter_samples

    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved pairs")
    parser.add_argument("--threads", type=int, default=0, help="0: every usable core")
    args = parser.parse_args()
    threads = args.threads or usable_cores()
    with tempfile.TemporaryDirectory() as tmp:
        shards = [list(iter_samples(path)) for path in make_input(Path(tmp), args.samples, args.image_size)]

    def run(count: int) -> tuple[float, list]:
        t0 = time.perf_counter()
        answers = [sample_outputs(shard, "decode", count) for shard in shards]
        return time.perf_counter() - t0, answers

    done = alternate(lambda r: run(1), lambda r: run(threads), args.repeats)
    assert all(many == one for (_, one), (_, many) in done), "the pool changed an answer"
    one_s, many_s = statistics.median(o for (o, _), _ in done), statistics.median(m for _, (m, _) in done)
    print(f"one thread: {args.samples / one_s:,.0f} samples/s; {threads} threads: {args.samples / many_s:,.0f} "
          f"samples/s ({args.samples} samples, {args.image_size} px, validate=decode)")
    print(Ratio("thread pool / one thread samples/s", tuple(o / m for (o, _), (m, _) in done)))


if __name__ == "__main__":
    main()
