"""Chapter "SuSiE vs RoPE": what rotating and adding position vectors do to Euclidean distances.

Every distance here is computed by pushing q and k through the package's own modules,
`rbf_lite.positional.Rotary` and `rbf_lite.positional.SuSiE`, and compared with the closed forms:

  RoPE   ||R_i q - R_j k||^2 = ||q||^2 + ||k||^2 - 2 q.R_{j-i} k,   for k = q:  2 sum_f ||q_f||^2 (1 - cos(d t_f))
  SuSiE  ||(q + p_i) - (k + p_j)||^2 = ||q - k||^2 + ||p_i - p_j||^2 + 2 (q - k).(p_i - p_j),
         ||p_i - p_j||^2 = sum_f 2 w_f^2 (1 - cos(d t_f))

with d = i - j the offset, t_f the inverse frequencies and q_f the pair of coordinates (f, f + D/2)
that RoPE rotates together. Vectors are batches of shape (B, D); key positions a list of N slots.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
import torch

from ..positional import Rotary, SuSiE, inverse_frequencies
from . import DOT, RBF, explorer, single_threaded

SUSIE = "#2ca02c"


def _positions(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.long).reshape(-1)


@single_threaded
def rope_sq_distance(q: torch.Tensor, k: torch.Tensor, query_position: int,
                     key_positions: Sequence[int]) -> torch.Tensor:
    """||R_i q - R_j k||^2 through `Rotary`, q and k (B, D), for one query slot i and N key slots j: (B, N)."""
    rope = Rotary(q.shape[-1])
    keys = _positions(key_positions)
    rq, _ = rope(q[:, None], q[:, None], _positions([query_position]))            # (B, 1, D)
    _, rk = rope(k[:, None].expand(-1, len(keys), -1), k[:, None].expand(-1, len(keys), -1), keys)
    return (rq - rk).square().sum(-1)


def rotate(x: torch.Tensor, position: int) -> torch.Tensor:
    """R_p x through `Rotary` (p >= 0), x (B, D)."""
    rx, _ = Rotary(x.shape[-1])(x[:, None], x[:, None], _positions([position]))
    return rx[:, 0]


def rope_self_distance(q: torch.Tensor, offsets: Sequence[int], base: float = 10000.0) -> torch.Tensor:
    """Closed form of ||R_i q - R_j q||^2 = 2 sum_f ||q_f||^2 (1 - cos(d t_f)) for offsets d: (B, N)."""
    half = q.shape[-1] // 2
    pair_energy = q[:, :half].square() + q[:, half:].square()                    # ||q_f||^2, (B, D/2)
    angles = torch.as_tensor(offsets, dtype=torch.float32)[:, None] * inverse_frequencies(q.shape[-1], base)
    return 2 * (pair_energy[:, None, :] * (1 - angles.cos())[None]).sum(-1)


def susie_module(head_dim: int, weight: float) -> SuSiE:
    """A one-head `SuSiE` whose per-frequency weights all equal `weight` (0.5 is its initialisation)."""
    susie = SuSiE(n_heads=1, head_dim=head_dim)
    with torch.no_grad():
        susie.weight.fill_(weight)
    return susie


@single_threaded
@torch.no_grad()
def susie_sq_distance(q: torch.Tensor, k: torch.Tensor, query_position: int, key_positions: Sequence[int],
                      weight: float = 0.5) -> dict[str, torch.Tensor]:
    """||(q + p_i) - (k + p_j)||^2 through `SuSiE`, and its three terms, each (B, N).

    "total" comes from the module's forward pass; "content" = ||q - k||^2, "positional" =
    ||p_i - p_j||^2 and "cross" = 2 (q - k).(p_i - p_j) from its `embedding` table.
    """
    susie = susie_module(q.shape[-1], weight)
    keys = _positions(key_positions)
    sq, _ = susie(q[:, None], q[:, None], _positions([query_position]))
    _, sk = susie(k[:, None].expand(-1, len(keys), -1), k[:, None].expand(-1, len(keys), -1), keys)
    p_i = susie.embedding(_positions([query_position]))[0]                      # (1, D)
    p_j = susie.embedding(keys)[0]                                              # (N, D)
    diff_p = p_i - p_j
    return {"total": (sq - sk).square().sum(-1),
            "content": (q - k).square().sum(-1)[:, None].expand(-1, len(keys)),
            "positional": diff_p.square().sum(-1)[None].expand(len(q), -1),
            "cross": 2 * (q - k) @ diff_p.T}


def susie_positional_distance(offsets: Sequence[int], weight: float, head_dim: int,
                              base: float = 10000.0) -> torch.Tensor:
    """Closed form ||p_i - p_j||^2 = sum_f 2 w^2 (1 - cos(d t_f)) for offsets d, one weight for all f: (N,)."""
    angles = torch.as_tensor(offsets, dtype=torch.float32)[:, None] * inverse_frequencies(head_dim, base)
    return (2 * weight ** 2 * (1 - angles.cos())).sum(-1)


def content_pairs(n: int, dim: int, similarity: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n query/key pairs with N(0, 1) entries and correlation `similarity`: k = s q + sqrt(1 - s^2) z."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, dim, generator=g)
    z = torch.randn(n, dim, generator=g)
    return q, similarity * q + math.sqrt(max(0.0, 1 - similarity ** 2)) * z


def _quantile_summary(d: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo, hi = torch.quantile(d, torch.tensor([0.1, 0.9]), dim=0)
    return d.mean(0).numpy(), lo.numpy(), hi.numpy()


@functools.lru_cache(maxsize=None)
@single_threaded
def _rope_curve(similarity: float, dim: int, context: int, n_pairs: int, seed: int):
    """RoPE's part of `offset_curves` (it has no weight to slide, so each similarity is computed once)."""
    q, k = content_pairs(n_pairs, dim, similarity, seed)
    i = context - 1
    return _quantile_summary(rope_sq_distance(q, k, i, list(range(i, -1, -1))) / math.sqrt(dim))


