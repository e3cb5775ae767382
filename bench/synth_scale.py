"""`moda synth` at scale: time and peak memory at two sizes ten times apart.

Peer, named: the same generator at a tenth of the size. Prints images/s and
peak RSS for each, and the ratio of the larger's peak RSS to the smaller's
(the generator holds one sample at a time plus 448 bytes a training image
for the held-out novelty check, so the ratio should stay near 1 while the
data grows tenfold), and how many held-out draws were redrawn because they
were a near-duplicate of a training image.

    python bench/synth_scale.py --small 20000 --factor 10     # 200,000 pairs
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(samples: int, out: Path) -> None:
    """Generate `samples` pairs into `out`; print seconds, peak RSS and the redraw count."""
    import pipelines.synth.generate as generator
    from pipelines.core.config import SynthConfig

    draws = {"n": 0}
    original_is_new = generator.Thumbnails.is_new

    def is_new(self, image):
        draws["n"] += 1
        return original_is_new(self, image)

    generator.Thumbnails.is_new = is_new
    t0 = time.perf_counter()
    summary = generator.generate(SynthConfig(num_train=samples, shard_size=1000), out)
    seconds = time.perf_counter() - t0
    held_out = sum(summary["eval"].values()) + sum(summary.get("val", {}).values())
    print(json.dumps({"samples": samples, "seconds": round(seconds, 1),
                      "images_per_second": round((samples + held_out) / seconds, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "held_out": held_out, "novelty_checks": draws["n"],
                      "redrawn": draws["n"] - held_out}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=20000)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.out))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="moda-synth-bench-") as tmp:
        for samples in (args.small, args.small * args.factor):
            run = subprocess.run([sys.executable, __file__, "--child", str(samples), "--out", f"{tmp}/{samples}"],
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    small, large = results
    print(f"peak RSS {small['peak_rss_mb']} MB at {small['samples']} pairs, {large['peak_rss_mb']} MB at "
          f"{large['samples']} ({large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x for {args.factor}x the data)")
    print(f"speed {large['images_per_second']} images/s at {large['samples']} pairs, "
          f"{large['images_per_second'] / small['images_per_second']:.2f}x the smaller run's")
    print(f"held-out draws redrawn as near-duplicates of training images: {large['redrawn']} of "
          f"{large['novelty_checks']} checks at {large['samples']} pairs")


if __name__ == "__main__":
    main()
