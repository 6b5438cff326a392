"""Computation and figures for the HALO chapters: its geometry, and HALO on CIFAR.

Everything here calls `rbf_lite.halo` (heads and loss), `rbf_lite.metrics` and `rbf_lite.cifar`;
this module only arranges toy problems, tiny runs and figures around them.
"""
from __future__ import annotations

import math
import time

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from . import DOT, PALETTE, RBF, explorer
from .. import metrics
from ..halo import HALOLoss, LinearHead

ABSTAIN = "#7f7f7f"
HEAD_NAMES = {"cce": "linear head", "cce_ls": "linear head + label smoothing", "halo": "HALO",
              "halo_rbf_lite": "HALO (rbf_lite ablation)"}
SCORE_NAMES = {"msp": "MSP", "max_known": "max-known", "not_abstain": "1 − p(abstain)"}  # OOD scores


# --- the starburst: cross-entropy rewards long features (scaling the data) -----------------------------------------------
def toy_embeddings(num_classes: int = 3, dim: int = 3, per_class: int = 40, seed: int = 0):
    """Separable toy data: class k is a small Gaussian blob around a unit direction (first two axes)."""
    g = torch.Generator().manual_seed(seed)
    angles = 2 * math.pi * torch.arange(num_classes) / num_classes + math.pi / 2
    means = torch.zeros(num_classes, dim)
    means[:, 0], means[:, 1] = angles.cos(), angles.sin()
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = means[labels] + 0.15 * torch.randn(len(labels), dim, generator=g)
    return x, labels


def scaled_losses(scales, num_classes: int = 3, dim: int = 3, seed: int = 0) -> dict[str, list[float]]:
    """Loss of the toy data when every embedding is multiplied by s, for a linear head and for HALO.

    Linear head: weights = the class means, zero bias, plain cross-entropy. HALO: centroids at the
    class means, gamma = 1, its full loss (soft targets + radial term) and, separately, its cross-entropy
    part alone (radial_weight = 0). HALO is the rbf_lite variant, whose gamma starts at 1.
    """
    x, y = toy_embeddings(num_classes, dim, seed=seed)
    means = torch.stack([x[y == k].mean(0) for k in range(num_classes)])
    linear = LinearHead(num_classes, dim)
    halo = HALOLoss(num_classes, dim, variant="rbf_lite", learn_gamma=False)
    halo_ce = HALOLoss(num_classes, dim, variant="rbf_lite", learn_gamma=False, radial_weight=0.0)
    out = {"s": list(scales), "linear": [], "halo": [], "halo_ce": []}
    with torch.no_grad():
        linear.linear.weight.copy_(means)
        linear.linear.bias.zero_()
        for s in scales:
            out["linear"].append(linear(s * x, y)[0].item())
            out["halo"].append(halo(s * x, y, means)[0].item())
            out["halo_ce"].append(halo_ce(s * x, y, means)[0].item())
    return out


def scaled_loss_figure(scales=None) -> go.Figure:
    """`scaled_losses` against the scale s: the linear head's loss falls for ever, HALO's has a minimum."""
    scales = list(np.geomspace(0.25, 16, 41)) if scales is None else scales
    curve = scaled_losses(scales)
    fig = go.Figure()
    for key, color, label, dash in (("linear", DOT, "linear head + cross-entropy", None),
                                    ("halo_ce", RBF, "HALO, cross-entropy part only", "dash"),
                                    ("halo", RBF, "HALO, full loss (with radial term)", None)):
        fig.add_trace(go.Scatter(x=curve["s"], y=curve[key], name=label, line=dict(color=color, dash=dash)))
    fig.update_xaxes(type="log", title_text="scale s of every embedding")
    fig.update_yaxes(type="log", title_text="mean loss", range=[-4, 1.7])
    fig.update_layout(height=380, margin=dict(t=40, b=20), legend=dict(x=0.02, y=0.02))
    return fig


# --- confidence maps: linear head vs HALO --------------------------------------------------------------
def plane_centroids(radius: float, num_classes: int = 3, dim: int = 3) -> torch.Tensor:
    """K centroids evenly spaced on a circle of `radius` in the plane of the first two axes (they sum to 0)."""
    angles = 2 * math.pi * torch.arange(num_classes) / num_classes + math.pi / 2
    c = torch.zeros(num_classes, dim)
    c[:, 0], c[:, 1] = radius * angles.cos(), radius * angles.sin()
    return c


