"""Device choice shared by every stage that runs a model."""

from __future__ import annotations


def pick_device(device: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; anything else is kept."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
