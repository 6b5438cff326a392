"""Scaled RBF attention: softmax(-c||q_i - k_j||^2) v, the public entry point.

Expanding the distance, -c||q-k||^2 = c(2 q.k - ||k||^2) - c||q||^2, and the last term is constant
along each softmax row, so it cancels: RBF attention is dot-product attention (with the logits
doubled) minus a key-norm penalty. `rbf_attention` validates its inputs, then runs either the fused
Triton kernels in `rbf_lite.kernels` or a pure-PyTorch reference with the same semantics.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import numbers
import os

import torch

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the fused kernels'
REFERENCE_DTYPES = SUPPORTED_DTYPES + (torch.float64,)
BACKENDS = ("auto", "triton", "torch")


@torch.compiler.assume_constant_result
def triton_available(device: torch.device | str | None = None) -> bool:
    """True when the fused kernels can run on `device`.

    On CUDA that needs Triton and compute capability >= 8.0 (Ampere or newer: a T4 is 7.5); on the
    CPU only Triton's interpreter (TRITON_INTERPRET=1) can run them.
    """
    if not isinstance(device, torch.device):
        device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        return _cuda_runs_triton(device.index)
    return os.environ.get("TRITON_INTERPRET") == "1" and _triton_installed()


@functools.lru_cache(maxsize=None)
def _cuda_runs_triton(index: int | None) -> bool:
    """Cached: it sits on every call's path (the training shape is launch-bound)."""
    return _triton_installed() and torch.cuda.is_available() and _capability(index)[0] >= 8


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    """Cached: this sits on every call's path, and the training shape is launch-bound."""
    return torch.cuda.get_device_capability(index)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """What every backend needs (what only the fused kernels need: `_fused_kernels_refusal`)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, N, D), got {t.dim()} dims: {tuple(t.shape)}")
        if t.dtype not in REFERENCE_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64 "
                            f"(float64 by the PyTorch reference only)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (bq, hq, _, dq), (bk, hk, nk, dk), (bv, hv, nv, dv) = q.shape, k.shape, v.shape
    if (bq, hq) != (bk, hk) or (bq, hq) != (bv, hv):
        raise ValueError(f"batch and head sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if nk != nv:
        raise ValueError(f"k and v must have the same sequence length, got {nk} and {nv}")
    if not (dq == dk == dv):
        raise ValueError(f"q, k, v must share the head dimension D, got {dq}, {dk}, {dv}")
    if nk == 0 or q.shape[2] == 0:
        raise ValueError(f"sequence length must be >= 1, got q {q.shape[2]}, k {nk}")


def _fused_kernels_refusal(q: torch.Tensor) -> Exception | None:
    """The error backend='triton' raises for inputs the fused kernels cannot take, or None."""
    hint = "; backend='auto' or 'torch' runs the PyTorch reference"
    if q.dtype not in SUPPORTED_DTYPES:
        return TypeError(f"backend='triton' takes float16, bfloat16 and float32, not {q.dtype}{hint}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return ValueError(f"backend='triton': head dimension D={q.shape[-1]} is not supported; "
                          f"supported: {SUPPORTED_HEAD_DIMS}{hint}")
    return None


def _use_triton(q: torch.Tensor, backend: str) -> bool:
    """Whether to run the fused kernels: "auto" takes them when they can run these inputs here."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    refusal = _fused_kernels_refusal(q)
    if backend == "auto":
        return refusal is None and triton_available(q.device)
    if refusal is not None:
        raise refusal
    if not triton_available(q.device):
        raise RuntimeError("backend='triton' needs Triton on a CUDA GPU with compute capability >= 8.0, "
                           "or TRITON_INTERPRET=1 for CPU tensors; use backend='torch' or 'auto'")
    return True


