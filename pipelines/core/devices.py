"""Device choice shared by every stage that runs a model, and the CPU cores a stage may use."""

from __future__ import annotations

import os

import psutil


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container or `taskset` may
    allow fewer than the machine has, and `os.cpu_count()` counts them all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads() -> int:
    """Threads for one CPU-bound torch process that has the machine to itself: the physical cores
    it may use (torch's own default: hyper-threads slow its kernels down)."""
    physical = psutil.cpu_count(logical=False) or usable_cores()
    return max(1, min(usable_cores(), physical))


def pick_device(device: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; anything else is kept."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