def confidence_maps(gamma: float, radius: float = 3.0, extent: float = 7.0, n: int = 61,
                    num_classes: int = 3, dim: int = 3, eps: float = 0.1) -> dict:
    """Class probabilities over a grid of the plane x_3 = ... = x_D = 0.

    HALO: `HALOLoss.logits` (K distance logits and the abstain column). Linear head: a `LinearHead`
    given HALO's shifted known logits as weights and bias, W_k = 2 gamma c_k / D, b_k = -gamma ||c_k||^2 / D,
    so the two heads differ only by the abstain column. HALO is the rbf_lite variant, whose abstain
    bias follows gamma (the geometry chapter's derivation).
    """
    centroids = plane_centroids(radius, num_classes, dim)
    loss = HALOLoss(num_classes, dim, variant="rbf_lite", eps=eps, learn_gamma=False)
    linear = LinearHead(num_classes, dim)
    axis = torch.linspace(-extent, extent, n)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    points = torch.zeros(n * n, dim)
    points[:, 0], points[:, 1] = gx.reshape(-1), gy.reshape(-1)
    loss.set_gamma(gamma)
    with torch.no_grad():
        linear.linear.weight.copy_(2 * gamma * centroids / dim)
        linear.linear.bias.copy_(-gamma * centroids.square().sum(1) / dim)
        p_halo = loss.logits(points, centroids).softmax(1).reshape(n, n, -1)
        p_linear = linear(points)[1].softmax(1).reshape(n, n, -1)
    return {"axis": axis.numpy(), "centroids": centroids.numpy(), "linear": p_linear.numpy(),
            "halo": p_halo.numpy(), "abstain_bias": loss.abstain_bias().item(),
            "shell_radius": math.sqrt(dim - 2)}


def draw_confidence(gamma: float) -> go.Figure:
    """Max class probability of a linear head and of HALO over the plane; HALO's abstain region hatched grey."""
    m = confidence_maps(gamma)
    axis, c, K = m["axis"], m["centroids"], m["linear"].shape[-1]
    halo_conf = m["halo"][..., :K].max(-1)
    abstain = m["halo"].argmax(-1) == K
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        "linear head: max p(class)", "HALO: max p(class), grey: abstain"))
    for col, z in ((1, m["linear"].max(-1)), (2, halo_conf)):
        fig.add_trace(go.Heatmap(x=axis, y=axis, z=np.round(z, 3), zmin=0, zmax=1, colorscale="Viridis",
                                 showscale=col == 2, colorbar=dict(title="conf.", len=0.9),
                                 hovertemplate="x=%{x:.1f}, y=%{y:.1f}: %{z:.3f}<extra></extra>"), 1, col)
    fig.add_trace(go.Heatmap(x=axis, y=axis, z=np.where(abstain, 1.0, np.nan), zmin=0, zmax=1,
                             colorscale=[[0, ABSTAIN], [1, ABSTAIN]], showscale=False, opacity=0.85,
                             name="abstain", hovertemplate="abstain<extra></extra>"), 1, 2)
    t = np.linspace(0, 2 * np.pi, 80)
    r = m["shell_radius"]
    for col in (1, 2):
        fig.add_trace(go.Scatter(x=c[:, 0], y=c[:, 1], mode="markers", name="centroid",
                                 marker=dict(color="white", size=10, symbol="x",
                                             line=dict(color="black", width=1))), 1, col)
        for k in range(K):
            fig.add_trace(go.Scatter(x=c[k, 0] + r * np.cos(t), y=c[k, 1] + r * np.sin(t), mode="lines",
                                     name="shell ‖x − c‖² = D − 2",
                                     line=dict(color="white", dash="dot", width=1)), 1, col)
    lim = float(axis[-1])
    fig.update_xaxes(range=[-lim, lim], constrain="domain")
    fig.update_yaxes(range=[-lim, lim], constrain="domain", scaleanchor="x", row=1, col=1)
    fig.update_yaxes(range=[-lim, lim], constrain="domain", scaleanchor="x2", row=1, col=2)
    # No legend (the chapter's text names the crosses and circles): below the panels it would meet
    # the slider that confidence_explorer adds there, for which the bottom margin leaves room.
    fig.update_layout(height=490, margin=dict(t=80, b=150), showlegend=False,
                      title_text=f"γ = {gamma:g}: abstain bias b = {m['abstain_bias']:.2f}, abstain wins on "
                                 f"{abstain.mean():.0%} of the square")
    return fig