def _resolve_scale(scale, head_dim: int) -> float:
    """`scale` as a Python float (default 1/sqrt(D)); a one-element real tensor counts as a number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.is_complex() or scale.dtype == torch.bool:
            raise ValueError(f"scale must be a number or a one-element real tensor, got a {scale.dtype} "
                             f"tensor of shape {tuple(scale.shape)}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {float(scale)}")
    return float(scale)


def rbf_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                            scale: float | None = None, return_weights: bool = False, normalize: bool = True):
    """Plain PyTorch RBF attention, written in the distance form; materialises the N x M matrix.

    normalize=False sums exp(-scale ||q_i - k_j||^2) v_j without the softmax's denominator.
    Computes in float32 (float64 stays float64) and returns v's dtype. With causal=True and
    N queries against M keys, query i sees keys j <= i + (M - N): the queries are the last N
    positions, as during generation with a KV cache.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    if acc == torch.float64:
        scores = -scale * torch.cdist(qf, kf).square()
    else:  # the expanded form, the row constant -scale ||q||^2 kept only when nothing normalises it away
        scores = scale * (2 * qf @ kf.transpose(-1, -2) - kf.square().sum(-1)[..., None, :])
        if not normalize:
            scores = (scores - scale * qf.square().sum(-1, keepdim=True)).clamp_max(0)
    if causal:
        n, m = q.shape[-2], k.shape[-2]
        visible = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(diagonal=m - n)
        scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1) if normalize else scores.exp()
    out = (weights @ vf).to(v.dtype)
    return (out, weights) if return_weights else out


def rbf_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                  scale: float | None = None, backend: str = "auto", normalize: bool = True) -> torch.Tensor:
    """Scaled RBF attention, softmax_j(-scale * ||q_i - k_j||^2) v_j, on (B, H, N, D) tensors.

    normalize=False drops the softmax: out_i = sum_j exp(-scale ||q_i - k_j||^2) v_j, every weight
    in (0, 1], rows no longer summing to 1 (the seed's experimental variant).
    backend: "triton" runs the fused FlashAttention-style kernels (GPU with compute capability
    >= 8.0, or any device under TRITON_INTERPRET=1); "torch" runs `rbf_attention_reference`;
    "auto" picks Triton when it can run these inputs here (fp16/bf16/fp32, D in 16/32/64/128) and
    the reference otherwise (e.g. float64, or the CPU). scale defaults to 1/sqrt(D); a one-element
    tensor counts as a number. Inputs may be strided views (e.g. slices of one fused qkv
    projection): the kernels read them through their strides without copying.
    """
    _check_inputs(q, k, v)
    use_triton = _use_triton(q, backend)
    scale = _resolve_scale(scale, q.shape[-1])
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention needs at least as many keys as queries (queries are aligned "
                         f"with the last keys), got {q.shape[2]} queries and {k.shape[2]} keys")
    if not use_triton:
        return rbf_attention_reference(q, k, v, causal, scale, normalize=normalize)
    from .kernels.rbf_attention import rbf_attention_op
    return rbf_attention_op(q, k, v, causal, scale, normalize)


def rbf_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               key_sqnorms: torch.Tensor | None = None, scale: float | None = None,
               backend: str = "auto") -> torch.Tensor:
    """Generation step: N new queries against M >= N cached keys, causal (query i sees j <= i + M - N).

    Same result as `rbf_attention(q, k_cache, v_cache, causal=True)`, computed for few queries
    (N <= 64) by splitting the cache across programs (flash-decoding). `key_sqnorms` (B, H, M),
    float32, holds ||k_j||^2 when the caller keeps it with the cache, so that a step computes no
    norms; it may be a view of a longer buffer but must be contiguous along M. Caches may be
    strided views (e.g. the filled part of a preallocated buffer). Inference only: when gradients
    are needed it runs `rbf_attention`, which has a backward.
    """
    _check_inputs(q, k_cache, v_cache)
    use_triton = _use_triton(q, backend)
    B, H, N, D = q.shape
    M = k_cache.shape[2]
    if N > M:
        raise ValueError(f"decoding needs at least as many cached keys as queries, got {N} queries and {M} keys")
    if key_sqnorms is not None:
        if key_sqnorms.shape != (B, H, M) or key_sqnorms.dtype != torch.float32:
            raise ValueError(f"key_sqnorms must be float32 of shape {(B, H, M)}, got "
                             f"{key_sqnorms.dtype} {tuple(key_sqnorms.shape)}")
        if key_sqnorms.device != q.device or (M > 1 and key_sqnorms.stride(-1) != 1):
            raise ValueError("key_sqnorms must be on the queries' device and contiguous along the keys")
    scale = _resolve_scale(scale, D)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache))
    if not use_triton:
        return rbf_attention_reference(q, k_cache, v_cache, causal=True, scale=scale)
    if needs_grad or N > 64:
        return rbf_attention(q, k_cache, v_cache, causal=True, scale=scale, backend="triton")
    from .kernels.rbf_decode import rbf_decode_triton
    return rbf_decode_triton(q, k_cache, v_cache, key_sqnorms, scale)
