"""Chapter "Registers and sinks": a zero key as the place where distance attention looks away.

A register whose key is zero sits at the origin, so a query's RBF score for it is -c||q||^2. After
dropping the row constant -c||q||^2, token key j beats the register exactly when
2 q.k_j - ||k_j||^2 > 0, i.e. when k_j lies inside the ball of radius ||q|| centred on q (the ball
whose surface passes through the origin). Under the dot product the zero key has score 0 and key j
beats it when q.k_j > 0, a half-space. The functions below compute both, in a 2-D scene for the
interactive figure and in higher dimension for the curves; the chapter also inspects the registers
of `rbf_lite.models.gpt.GPT`.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..rbf import rbf_attention_reference
from . import DOT, PALETTE, RBF, _arrow_trace, explorer, single_threaded

REGISTER = "#7f7f7f"


# --- the 2-D scene ----------------------------------------------------------------------------------
def register_scene(query_norm: float) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A query of norm `query_norm` at 25 degrees, a zero register key, and four token keys.

    Returns (q (2,), keys (5, 2) with the register first, names).
    """
    q = query_norm * torch.tensor([math.cos(math.radians(25)), math.sin(math.radians(25))])
    angles = torch.tensor([40.0, 150.0, 250.0, -30.0]) * math.pi / 180
    norms = torch.tensor([2.2, 1.6, 1.4, 1.8])
    tokens = norms[:, None] * torch.stack([angles.cos(), angles.sin()], -1)
    keys = torch.cat([torch.zeros(1, 2), tokens])
    return q, keys, ["register (0)", "k1", "k2", "k3", "k4"]


def scene_weights(q: torch.Tensor, keys: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """One query's softmax weights over `keys`: dot product scale*q.k and RBF -scale*||q-k||^2.

    The RBF weights come from `rbf_attention_reference` (values = keys, no causal mask).
    """
    dot = torch.softmax(scale * keys @ q, -1)
    _, rbf = rbf_attention_reference(q[None, None, None], keys[None, None], keys[None, None],
                                     causal=False, scale=scale, return_weights=True)
    return {"dot": dot, "rbf": rbf[0, 0, 0]}


def draw_register_scene(query_norm: float, scale: float = 1.0) -> go.Figure:
    """Left: the scene, with the ball that a key must enter to beat the register under RBF.
    Right: the query's weights on the register and the four keys, dot product vs RBF."""
    q, keys, names = register_scene(query_norm)
    w = scene_weights(q, keys, scale)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55],
                        subplot_titles=("keys and register ★", "weights of the query"))
    t = np.linspace(0, 2 * np.pi, 200)
    r, (cx, cy) = float(q.norm()), q.tolist()
    fig.add_trace(go.Scatter(x=cx + r * np.cos(t), y=cy + r * np.sin(t), mode="lines", fill="toself",
                             fillcolor="rgba(214,39,40,0.08)", line=dict(color=RBF, dash="dot"),
                             name="RBF: keys inside<br>beat ★"), 1, 1)
    if r > 0:  # the dot-product boundary q.k = 0, a line through the origin
        ux, uy = cx / r, cy / r
        fig.add_trace(go.Scatter(x=[-4 * uy, 4 * uy], y=[4 * ux, -4 * ux], mode="lines",
                                 line=dict(color=DOT, dash="dot"),
                                 name="dot: keys on the<br>query's side beat ★"), 1, 1)
    fig.add_trace(_arrow_trace(q, "query", "black", dash="dot"), 1, 1)
    fig.add_trace(go.Scatter(x=[0], y=[0], mode="markers", name="register key", showlegend=False,
                             marker=dict(symbol="star", size=16, color=REGISTER)), 1, 1)
    for k, name, color in zip(keys[1:], names[1:], PALETTE):
        fig.add_trace(go.Scatter(x=[k[0].item()], y=[k[1].item()], mode="markers+text", text=[name],
                                 textposition="top center", showlegend=False,
                                 marker=dict(size=11, color=color)), 1, 1)
    fig.add_trace(go.Bar(x=names, y=w["dot"].tolist(), name="dot product", marker_color=DOT), 1, 2)
    fig.add_trace(go.Bar(x=names, y=w["rbf"].tolist(), name="RBF", marker_color=RBF), 1, 2)
    fig.update_xaxes(range=[-3, 4], row=1, col=1)
    fig.update_yaxes(range=[-2.5, 3.5], scaleanchor="x", row=1, col=1)
    fig.update_yaxes(range=[0, 1], title_text="weight", row=1, col=2)
    # Short legend entries and margins: a wide legend squeezes the plots until their titles collide.
    fig.update_layout(barmode="group", height=450, margin=dict(t=80, b=20, l=50, r=10),
                      title_text=f"‖q‖ = {query_norm:g}, c = {scale:g}: the register gets "
                                 f"{w['rbf'][0]:.0%} under RBF, {w['dot'][0]:.0%} under the dot product")
    return fig


