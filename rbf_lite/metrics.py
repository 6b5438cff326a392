"""Classification, calibration and out-of-distribution metrics, on NumPy arrays.

Probabilities come in as (N, C) rows. For a HALO head C = K + 1 with the abstain class last:
predictions are the argmax over all K + 1 columns, and an abstention on an in-distribution image
counts as a wrong prediction (labels are never "abstain") with confidence p(abstain), in accuracy
and ECE alike. `abstain_rate` and `known_accuracy` (argmax over the K known classes only) say how
much of the error abstention accounts for.

OOD detection treats in-distribution as the positive class, higher score = more in-distribution:
AUROC, FPR at 95% TPR and AUPR (average precision, in-distribution positive) all follow that
convention, which is also scikit-learn's for `roc_auc_score(y, score)` with y = 1 in-distribution.

Temperature scaling (`fit_temperature`) is the post-hoc calibration a practitioner applies first:
one scalar T, fitted by NLL on held-out images, divides every logit. A calibration claim for a new
head has to beat ECE after it (`ece_temperature` in the CIFAR summaries), not only raw ECE.

`paired_difference` compares two training arms run with the same seeds (same data order): the
mean of the per-seed differences and its 95% Student-t interval.
"""
from __future__ import annotations

import warnings

import numpy as np


def _check_probabilities(probs: np.ndarray, labels: np.ndarray | None = None) -> None:
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"probabilities must have shape (N > 0, classes), got {probs.shape}")
    if labels is not None:
        if labels.shape != probs.shape[:1]:
            raise ValueError(f"labels must have shape ({probs.shape[0]},), got {labels.shape}")
        if labels.min() < 0 or labels.max() >= probs.shape[1]:
            raise ValueError(f"labels must lie in [0, {probs.shape[1]}), got [{labels.min()}, {labels.max()}]")


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    _check_probabilities(probs, labels)
    return float((probs.argmax(axis=1) == labels).mean())


def nll(probs: np.ndarray, labels: np.ndarray, floor: float = 1e-12) -> float:
    """Mean negative log-probability of the true label (floored, so one zero does not give inf)."""
    _check_probabilities(probs, labels)
    return float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], floor)).mean())


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, np.ndarray]:
    """Reliability-diagram data: per equal-width confidence bin (lo, hi], the mean confidence, the
    accuracy and the count (empty bins have 0s). Confidence 0 falls in the first bin."""
    _check_probabilities(probs, labels)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    safe = np.maximum(count, 1)
    return {"confidence": np.bincount(which, confidence, bins) / safe,
            "accuracy": np.bincount(which, correct, bins) / safe, "count": count,
            "edges": np.linspace(0, 1, bins + 1)}


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: |accuracy - confidence| per `reliability` bin, weighted by the
    fraction of examples in the bin."""
    rel = reliability(probs, labels, bins)
    return float(np.sum(rel["count"] / len(labels) * np.abs(rel["accuracy"] - rel["confidence"])))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float64, stable for logits of any size."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def ece_known(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of an abstaining head's K known columns renormalised (the softmax over the K known
    logits alone): its calibration as a K-way classifier, abstention taken out."""
    _check_probabilities(probs, labels)
    known = probs[:, :-1]
    return ece(known / np.maximum(known.sum(axis=1, keepdims=True), 1e-300), labels, bins)


