"""Where a token is: no position, learned absolute, RoPE, or SuSiE.

`none` and `learned` act on the token embeddings (see `GPT`); `rope` and `susie` act on q and k
inside every attention layer, through a module with `forward(q, k, positions)`.

Positions are integers per sequence slot: tokens count from 0 and the `R` register slots that
precede them get -R..-1, so one tensor tells every layer which slots are registers.

Why SuSiE for distance attention: a rotation of q and k by angles that depend on position leaves
q.k depending only on the offset (that is RoPE's point), but ||q - k||^2 also contains ||q||^2 and
||k||^2 and the rotation changes how q and k line up with each other's *norms*, so RBF scores get
position effects that dot products never see. SuSiE instead *adds* the same vector e(p) to q and k:
for equal positions q + e - (k + e) = q - k, a pure content distance, and for different positions
the distance gains ||e(p) - e(p')||^2 = sum_f 2 w_f^2 (1 - cos((p - p') f)), which depends only on
the offset and grows with it (over each frequency's half period). A learnable weight per head and
frequency (initialised 0.5) lets content dominate early and position be learned where useful.
"""
from __future__ import annotations

import torch
import torch.nn as nn

POSITIONAL_KINDS = ("none", "learned", "rope", "susie")


def inverse_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """The Transformer table's frequencies base^(-2i/D), i = 0..D/2-1, shape (D/2,)."""
    if head_dim % 2:
        raise ValueError(f"sinusoidal positions need an even head dimension, got {head_dim}")
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def _token_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Angles p * f for token slots (N, D/2); register slots (p < 0) get angle 0."""
    return positions.clamp(min=0).to(torch.float32)[:, None] * inv_freq


class LearnedPositions(nn.Module):
    """Absolute learned position vectors, added to token embeddings (registers get none)."""

    def __init__(self, context_length: int, d_model: int):
        super().__init__()
        self.table = nn.Embedding(context_length, d_model)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table(positions)


class Rotary(nn.Module):
    """RoPE: rotate pairs (x_i, x_{i+D/2}) of q and k by position * frequency; registers unrotated."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, base), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        angles = _token_angles(positions, self.inv_freq)
        cos, sin = angles.cos(), angles.sin()
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class SuSiE(nn.Module):
    """Subspace sinusoidal embedding: add w[h, f] * (sin(p f), cos(p f)) to both q and k.

    The sin half and the cos half of the head dimension share one weight per frequency, so the
    positional distance ||e(p) - e(p')||^2 = sum_f 2 w_f^2 (1 - cos((p - p') f)) depends on the
    offset only. Register slots get their own learned vectors (N(0, 0.02)) instead.
    """

    def __init__(self, n_heads: int, head_dim: int, num_registers: int = 0, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, base), persistent=False)
        self.weight = nn.Parameter(torch.full((n_heads, head_dim // 2), 0.5))
        self.num_registers = num_registers
        self.register_embedding = nn.Parameter(0.02 * torch.randn(n_heads, num_registers, head_dim))

    def embedding(self, positions: torch.Tensor) -> torch.Tensor:
        """The vector added to q and k at each slot, shape (H, N, D)."""
        angles = _token_angles(positions, self.inv_freq)
        w = self.weight[:, None, :]
        table = torch.cat([w * angles.sin(), w * angles.cos()], dim=-1)
        if self.num_registers == 0:
            return table
        is_register = (positions < 0)[None, :, None]
        registers = self.register_embedding[:, (positions + self.num_registers).clamp(0, self.num_registers - 1)]
        return torch.where(is_register, registers, table)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        e = self.embedding(positions).to(q.dtype)
        return q + e, k + e


def qk_positional(kind: str, n_heads: int, head_dim: int, num_registers: int) -> nn.Module | None:
    """The per-layer q/k positional module for `kind` (None for `none` and `learned`)."""
    if kind not in POSITIONAL_KINDS:
        raise ValueError(f"positional kind must be one of {POSITIONAL_KINDS}, got {kind!r}")
    if kind == "rope":
        return Rotary(head_dim)
    if kind == "susie":
        return SuSiE(n_heads, head_dim, num_registers)
    return None