@single_threaded
def offset_curves(susie_weight: float, similarity: float, dim: int = 64, context: int = 256,
                  n_pairs: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Scaled squared distance c||.||^2 (c = 1/sqrt(dim), the logit scale) against the offset d.

    The query sits at the last slot, context - 1, and the key at context - 1 - d. For `n_pairs`
    content pairs (`content_pairs`) returns the mean and the 10% / 90% quantiles under RoPE and under
    SuSiE, the offset-free content distance and SuSiE's position term.
    """
    q, k = content_pairs(n_pairs, dim, similarity, seed)
    offsets = np.arange(context)
    i = context - 1
    c = 1 / math.sqrt(dim)
    susie = c * susie_sq_distance(q, k, i, (i - offsets).tolist(), susie_weight)["total"]
    out = {"offset": offsets, "content": c * (q - k).square().sum(-1).mean().item(),
           "positional": c * susie_positional_distance(offsets.tolist(), susie_weight, dim).numpy()}
    out["rope"], out["rope_lo"], out["rope_hi"] = _rope_curve(similarity, dim, context, n_pairs, seed)
    out["susie"], out["susie_lo"], out["susie_hi"] = _quantile_summary(susie)
    return out


def _band(x, lo, hi, color, name):
    return go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([hi, lo[::-1]]), fill="toself",
                      fillcolor=color, line=dict(width=0), hoverinfo="skip", name=name, showlegend=False)


def draw_offset_distance(susie_weight: float, similarity: float) -> go.Figure:
    """Distance between a query and a key against their offset, RoPE vs SuSiE, for one content similarity."""
    curves = offset_curves(susie_weight, similarity)
    x = curves["offset"]
    fig = go.Figure([
        _band(x, curves["rope_lo"], curves["rope_hi"], "rgba(31,119,180,0.15)", "RoPE 10-90%"),
        _band(x, curves["susie_lo"], curves["susie_hi"], "rgba(44,160,44,0.15)", "SuSiE 10-90%"),
        go.Scatter(x=x, y=curves["rope"], name="RoPE (mean over 64 pairs)", line=dict(color=DOT)),
        go.Scatter(x=x, y=curves["susie"], name="SuSiE (mean over 64 pairs)", line=dict(color=SUSIE)),
        go.Scatter(x=[x[0], x[-1]], y=[curves["content"]] * 2, mode="lines", name="content only c‖q−k‖²",
                   line=dict(color="black", dash="dash")),
        go.Scatter(x=x, y=curves["positional"], name="SuSiE's position term c‖pᵢ−pⱼ‖²",
                   line=dict(color=RBF, dash="dot")),
    ])
    fig.update_layout(height=430, margin=dict(t=70, b=20),
                      xaxis=dict(title="offset i − j (query at slot 255, key at 255 − offset)"),
                      yaxis=dict(title="c · squared distance (logit units)", range=[0, 32]),
                      title_text=f"SuSiE weight {susie_weight:g}, content similarity {similarity:g}: "
                                 f"content distance {curves['content']:.1f}, SuSiE adds up to "
                                 f"{curves['positional'].max():.1f}")
    return fig


def offset_distance_explorer(live: bool = False):
    """Sliders: SuSiE's weight w and the similarity of the query's and the key's content."""
    return explorer(draw_offset_distance,
                    {"susie_weight": [0.0, 0.25, 0.5, 1.0], "similarity": [0.0, 0.5, 0.9, 1.0]}, live,
                    initial={"susie_weight": 0.5, "similarity": 0.9})
