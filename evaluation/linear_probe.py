"""Linear probes on frozen image features: full and few-shot, as pure functions of arrays.

The OpenCLIP scaling-law study and MoDE (section 5.4: the experts' vision
encoders ensembled for ImageNet classification) both report how well a
logistic regression on a model's frozen image features classifies. Here:

- the regression is scikit-learn's multinomial `LogisticRegression` (L-BFGS)
  on unit features; its inverse regularisation C is chosen from `C_GRID` on a
  held-out fifth of the train split (never on the test split), then the probe
  is refitted on the whole train split;
- few-shot probes take k training images per class (classes with fewer give
  all they have), drawn `draws` times with fixed seeds, with the C the full
  probe chose; each k's accuracy is the mean over the draws;
- the MoDE vision ensemble is one probe on the experts' features concatenated.

Metrics on the task's test split: top-1, top-5 (with at least 5 classes) and mean per-class
recall; evaluate also writes them as clip_benchmark's `linear_probe` results (lp_acc1, lp_acc5,
lp_mean_per_class_recall).
"""

from __future__ import annotations

import numpy as np

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
SHOTS = (1, 5, 10)


def _fit(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=1000).fit(x, y)


def _scores(model, x: np.ndarray, y: np.ndarray) -> dict:
    pred = model.predict(x)
    classes = np.unique(y)
    out = {"top1": float((pred == y).mean()),
           "mean_per_class": float(np.mean([(pred[y == c] == c).mean() for c in classes])), "top5": None}
    if len(model.classes_) >= 5:  # as for zero-shot: top-5 of fewer classes would read 100%
        top5 = model.classes_[np.argsort(-model.predict_proba(x), axis=1, kind="stable")[:, :5]]
        out["top5"] = float((top5 == y[:, None]).any(axis=1).mean())
    return out


def choose_c(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """The C of `C_GRID` that classifies a held-out fifth of the train split best (ties: the smaller
    C, the stronger regularisation); 1.0 when the split is too small to hold any out."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    held = order[: max(1, len(y) // 5)]
    fit = order[len(held):]
    if len(np.unique(y[fit])) < 2 or len(held) < 2:
        return 1.0
    accuracy = {c: _scores(_fit(x[fit], y[fit], c), x[held], y[held])["top1"] for c in C_GRID}
    best = max(accuracy.values())
    return min(c for c, a in accuracy.items() if a >= best)


def few_shot(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k training samples per class (all of a class that has fewer), sorted."""
    picks = [rng.permutation(np.flatnonzero(y == c))[:k] for c in np.unique(y)]
    return np.sort(np.concatenate(picks))


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
          shots: tuple[int, ...] = SHOTS, draws: int = 3, seed: int = 0) -> dict:
    """{"full": {...}, "k1": {...}, ..., "C": c}: the probes' test metrics (few-shot: mean over draws)."""
    c = choose_c(train_x, train_y, seed)
    out: dict = {"C": c, "full": _scores(_fit(train_x, train_y, c), test_x, test_y)}
    for k in shots:
        runs = []
        for d in range(draws):
            idx = few_shot(train_y, k, np.random.default_rng([seed, k, d]))
            if len(np.unique(train_y[idx])) < 2:
                continue
            runs.append(_scores(_fit(train_x[idx], train_y[idx], c), test_x, test_y))
        if runs:
            out[f"k{k}"] = {m: None if runs[0][m] is None else float(np.mean([r[m] for r in runs]))
                            for m in runs[0]}
    return out
