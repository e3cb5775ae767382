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
seed give the same order, hence the same model on a CPU.

On a CPU, several trainer processes (gloo) need DistributedDataParallel
without `device_ids`, which open_clip_train always passes (`cpu_ddp`).

On a GPU the webdataset loader pins its batches (`pinned_loader`), as open_clip_train's other
loaders do, and FLIP's patch dropout draws its indices on the GPU (`patch_dropout_on_device`).

A trainer for a model without a Hugging Face text tower (every moda architecture and open_clip's
own ViTs) starts without importing `transformers`: open_clip imports it at its own import when it
is installed (sentence-transformers brings it), about 0.7 s of every launch's ~4.5 s of imports
on this machine, and only HF text towers, HF tokenizers and CoCa's generation use it.

One flag is added: `--moda-stop-after-epoch N` ends the run once epoch N is
saved, inside a schedule of `--epochs` epochs. open_clip_train sizes its
cosine over `--epochs`, so this is how a run trains the first part of a
longer schedule: MoDE's seed is epoch 27 of a 32-epoch run, not a run annealed
to zero at 27, and an expert's masked epochs and its unmasked tune are the
two parts of one schedule, not two schedules. A later run resumed with the
same `--epochs` continues the cosine where this one stopped.

Otherwise open_clip_train's own code and flags are unchanged: `python -m
experts.trainer_main ARGS` is `python -m open_clip_train.main ARGS` (a
leading `--`, which moda puts after the module's name under torchrun, is
dropped).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

# webdataset (and with it torch) is imported where it is used, not here: experts.launch imports
# this module's STOP_FLAG, and every `moda` command and stage process imports experts.launch.


def seeded_shuffle(data, bufsize: int = 1000, initial: int = 100, rng=None, handler=None):
    """webdataset's `_shuffle`, with the generator seeded from `random` when none is given."""
    import webdataset.filters

    if rng is None:
        rng = random.Random(random.getrandbits(64))
    return webdataset.filters._shuffle(data, bufsize, initial, rng, handler)


def install() -> None:
    """Make `webdataset.shuffle` (what open_clip_train calls) the seeded shuffle."""
    import webdataset
    import webdataset.filters

    seeded = webdataset.filters.pipelinefilter(seeded_shuffle)
    webdataset.shuffle = webdataset.filters.shuffle = seeded


STOP_FLAG = "--moda-stop-after-epoch"


def needs_transformers(argv: list[str]) -> bool:
    """Whether the model in `--model` may use Hugging Face transformers: anything but a local-dir
    folder (moda launches those) whose text tower names no HF model or tokenizer and is no CoCa."""
    if "--model" not in argv[:-1]:
        return True
    spec = argv[argv.index("--model") + 1]
    if not spec.startswith("local-dir:"):
        return True
    try:
        cfg = json.loads((Path(spec.removeprefix("local-dir:")) / "open_clip_config.json").read_text())["model_cfg"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    return any(key.startswith("hf_") for key in cfg.get("text_cfg", {})) or "multimodal_cfg" in cfg


class _Stopped(Exception):
    """Raised at the start of the epoch after the last one asked for (its predecessor is saved)."""


def stop_after(argv: list[str]) -> tuple[list[str], int | None]:
    """(open_clip_train's arguments, the epoch to stop after or None)."""
    if STOP_FLAG not in argv:
        return argv, None
    at = argv.index(STOP_FLAG)
    return argv[:at] + argv[at + 2:], int(argv[at + 1])


def cpu_ddp(ddp):
    """DistributedDataParallel that drops `device_ids` for a module on the CPU: open_clip_train passes
    `device_ids=[device]` whatever the device, which DDP refuses for a CPU module (gloo training over
    several CPU processes, how moda's multi-node launch is tested on loopback)."""
    class CpuDDP(ddp):
        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(getattr(d, "type", d) == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)
    CpuDDP.__name__ = CpuDDP.__qualname__ = ddp.__name__
    return CpuDDP


def patch_dropout_on_device(self, x):
    """open_clip's PatchDropout.forward with its random indices drawn on the tokens' device.

    open_clip draws them with `torch.randn(batch, tokens)` and `torch.arange(batch)` on the CPU,
    then indexes GPU tokens with them: a host-to-device copy and a synchronisation every step,
    and a graph break under torch.compile. Here the same draws are made on `x.device`; on a CPU
    they are the same calls, so a CPU run's bits do not change (tests/pipelines/run/test_gpu_choices.py)."""
    import torch

    if not self.training or self.prob == 0.0:
        return x
    if self.exclude_first_token:
        cls_tokens, x = x[:, :1], x[:, 1:]
    batch, num_tokens = x.size()[0], x.size()[1]
    batch_indices = torch.arange(batch, device=x.device)[..., None]
    keep = max(1, int(num_tokens * (1 - self.prob)))
    patch_indices_keep = torch.randn(batch, num_tokens, device=x.device).topk(keep, dim=-1).indices
    x = x[batch_indices, patch_indices_keep]
    if self.exclude_first_token:
        x = torch.cat((cls_tokens, x), dim=1)
    return x


def pinned_loader(loader, pin: bool):
    """webdataset's WebLoader with `pin_memory=pin` unless the caller chose: open_clip_train's
    webdataset loader (the one moda's shards go through) pins nothing, so every batch's host-to-GPU
    copy was a synchronous copy from pageable memory, while its CSV and synthetic loaders pin."""
    class PinnedLoader(loader):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("pin_memory", pin)
            super().__init__(*args, **kwargs)
    PinnedLoader.__name__ = PinnedLoader.__qualname__ = loader.__name__
    return PinnedLoader


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    argv, stop = stop_after(argv[1:] if argv[:1] == ["--"] else argv)  # torchrun passes a `--` on
    if not needs_transformers(argv) and "transformers" not in sys.modules:
        sys.modules["transformers"] = None  # open_clip's `import transformers` fails fast: HF towers off
    install()
    import torch
    import webdataset

    webdataset.WebLoader = pinned_loader(webdataset.WebLoader, torch.cuda.is_available())
    import open_clip.transformer

    open_clip.transformer.PatchDropout.forward = patch_dropout_on_device

    torch.nn.parallel.DistributedDataParallel = cpu_ddp(torch.nn.parallel.DistributedDataParallel)
    import open_clip_train.main as trainer

    if stop is not None:
        train_one_epoch = trainer.train_one_epoch

        def until_stop(model, data, loss, epoch, *args, **kwargs):
            # open_clip_train saves epoch `epoch`'s predecessor before it calls this
            if epoch >= stop:
                raise _Stopped
            return train_one_epoch(model, data, loss, epoch, *args, **kwargs)

        trainer.train_one_epoch = until_stop
    try:
        trainer.main(argv)
    except _Stopped:
        pass


if __name__ == "__main__":
    main()