def confidence_explorer(live: bool = False):
    """Slide gamma: both heads sharpen alike; only HALO grows a region where it abstains."""
    return explorer(draw_confidence, {"gamma": [0.5, 1.0, 2.0, 4.0, 8.0]}, live, initial={"gamma": 2.0})


# --- the soap bubble ------------------------------------------------------------------------------------
def gaussian_norms(dim: int, count: int = 20000, seed: int = 0) -> np.ndarray:
    """Squared norms ||z||^2 of `count` standard Gaussian vectors in R^dim."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, dim, generator=g).square().sum(1).numpy()


def radial_curve(dim: int, r2: np.ndarray) -> np.ndarray:
    """`HALOLoss.radial` at embeddings placed at squared scaled distance r^2 = ||x - c||^2 / D from c."""
    loss = HALOLoss(2, dim)
    direction = torch.zeros(len(r2), dim, dtype=torch.float64)
    direction[:, 0] = 1.0
    x = direction * torch.as_tensor(np.sqrt(r2 * dim))[:, None]
    return loss.radial(x, torch.zeros(2, dim, dtype=torch.float64), torch.zeros(len(r2), dtype=torch.int64)).numpy()


def soap_bubble_figure(dims=(3, 10, 100, 1000)) -> go.Figure:
    """Left: histograms of ||z|| / sqrt(D) for Gaussian z. Right: the radial term against r^2."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("‖z‖ / √D, z ~ N(0, I)", "L_rad(r²) − its minimum"))
    r2 = np.linspace(0.02, 2.5, 250)
    for dim, color in zip(dims, PALETTE):
        norms = np.sqrt(gaussian_norms(dim) / dim)
        hist, edges = np.histogram(norms, bins=80, range=(0, 2), density=True)
        fig.add_trace(go.Scatter(x=(edges[1:] + edges[:-1]) / 2, y=hist, name=f"D = {dim}",
                                 line=dict(color=color, shape="hvh")), 1, 1)
        curve = radial_curve(dim, r2)
        fig.add_trace(go.Scatter(x=r2, y=curve - curve.min(), name=f"D = {dim}", showlegend=False,
                                 line=dict(color=color)), 1, 2)
    fig.update_xaxes(title_text="‖z‖ / √D", row=1, col=1)
    fig.update_yaxes(title_text="density", row=1, col=1)
    fig.update_xaxes(title_text="r² = ‖x − c_y‖² / D", row=1, col=2)
    fig.update_yaxes(range=[0, 1.5], row=1, col=2)
    fig.update_layout(height=400, margin=dict(t=40, b=20, l=60, r=20), legend=dict(orientation="h", x=0, y=-0.2))
    return fig


# --- HALO on CIFAR: a tiny CPU run ----------------------------------------------------------------------
def tiny_cifar_run(loss: str, subset: int = 2000, epochs: int = 3, width: int = 8, test_subset: int = 1000,
                   ood: str = "mnist,fashion-mnist,uniform-noise", seed: int = 0, **options) -> dict:
    """Train `rbf_lite.cifar.Trainer` briefly on the CPU; return test/OOD probabilities and metrics.

    Raises `rbf_lite.data.DataNotFoundError` when CIFAR-10 is not available locally.
    """
    from .. import cifar
    torch.manual_seed(seed)
    start = time.perf_counter()
    cfg = cifar.Config(loss=loss, subset=subset, epochs=epochs, width=width, test_subset=test_subset,
                       ood=ood, seed=seed, device="cpu", batch_size=options.pop("batch_size", 128),
                       lr=options.pop("lr", 0.05), eval_batch=500, **options)
    trainer = cifar.Trainer(cfg)
    trainer.calibrate()
    losses = [trainer.train_epoch()["train_loss"] for _ in range(epochs)]
    probs, _ = trainer.predict(trainer.test_set)
    ood_probs = {name: trainer.predict(data)[0] for name, data in trainer.ood_sets.items()}
    abstains = trainer.head.abstains
    in_scores = metrics.ood_scores(probs, abstains)
    detection = {name: {score: metrics.detection(in_scores[score], metrics.ood_scores(p, abstains)[score])
                        for score in in_scores} for name, p in ood_probs.items()}
    return {"loss": loss, "abstains": abstains, "probs": probs, "labels": trainer.test_set.labels,
            "ood_probs": ood_probs, "train_loss": losses,
            "metrics": metrics.classification(probs, trainer.test_set.labels, abstains),
            "detection": detection, "seconds": time.perf_counter() - start,
            "train_images": len(trainer.train_set), "skipped": trainer.ood_skipped}