def _nll_at(logits: np.ndarray, labels: np.ndarray, inverse_temperature: float) -> float:
    scaled = logits * inverse_temperature
    top = scaled.max(axis=1)
    log_total = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
    return float((log_total - scaled[np.arange(len(labels)), labels]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, low: float = 1e-3, high: float = 1e3,
                    iterations: int = 100) -> float:
    """The temperature T that minimises the NLL of softmax(logits / T) on (held-out) data.

    The NLL is convex in 1/T, hence unimodal in log T: a golden-section search over
    log T in [log low, log high] finds the minimum without gradients. Logits that carry no
    ranking at all want T -> infinity (uniform probabilities): the search then stops at `high`,
    with a warning.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    _check_probabilities(logits, labels)
    if not np.isfinite(logits).all():
        raise ValueError("logits must be finite")
    ratio = (np.sqrt(5) - 1) / 2
    a, b = np.log(low), np.log(high)
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    f_c, f_d = _nll_at(logits, labels, np.exp(-c)), _nll_at(logits, labels, np.exp(-d))
    for _ in range(iterations):
        if f_c < f_d:
            b, d, f_d = d, c, f_c
            c = b - ratio * (b - a)
            f_c = _nll_at(logits, labels, np.exp(-c))
        else:
            a, c, f_c = c, d, f_d
            d = a + ratio * (b - a)
            f_d = _nll_at(logits, labels, np.exp(-d))
    temperature = float(np.exp((a + b) / 2))
    if not low * 1.01 < temperature < high / 1.01:
        warnings.warn(f"the fitted temperature {temperature:.4g} sits at its bound [{low}, {high}]")
    return temperature


def temperature_scaled(logits: np.ndarray, labels: np.ndarray, held_out_logits: np.ndarray,
                       held_out_labels: np.ndarray, bins: int = 15) -> dict[str, float]:
    """Fit T on the held-out logits, apply it to `logits`: T, and the NLL and ECE after it."""
    temperature = fit_temperature(held_out_logits, held_out_labels)
    probs = softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return {"temperature": temperature, "nll_temperature": nll(probs, labels),
            "ece_temperature": ece(probs, labels, bins)}


def _curve(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True- and false-positive counts at every distinct threshold, from the highest score down."""
    scores_in, scores_out = np.asarray(scores_in, float).ravel(), np.asarray(scores_out, float).ravel()
    if len(scores_in) == 0 or len(scores_out) == 0:
        raise ValueError(f"need in- and out-of-distribution scores, got {len(scores_in)} and {len(scores_out)}")
    if not (np.isfinite(scores_in).all() and np.isfinite(scores_out).all()):
        raise ValueError("scores must be finite")
    scores = np.concatenate([scores_in, scores_out])
    positive = np.concatenate([np.ones(len(scores_in)), np.zeros(len(scores_out))])
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_pos = np.cumsum(positive)[last_of_tie]
    false_pos = (last_of_tie + 1) - true_pos
    return true_pos, false_pos


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids, so tied scores count one half)."""
    true_pos, false_pos = _curve(scores_in, scores_out)
    tpr = np.r_[0.0, true_pos / true_pos[-1]]
    fpr = np.r_[0.0, false_pos / false_pos[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def fpr_at_tpr(scores_in: np.ndarray, scores_out: np.ndarray, tpr_level: float = 0.95) -> float:
    """False-positive rate at the highest threshold that keeps >= tpr_level of in-distribution."""
    true_pos, false_pos = _curve(scores_in, scores_out)
    first = np.searchsorted(true_pos / true_pos[-1], tpr_level - 1e-12)
    return float(false_pos[first] / false_pos[-1])


def aupr(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """Average precision with in-distribution positive: sum of precision x recall increments."""
    true_pos, false_pos = _curve(scores_in, scores_out)
    recall = np.r_[0.0, true_pos / true_pos[-1]]
    precision = true_pos / (true_pos + false_pos)
    return float(np.sum(np.diff(recall) * precision))


def detection(scores_in: np.ndarray, scores_out: np.ndarray) -> dict[str, float]:
    return {"auroc": auroc(scores_in, scores_out), "fpr95": fpr_at_tpr(scores_in, scores_out),
            "aupr": aupr(scores_in, scores_out)}


def ood_scores(probs: np.ndarray, abstains: bool) -> dict[str, np.ndarray]:
    """Higher = more in-distribution. Linear head: maximum softmax probability. HALO: the maximum
    known-class probability, and 1 - p(abstain)."""
    _check_probabilities(probs)
    if not abstains:
        return {"msp": probs.max(axis=1)}
    return {"max_known": probs[:, :-1].max(axis=1), "not_abstain": 1 - probs[:, -1]}


def classification(probs: np.ndarray, labels: np.ndarray, abstains: bool) -> dict[str, float]:
    """accuracy, nll, ece, ece_known (= ece for a head without abstain), and for an abstaining
    head abstain_rate and known_accuracy."""
    result = {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels), "ece": ece(probs, labels)}
    result["ece_known"] = ece_known(probs, labels) if abstains else result["ece"]
    if abstains:
        result["abstain_rate"] = float((probs.argmax(axis=1) == probs.shape[1] - 1).mean())
        result["known_accuracy"] = accuracy(probs[:, :-1], labels)
    return result


def pca_basis(embeddings: np.ndarray, components: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, the top principal axes as rows, their explained variance ratios): project any other
    points on the same axes with (x - mean) @ axes.T."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"embeddings must have shape (N >= 2, D), got {embeddings.shape}")
    if not 0 < components <= embeddings.shape[1]:
        raise ValueError(f"components must lie in [1, {embeddings.shape[1]}], got {components}")
    mean = embeddings.mean(axis=0)
    _, singular, axes = np.linalg.svd(embeddings - mean, full_matrices=False)
    variance = singular ** 2
    return mean, axes[:components], variance[:components] / variance.sum()


def pca(embeddings: np.ndarray, components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Project onto the top principal components; returns (projected, explained variance ratio)."""
    mean, axes, ratio = pca_basis(embeddings, components)
    return (embeddings - mean) @ axes.T, ratio


# Student's t quantile t_{0.975, df} for df = 1..30 (beyond 30 the next tabulated values are within 2%).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean of a - b over pairs (a[i], b[i] share seed i), its sample std, n and 95% t interval.

    Pairing removes what the two arms share (initial data order, the seed's luck), so the interval
    is about the arms' difference alone. Needs at least two pairs.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-d arrays of one length, got {a.shape} and {b.shape}")
    if len(a) < 2:
        raise ValueError(f"a paired interval needs at least 2 pairs, got {len(a)}")
    if len(a) - 1 > len(T_975):
        raise ValueError(f"t quantiles are tabulated up to {len(T_975) + 1} pairs, got {len(a)}")
    diff = a - b
    mean, std = float(diff.mean()), float(diff.std(ddof=1))
    half = T_975[len(a) - 2] * std / np.sqrt(len(a))
    return {"mean": mean, "std": std, "n": len(a), "low": mean - half, "high": mean + half}
