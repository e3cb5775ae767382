"""Unsupervised SimCSE adaptation of the caption encoder to the dataset's own captions.

Why: MoDE clusters captions with SimCSE; an off-the-shelf sentence encoder
has never seen web alt-text (file names, product codes, boilerplate), and a
few hundred SimCSE steps on the captions themselves spread them out by
meaning. Unsupervised SimCSE (Gao et al. 2021): every caption is its own
positive, seen twice through different dropout masks; the other captions of
the batch are the negatives. That is sentence-transformers'
MultipleNegativesRankingLoss on (caption, caption) pairs with scale
1 / temperature, which is the library's documented recipe; moda only adds
the loop, the caption sample and an atomic save.

The adapted model is saved under the embed stage (`encoder/`) and used for
every later embedding of this run, class names included (routing reads it
through the embed manifest).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from tqdm import tqdm

from clustering.captions import shard_captions
from clustering.encoder import load_encoder
from pipelines.core.config import EmbedConfig
from pipelines.core.devices import pick_device
from pipelines.core.manifest import atomic_write_json


def sample_captions(shards: list[Path], count: int, seed: int) -> list[str]:
    """`count` captions drawn from shards visited in a seeded random order (only what is needed is read)."""
    order = list(shards)
    rng = random.Random(seed)
    rng.shuffle(order)
    captions: list[str] = []
    for shard in order:
        captions.extend(shard_captions(shard)[1])
        if len(captions) >= 4 * count:
            break
    rng.shuffle(captions)
    if not captions:
        raise ValueError("embed.simcse_steps > 0 but the shards hold no usable caption")
    while len(captions) < count:  # small data: further epochs over the same captions
        captions.extend(rng.sample(captions, min(len(captions), count - len(captions))))
    return captions[:count]


def adapt_encoder(cfg: EmbedConfig, shards: list[Path], out_dir: Path, marker: Path, config_hash: str) -> Path:
    """Train `cfg.simcse_steps` SimCSE steps from `cfg.model`; save to `out_dir`, then `marker`
    (reused when the marker says it was made under this config)."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    if out_dir.is_dir() and marker.is_file() and \
            json.loads(marker.read_text(encoding="utf-8")).get("config") == config_hash:
        return out_dir
    device = pick_device(cfg.device)
    captions = sample_captions(shards, cfg.simcse_steps * cfg.simcse_batch_size, cfg.seed)
    torch.manual_seed(cfg.seed)
    encoder = load_encoder(cfg.model, cfg.pooling, device, "fp32")
    loss_fn = MultipleNegativesRankingLoss(encoder, scale=1.0 / cfg.simcse_temperature)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=cfg.simcse_lr)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    encoder.train()  # dropout on: the two views of a caption differ only by it
    losses = []
    for step in tqdm(range(cfg.simcse_steps), desc="simcse", unit="step"):
        batch = captions[step * cfg.simcse_batch_size:(step + 1) * cfg.simcse_batch_size]
        features = {k: v.to(device) if hasattr(v, "to") else v for k, v in encoder.preprocess(batch).items()}
        with autocast:
            loss = loss_fn([dict(features), dict(features)], None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    encoder.eval()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.save(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    atomic_write_json(marker, {"config": config_hash, "steps": cfg.simcse_steps,
                               "loss_first": losses[0], "loss_last": losses[-1]})
    return out_dir
