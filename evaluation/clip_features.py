"""CLIP features from a local-dir model: images, class names (template-averaged), texts.

Shared by the evaluation stage and the prediction API so that both score
exactly the same way. All features are L2-normalised; logits are cosines.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.core.devices import is_cuda
from routing.prompts import template_average


@dataclass
class ClipModel:
    model: object
    preprocess: object
    tokenizer: object
    device: str


def inference(device: str):
    """The context every forward pass of evaluation and prediction runs in: no gradients, and bf16
    autocast on a GPU (what the experts trained in; fp32 there halved the throughput for nothing).
    On a CPU nothing changes: fp32, the bits the reports were made with."""
    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if autocast_dtype(device) is not None:
        stack.enter_context(torch.autocast("cuda", dtype=autocast_dtype(device)))
    return stack


def autocast_dtype(device: str):
    """bf16 on a GPU, None (fp32, no autocast) elsewhere."""
    import torch

    return torch.bfloat16 if is_cuda(device) else None


def to_device(batch, device: str):
    """A host batch on `device`: through pinned memory and without waiting on a GPU (the copy
    overlaps the previous batch's compute), as it is on a CPU."""
    if not is_cuda(device):
        return batch
    return batch.pin_memory().to(device, non_blocking=True)


def load_clip(model_dir: str | Path, device: str = "cpu") -> ClipModel:
    import open_clip

    spec = f"local-dir:{model_dir}"
    model, _, preprocess = open_clip.create_model_and_transforms(spec, device=device)
    model.eval()
    return ClipModel(model, preprocess, open_clip.get_tokenizer(spec), device)


def image_features(clip: ClipModel, images: list[Image.Image], batch_size: int = 256) -> np.ndarray:
    """(N, D) unit image embeddings."""
    import torch

    feats = []
    with inference(clip.device):
        for i in range(0, len(images), batch_size):
            batch = to_device(torch.stack([clip.preprocess(im) for im in images[i:i + batch_size]]), clip.device)
            feats.append(torch.nn.functional.normalize(clip.model.encode_image(batch).float(), dim=-1))
    return torch.cat(feats).cpu().numpy()


def text_features(clip: ClipModel, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """(T, D) unit text embeddings."""
    import torch

    feats = []
    with inference(clip.device):
        for i in range(0, len(texts), batch_size):
            tokens = clip.tokenizer(texts[i:i + batch_size]).to(clip.device)
            feats.append(torch.nn.functional.normalize(clip.model.encode_text(tokens).float(), dim=-1))
    return torch.cat(feats).cpu().numpy()


def classifier_weights(clip: ClipModel, classnames: list[str], templates: list[str]) -> np.ndarray:
    """(C, D) zero-shot classifier: each class's text embedding averaged over templates."""
    return template_average(lambda texts: text_features(clip, texts), classnames, templates)