def reliability_figure(panels: list[tuple[str, dict, str]]) -> go.Figure:
    """Reliability diagrams side by side, one per (title, `metrics.reliability` bins, note): accuracy
    per confidence bin against the diagonal; empty bins are not drawn. Each note (its ECE) is written
    inside the top left corner of its own panel, where it cannot run into the neighbouring title."""
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[title for title, _, _ in panels],
                        horizontal_spacing=0.08)
    for col, ((_, rel, note), color) in enumerate(zip(panels, (DOT, RBF, *PALETTE)), start=1):
        edges, count = np.asarray(rel["edges"]), np.asarray(rel["count"])
        centres, filled = (edges[1:] + edges[:-1]) / 2, count > 0
        accuracy, confidence = np.asarray(rel["accuracy"]), np.asarray(rel["confidence"])
        fig.add_trace(go.Bar(x=centres[filled], y=accuracy[filled], width=1 / len(count), name="accuracy",
                             marker_color=color, showlegend=False, customdata=count[filled],
                             hovertemplate="bin %{x:.2f}: accuracy %{y:.2f}, %{customdata} images<extra></extra>"),
                      1, col)
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="black", dash="dash"),
                                 name="perfect calibration", showlegend=col == 1), 1, col)
        fig.add_trace(go.Scatter(x=confidence[filled], y=accuracy[filled], mode="markers",
                                 marker=dict(color="black", size=6), name="mean confidence and accuracy of a bin",
                                 showlegend=col == 1), 1, col)
        axis = "" if col == 1 else col
        fig.add_annotation(text=note, x=0.03, y=0.97, xref=f"x{axis} domain", yref=f"y{axis} domain",
                           xanchor="left", yanchor="top", showarrow=False, bgcolor="rgba(255,255,255,0.8)")
    fig.update_xaxes(range=[0, 1], title_text="confidence")
    fig.update_yaxes(range=[0, 1])
    fig.update_yaxes(title_text="accuracy", row=1, col=1)
    fig.update_layout(height=400, margin=dict(t=40, b=20, l=60, r=20), bargap=0,
                      legend=dict(orientation="h", x=0, y=-0.2))
    return fig


def tiny_run_panels(runs: list[dict]) -> list[tuple[str, dict, str]]:
    """`reliability_figure` panels of `tiny_cifar_run` results."""
    names = {"cce": "linear head", "halo": "HALO (abstain counts as wrong)"}
    return [(names[r["loss"]], metrics.reliability(r["probs"], r["labels"]), f"ECE {r['metrics']['ece']:.3f}")
            for r in runs]


def tiny_run_table(runs: list[dict]):
    """What each `tiny_cifar_run` measured on the test images, as text: one column per head, a dash
    where a measure does not apply to the head."""
    import pandas as pd
    columns = {}
    for r in runs:
        m = r["metrics"]
        columns[HEAD_NAMES[r["loss"]]] = {"training": f"{r['train_images']:,} images x {len(r['train_loss'])} epochs",
                              "time": f"{r['seconds']:.0f} s", "accuracy": f"{m['accuracy']:.1%}",
                              "NLL": f"{m['nll']:.3f}", "ECE": f"{m['ece']:.3f}",
                              "abstain rate": f"{m['abstain_rate']:.1%}" if r["abstains"] else "–",
                              "known-class accuracy": f"{m['known_accuracy']:.1%}" if r["abstains"] else "–"}
    return pd.DataFrame(columns)


def detection_table(runs: list[dict]):
    """One row per head, OOD set and score of `tiny_cifar_run` results: AUROC, FPR@95 and AUPR."""
    import pandas as pd
    return pd.DataFrame([{"head": HEAD_NAMES[r["loss"]], "OOD set": name, "score": SCORE_NAMES.get(score, score),
                          "AUROC": d["auroc"], "FPR@95": d["fpr95"], "AUPR": d["aupr"]}
                         for r in runs for name, scores in r["detection"].items() for score, d in scores.items()])


# --- HALO on CIFAR: the seed's numbers and our reproduction --------------------------------------------
SEED_CLAIMS = [  # (metric, cross-entropy, HALO): the seed's published CIFAR-10 numbers, not ours
    ("accuracy", "96.30%", "96.53%"),
    ("ECE", "0.0798", "0.0151"),
    ("SVHN AUROC", "92.51%", "98.08%"),
    ("SVHN FPR@95", "22.08%", "10.27%"),
    ("CIFAR-100 AUROC", "82.83%", "91.72%"),
    ("CIFAR-100 FPR@95", "48.94%", "37.63%"),
]