def register_explorer(live: bool = False):
    """Slide the query's norm (and the score scale c): how much weight goes to the zero register."""
    return explorer(draw_register_scene,
                    {"query_norm": [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0],
                     "scale": [0.5, 1.0, 2.0]},
                    live, initial={"query_norm": 0.5, "scale": 1.0})


# --- register share in higher dimension -------------------------------------------------------------
@single_threaded
def register_share(query_norms: Sequence[float], dim: int = 16, n_keys: int = 31, n_queries: int = 256,
                   match_noise: float = 0.3, seed: int = 0) -> dict[str, list[float]]:
    """Mean weight on a zero register key as the query norm grows, dot product vs RBF.

    Each of `n_queries` queries has a random direction and norm r, and its own `n_keys` random
    N(0, 1) keys plus the zero register; scores use the usual scale 1/sqrt(dim). Two cases:
    "none", no key is related to the query, and "match", the first key is the query plus
    N(0, match_noise^2) noise. Returns, per r, the mean register weight in both cases and the mean
    weight of the matching key ("<kind>_<case>_register", "<kind>_match_key").
    """
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_queries, dim, generator=g), dim=-1)
    tokens = torch.randn(n_queries, n_keys, dim, generator=g)
    noise = match_noise * torch.randn(n_queries, dim, generator=g)
    scale = 1 / math.sqrt(dim)
    out: dict[str, list[float]] = {"norm": list(query_norms)}
    for r in query_norms:
        q = r * directions
        for case in ("none", "match"):
            keys = tokens.clone()
            if case == "match":
                keys[:, 0] = q + noise
            keys = torch.cat([torch.zeros(n_queries, 1, dim), keys], 1)   # register first
            dot = torch.softmax(scale * (keys @ q[:, :, None])[..., 0], -1)
            # one "head" per query: (B=n_queries, H=1, N=1 query, M=1+n_keys keys)
            _, rbf = rbf_attention_reference(q[:, None, None], keys[:, None], keys[:, None],
                                             causal=False, return_weights=True)
            rbf = rbf[:, 0, 0]
            for kind, w in (("dot", dot), ("rbf", rbf)):
                out.setdefault(f"{kind}_{case}_register", []).append(w[:, 0].mean().item())
                if case == "match":
                    out.setdefault(f"{kind}_match_key", []).append(w[:, 1].mean().item())
    return out


def register_share_figure(share: dict) -> go.Figure:
    """Plot `register_share`: register weight with no related key (left) and with a matching key (right)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("no related key", "one key matches the query"))
    for kind, label, color in (("dot", "dot product", DOT), ("rbf", "RBF", RBF)):
        fig.add_trace(go.Scatter(x=share["norm"], y=share[f"{kind}_none_register"], name=f"{label}: register",
                                 line=dict(color=color)), 1, 1)
        fig.add_trace(go.Scatter(x=share["norm"], y=share[f"{kind}_match_register"], showlegend=False,
                                 line=dict(color=color)), 1, 2)
        fig.add_trace(go.Scatter(x=share["norm"], y=share[f"{kind}_match_key"],
                                 name=f"{label}: matching key", line=dict(color=color, dash="dash")), 1, 2)
    fig.update_xaxes(title_text="query norm ‖q‖")
    # The axes stop a little above 1 so that their top tick label stays clear of the panel titles, and
    # the legend sits below the panels, which it would otherwise squeeze.
    fig.update_yaxes(range=[0, 1.05], tickvals=[0, 0.2, 0.4, 0.6, 0.8, 1], title_text="mean weight", row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], tickvals=[0, 0.2, 0.4, 0.6, 0.8, 1], row=1, col=2)
    fig.update_layout(height=440, margin=dict(t=60, b=20, l=60, r=20),
                      legend=dict(orientation="h", x=0, xanchor="left", y=-0.2, yanchor="top"))
    return fig


# --- registers in the GPT ---------------------------------------------------------------------------
@torch.no_grad()
def register_keys(model, idx: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer of a `GPT` with registers and a q/k positional module (RoPE or SuSiE): q and k of
    every slot before and after the positional module, captured by hooks, plus the attention maps.

    Returns one dict per layer with "q", "k" (before positions), "q_pos", "k_pos" (after), each
    (B, H, R+T, D) with the register slots first, and "weights" (B, H, R+T, R+T).
    """
    captured: list[dict[str, torch.Tensor]] = []
    handles = []
    for block in model.blocks:
        if block.attn.positional is None:
            raise ValueError("register_keys needs a model with pos='rope' or pos='susie'")
        layer: dict[str, torch.Tensor] = {}
        captured.append(layer)

        def before(_module, args, layer=layer):
            layer["q"], layer["k"] = args[0].clone(), args[1].clone()

        def after(_module, _args, output, layer=layer):
            layer["q_pos"], layer["k_pos"] = output[0].clone(), output[1].clone()

        handles += [block.attn.positional.register_forward_pre_hook(before),
                    block.attn.positional.register_forward_hook(after)]
    try:
        maps = model.attention_maps(idx)
    finally:
        for h in handles:
            h.remove()
    for layer, weights in zip(captured, maps):
        layer["weights"] = weights
    return captured
