"""Causal self-attention with interchangeable scores: dot product or Euclidean distance.

Kinds:
  sdpa           softmax(q.k / sqrt(D)) through torch's scaled_dot_product_attention
  sdpa_qknorm    the same after RMS-normalising q and k per head (learned gain), a common fix
                 for growing logits, and the dot-product baseline closest in spirit to RBF
  rbf            softmax(-||q - k||^2 / sqrt(D)) through `rbf_attention` (fused Triton kernel
                 on the GPU, the PyTorch reference where Triton cannot run)
  rbf_reference  the PyTorch reference, always: slow, but it shows its weights
  rbf_flex       the same scores as a FlexAttention score_mod, to compare against a generic
                 compiler-generated kernel (compiled on CUDA, eager and unfused on the CPU;
                 FlexAttention has no CPU backward, so CPU training falls back to the
                 reference with a warning)

With a `KVCache` the new queries are the *last* N of M slots: query i sees keys j <= i + (M - N).
`return_attn=True` computes the weights explicitly (small inputs only) for plots.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .rbf import rbf_attention, rbf_attention_reference, rbf_decode

ATTENTION_KINDS = ("sdpa", "sdpa_qknorm", "rbf", "rbf_reference", "rbf_flex")
MAX_ATTENTION_MAP_ELEMENTS = 2 ** 26  # ~256 MB of float32: beyond that a "map" is not for plotting


class KVCache:
    """Every layer's keys and values so far (after positional encoding), for O(N) decoding steps.

    With key_sqnorms=True it also keeps ||k_j||^2 per cached key, computed once when the key is
    appended, for RBF decoding (`rbf_lite.rbf_decode`).
    """

    def __init__(self, n_layers: int, key_sqnorms: bool = False):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.sqnorms: list[torch.Tensor | None] | None = [None] * n_layers if key_sqnorms else None

    @property
    def length(self) -> int:
        """Slots cached so far, registers included."""
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.sqnorms is not None:
            sq = k.float().square().sum(-1)
            self.sqnorms[layer] = sq if self.sqnorms[layer] is None else torch.cat([self.sqnorms[layer], sq], dim=2)
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def causal_visibility(n: int, m: int, device: torch.device) -> torch.Tensor:
    """(n, m) boolean mask: query i (one of the last n of m slots) sees keys j <= i + m - n."""
    return torch.ones(n, m, dtype=torch.bool, device=device).tril(diagonal=m - n)


def dot_product_attention(q, k, v, return_weights: bool = False):
    """Causal softmax(q.k / sqrt(D)) v; SDPA when no weights are wanted, explicit otherwise."""
    n, m = q.shape[2], k.shape[2]
    if not return_weights:
        if n == m:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = None if n == 1 else causal_visibility(n, m, q.device)  # SDPA's is_causal is top-left
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    weights = scores.masked_fill(~causal_visibility(n, m, q.device), float("-inf")).softmax(-1)
    return (weights @ v.float()).to(v.dtype), weights


_compiled_flex = None


def rbf_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
    """Causal RBF attention as FlexAttention: score c(2 q.k - ||k||^2), keys' norms precomputed.

    FlexAttention hands score_mod the scaled dot product, so we ask for scale 2c and subtract
    c||k_j||^2 by indexing a per-key table; ||q_i||^2 is constant along a softmax row and dropped.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    global _compiled_flex
    if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        warnings.warn("FlexAttention has no backward pass on the CPU: rbf_flex falls back to "
                      "rbf_attention_reference while gradients are needed", stacklevel=2)
        return rbf_attention_reference(q, k, v, causal=True, scale=scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    n, m = q.shape[2], k.shape[2]
    key_penalty = scale * k.float().square().sum(-1)  # (B, H, M)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - key_penalty[b, h, kv_idx]

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + (m - n)

    block_mask = create_block_mask(causal, None, None, n, m, device=q.device)
    attend = flex_attention
    if q.is_cuda:  # eager FlexAttention materialises all scores; on the GPU compile it once
        _compiled_flex = _compiled_flex or torch.compile(flex_attention)
        attend = _compiled_flex
    return attend(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=2 * scale)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; `kind` picks the score, `positional` acts on q and k."""

    def __init__(self, d_model: int, n_heads: int, kind: str = "rbf",
                 positional: nn.Module | None = None, layer_index: int = 0, bias: bool = False):
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"attention kind must be one of {ATTENTION_KINDS}, got {kind!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.kind, self.n_heads, self.head_dim = kind, n_heads, d_model // n_heads
        self.layer_index = layer_index
        # No biases by default: a zero register then has the zero key, whose distance to a query
        # is ||q||. The seed's model has them (`bias=True`, its presets reproduce it).
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim) if kind == "sdpa_qknorm" else None
        self.k_norm = nn.RMSNorm(self.head_dim) if kind == "sdpa_qknorm" else None
        self.positional = positional

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                return_attn: bool = False):
        """x (B, N, C), positions (N,) -> (output (B, N, C), weights (B, H, N, M) or None)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.positional is not None:
            q, k = self.positional(q, k, positions)
        key_sqnorms = None
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
            key_sqnorms = cache.sqnorms[self.layer_index] if cache.sqnorms is not None else None
        weights = None
        if return_attn:
            if b * self.n_heads * n * k.shape[2] > MAX_ATTENTION_MAP_ELEMENTS:
                raise ValueError(f"return_attn would materialise {b}x{self.n_heads}x{n}x{k.shape[2]} "
                                 "weights; ask for attention maps of a shorter or smaller batch")
            y, weights = self._attend(q, k, v, return_weights=True)
        elif self.kind == "rbf" and key_sqnorms is not None:
            y = rbf_decode(q, k, v, key_sqnorms=key_sqnorms)  # flash-decoding with the cached norms
        else:
            y = self._attend(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c)), weights

    def _attend(self, q, k, v, return_weights: bool = False):
        if self.kind in ("sdpa", "sdpa_qknorm"):
            return dot_product_attention(q, k, v, return_weights)
        if return_weights or self.kind == "rbf_reference":
            return rbf_attention_reference(q, k, v, causal=True, return_weights=return_weights)
        if self.kind == "rbf":
            return rbf_attention(q, k, v, causal=True)
        return rbf_flex_attention(q, k, v)
