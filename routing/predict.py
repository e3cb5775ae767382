"""Use a trained MoDE system: classify images from class names, or rank captions.

    from routing.predict import MoDESystem
    system = MoDESystem.load("runs/demo")
    probs, weights = system.classify(images, ["circle", "square"])
    scores, weights = system.rank_captions(image, ["a red circle", "a forest"])

The system is read from the run folder's files: `train/registry.json` and
`added/registry.json` (the experts, their model folders and the fine
clusters each owns; experts/registry.py), `cluster/fine_centroids.npy`, and
the caption encoder named in the embed manifest. An expert added later
(`moda add-expert`) is picked up on the next load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clustering.encoder import encode, load_run_encoder
from experts.registry import load_experts, ownership
from pipelines.core.devices import pick_device
from pipelines.core.layout import RunLayout
from routing.clip_features import ClipModel, classifier_weights, image_features, load_clip, text_features
from routing.ensemble import ensemble_logits
from routing.metadata import classname_embeddings
from routing.prompts import DEFAULT_TEMPLATES
from routing.weights import route


def evaluated_lambda(layout: RunLayout, default: float = 0.2) -> float:
    """The routing lambda the run's evaluate stage used for MoDE (results.json), else `default`."""
    if not layout.results.is_file():
        return default
    chosen = json.loads(layout.results.read_text(encoding="utf-8")).get("lambda", {}).get("MoDE", {})
    return float(chosen.get("value", default))


@dataclass
class MoDESystem:
    experts: list[ClipModel]
    expert_names: list[str]
    encoder: object
    fine_centroids: np.ndarray
    owns: np.ndarray  # (n_experts, m) bool: the fine clusters each expert is routed by
    routing: str = "paper"
    lam: float = 0.2
    logit_scale: float = 100.0

    @classmethod
    def load(cls, run_dir: str | Path, routing: str = "paper", lam: float | None = None,
             device: str = "auto") -> MoDESystem:
        """`lam` None: the lambda the evaluate stage chose on the validation tasks (0.2, the paper's,
        before evaluate has run), so predictions are routed as the reported numbers were."""
        layout = RunLayout(Path(run_dir))
        if lam is None:
            lam = evaluated_lambda(layout)
        experts = load_experts(layout)
        device = pick_device(device)
        fine_centroids = np.load(layout.fine_centroids)
        return cls(
            experts=[load_clip(e.path, device) for e in experts],
            expert_names=[e.name for e in experts],
            encoder=load_run_encoder(layout.embed, device),
            fine_centroids=fine_centroids,
            owns=ownership(experts, fine_centroids.shape[0]),
            routing=routing, lam=lam,
        )

    def route_texts(self, embeddings: np.ndarray) -> np.ndarray:
        return route(self.routing, embeddings, self.fine_centroids, self.owns, len(self.experts), self.lam)

    def classify(self, images: list[Image.Image], classnames: list[str],
                 templates: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N, C) class probabilities of the routed ensemble, and the (n_experts,) weights."""
        templates = templates or DEFAULT_TEMPLATES
        weights = self.route_texts(classname_embeddings(self.encoder, classnames, templates))
        logits = np.stack([image_features(m, images) @ classifier_weights(m, classnames, templates).T
                           for m in self.experts])
        combined = ensemble_logits(logits, weights) * self.logit_scale
        probs = np.exp(combined - combined.max(axis=1, keepdims=True))
        return probs / probs.sum(axis=1, keepdims=True), weights

    def rank_captions(self, image: Image.Image, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(K,) ensemble similarity of the image to each caption, and the routing weights.

        As the paper's image-to-text retrieval: the candidate captions are the
        task's metadata, routed together.
        """
        weights = self.route_texts(encode(self.encoder, captions))
        sims = np.stack([image_features(m, [image]) @ text_features(m, captions).T for m in self.experts])
        return ensemble_logits(sims, weights)[0], weights
