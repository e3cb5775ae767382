"""Use a trained MoDE system: classify images from class names, rank captions, embed images.

    from serving.predict import MoDESystem
    system = MoDESystem.load("runs/demo")            # a run folder, or a bundle (moda export)
    probs, weights = system.classify(images, ["circle", "square"])
    scores, weights = system.rank_captions(image, ["a red circle", "a forest"])

The system is read by serving/bundle.py `read_system` (experts, fine centres, ownership, the
routing rule and the lambda evaluate chose on validation tasks, the caption encoder). Experts are
loaded on first use, so a caller that runs only the `top_experts` with the largest routing weights
(`moda infer --top-experts`) never loads the others. An expert added later (`moda add-expert`) is
picked up on the next load of a run folder.

The two steps of a zero-shot prediction are apart (`classifier`, then `scores`), so batch
inference and the service compute a class list's text features once, not once per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from clustering.encoder import encode, load_encoder
from evaluation.clip_features import ClipModel, classifier_weights, image_features, load_clip, text_features
from pipelines.core.devices import pick_device
from routing.ensemble import ensemble_logits
from routing.metadata import classname_embeddings
from routing.prompts import DEFAULT_TEMPLATES
from routing.weights import route
from serving.bundle import SystemSpec, read_system

LOGIT_SCALE = 100.0  # CLIP's: the ensemble's cosines to probabilities


@dataclass
class Classifier:
    """A class list made ready: its routing weights over every expert, the experts it runs (all, or
    the `top_experts` largest weights, renormalised) and each one's (C, D) text classifier."""

    classnames: list[str]
    weights: np.ndarray             # (n,) routing weights over every expert
    experts: list[int]              # the experts run, largest weight first when cut
    used_weights: np.ndarray        # (len(experts),) their weights, summing to 1
    text: list[np.ndarray]          # per expert run: (C, D)


@dataclass
class MoDESystem:
    spec: SystemSpec
    device: str
    encoder: object
    routing: str
    lam: float
    logit_scale: float = LOGIT_SCALE
    _models: dict[int, ClipModel] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, routing: str | None = None, lam: float | None = None,
             device: str = "auto") -> MoDESystem:
        """A run folder or a bundle. `routing`/`lam` None: the rule and lambda the evaluate stage used
        (chosen on the validation tasks), so predictions are routed as the reported numbers were."""
        spec = read_system(path)
        device = pick_device(device)
        encoder = load_encoder(spec.encoder.model, spec.encoder.pooling, device, spec.encoder.precision)
        return cls(spec, device, encoder, routing or spec.routing, spec.lam if lam is None else lam)

    @property
    def expert_names(self) -> list[str]:
        return list(self.spec.expert_names)

    @property
    def fine_centroids(self) -> np.ndarray:
        return self.spec.fine_centroids

    @property
    def owns(self) -> np.ndarray:
        return self.spec.owns

    def model(self, expert: int) -> ClipModel:
        """Expert `expert`'s CLIP, loaded on first use."""
        if expert not in self._models:
            self._models[expert] = load_clip(self.spec.expert_dirs[expert], self.device)
        return self._models[expert]

    @property
    def preprocess(self):
        """The experts' image transform (one run, one architecture: the same for every expert)."""
        return self.model(0).preprocess

    def route_texts(self, embeddings: np.ndarray) -> np.ndarray:
        return route(self.routing, embeddings, self.fine_centroids, self.owns, len(self.spec.expert_names), self.lam)

    def chosen(self, weights: np.ndarray, top_experts: int | None) -> tuple[list[int], np.ndarray]:
        """The experts to run and their weights: all, or the `top_experts` largest, renormalised."""
        n = len(weights)
        if not top_experts or top_experts >= n:
            return list(range(n)), np.asarray(weights, dtype=np.float64)
        keep = sorted(np.argsort(-np.asarray(weights), kind="stable")[:top_experts].tolist(),
                      key=lambda e: -weights[e])
        kept = np.asarray(weights, dtype=np.float64)[keep]
        return keep, kept / kept.sum()

    def classifier(self, classnames: list[str], templates: list[str] | None = None,
                   top_experts: int | None = None) -> Classifier:
        templates = templates or DEFAULT_TEMPLATES
        weights = self.route_texts(classname_embeddings(self.encoder, classnames, templates))
        experts, used = self.chosen(weights, top_experts)
        return Classifier(list(classnames), weights, experts, used,
                          [classifier_weights(self.model(e), classnames, templates) for e in experts])

    def scores(self, classifier: Classifier, features: list[np.ndarray]) -> np.ndarray:
        """(N, C) class probabilities from each run expert's (N, D) image features."""
        logits = np.stack([f @ t.T for f, t in zip(features, classifier.text)])
        combined = ensemble_logits(logits, classifier.used_weights) * self.logit_scale
        probs = np.exp(combined - combined.max(axis=1, keepdims=True))
        return probs / probs.sum(axis=1, keepdims=True)

    def classify(self, images: list[Image.Image], classnames: list[str], templates: list[str] | None = None,
                 top_experts: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N, C) class probabilities of the routed ensemble, and the (n_experts,) routing weights."""
        ready = self.classifier(classnames, templates, top_experts)
        features = [image_features(self.model(e), images) for e in ready.experts]
        return self.scores(ready, features), ready.weights

    def rank_captions(self, image: Image.Image, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(K,) ensemble similarity of the image to each caption, and the routing weights.

        As the paper's image-to-text retrieval: the candidate captions are the
        task's metadata, routed together.
        """
        weights = self.route_texts(encode(self.encoder, captions))
        sims = np.stack([image_features(self.model(e), [image]) @ text_features(self.model(e), captions).T
                         for e in range(len(self.spec.expert_names))])
        return ensemble_logits(sims, weights)[0], weights

    def embed(self, images: list[Image.Image], experts: list[int] | None = None) -> dict[str, np.ndarray]:
        """Each expert's (N, D) unit image embeddings, by expert name."""
        experts = range(len(self.spec.expert_names)) if experts is None else experts
        return {self.spec.expert_names[e]: image_features(self.model(e), images) for e in experts}
