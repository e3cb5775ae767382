"""The trainer moda launches: `open_clip_train.main`, with its one unseeded random source seeded.

Why: the same config trained twice gave different models (two demo runs:
digits top-1 11.9 then 6.2 for the same seed model). The cause is
webdataset's sample shuffle, which open_clip_train uses as
`wds.shuffle(bufsize, initial)` without a generator: webdataset then seeds one
from the process id and the clock (`random.Random((pid + time) * 1e9)`), so
every run, and every epoch, sees the samples in another order. Everything else
in open_clip_train is already seeded by `--seed` (model init, patch dropout,
augmentations, shard order, data-loader workers).

Here the shuffle draws its generator's seed from the process's own `random`
module instead, which torch seeds per data-loader worker from `--seed` (and
open_clip_train seeds in the main process when there are no workers). The
order is still shuffled, differently each epoch, but the same config and
seed give the same order, hence the same model on a CPU. open_clip_train's
own code and flags are unchanged: `python -m experts.trainer_main ARGS` is
`python -m open_clip_train.main ARGS` with that one difference.
"""

from __future__ import annotations

import random
import sys

import webdataset
import webdataset.filters


def seeded_shuffle(data, bufsize: int = 1000, initial: int = 100, rng=None, handler=None):
    """webdataset's `_shuffle`, with the generator seeded from `random` when none is given."""
    if rng is None:
        rng = random.Random(random.getrandbits(64))
    return webdataset.filters._shuffle(data, bufsize, initial, rng, handler)


def install() -> None:
    """Make `webdataset.shuffle` (what open_clip_train calls) the seeded shuffle."""
    seeded = webdataset.filters.pipelinefilter(seeded_shuffle)
    webdataset.shuffle = webdataset.filters.shuffle = seeded


def main(argv: list[str] | None = None) -> None:
    install()
    from open_clip_train.main import main as train

    train(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
