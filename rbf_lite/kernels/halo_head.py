"""Fused HALO loss in Triton: the loss and all its gradients in one launch, during the forward.

Why. Composed from torch ops, a HALO training step (`HALOLoss`, return_logits=False) launches about
90 small kernels forward and backward for a (batch x D) by (D x K) problem: on a GPU the step is
bound by launches, not arithmetic. The loss is a scalar, so the gradient with respect to every
input is fixed once the forward has run: the kernel computes it then, and the backward only scales
it by grad_output (one multiply).

The maths (`rbf_lite.halo` is the specification, with its two variants). Per row i, with C the
centroids (mean-centred first when CENTRE: C = C_raw - mean_k C_raw) and theta the gamma parameter:
    gamma = softplus(theta) (PUBLISHED) or exp(theta) (rbf_lite: theta = log_gamma)
    z_k = gamma (2 x.c_k - ||c_k||^2) / D  (k < K),  abstain z_K = b:
        b = abstain_offset (PUBLISHED: the fixed bias), or -gamma (1 - 2/D) + abstain_offset
        (rbf_lite: abstain_offset = -margin)
    p = softmax(z),  t = soft targets, 0 on abstain:
        PUBLISHED, DISTILL: softmax over k < K of (0 on y, min(z_k - gamma ||x||^2 / D, 0) / eps)
        PUBLISHED, smooth: eps/K + (1 - eps) [k = y]
        rbf_lite: 1 - eps on y; eps over the negatives, in proportion to softmax of the detached
        negative logits (DISTILL) or uniformly
    CE = -sum_k t_k log p_k,  e = x - c_y,  r2 = max(||e||^2 / D, 1e-6)
    L_rad = -((1/2 - 1/D) log r2 - r2 / 2),  loss = CE + w L_rad
Gradients, with t and b detached (abstain has no parameter, and gamma is detached in b):
    dz_k = p_k - t_k,  G_ik = dz_ik 2 gamma / D,  h_i = w (2/D) dL_rad/dr2
    dL_rad/dr2 = -((1/2 - 1/D) / r2 - 1/2), and 0 where r2 was clamped
    dx_i = sum_k G_ik c_k + h_i e_i
    dc_k = sum_i G_ik (x_i - c_k) - sum_{i: y_i = k} h_i e_i
    dtheta = sum_{i, k<K} dz_ik z_ik / gamma * dgamma/dtheta  (z_k is linear in gamma), with
        dgamma/dtheta = gamma (rbf_lite: so sum dz z) or sigmoid(theta) (PUBLISHED)
    dC_raw = dC - mean_k dC  (the centring's backward; linear, so each program may apply it)
The radial term uses e = x - c_y directly, gathered row by row, not the expanded square: exact
(r2 = 0, clamped, zero gradient) at x = c_y, as in the torch path.

Work split: program p owns ROWS rows and walks them in blocks of BLOCK; it writes its rows of dx and
one partial row [dC (K*D) | dtheta | loss | targets check]. With one program (the CIFAR
training batch) that row is the final result; with several the launcher sums the partial rows with
one reduction. Everything lands in one flat buffer [dx | dC | dtheta | loss | check], so the
backward is a single multiply and the returned gradients are views.

The kernel also checks the targets: a CUDA caller asserts on the check asynchronously (one launch)
instead of the five of `check_batch`'s comparison chain. Out-of-range targets are masked, never
read out of bounds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .rbf_attention import CompiledLauncher, _device_of, cdiv, next_power_of_2

# The centroid tile (and its gradient) lives in registers: above this it would spill, and the
# problem is large enough for the torch path not to be launch-bound.
MAX_TILE = 128 * 128


def _padded(n: int) -> int:
    """tl.arange needs powers of two and tl.dot at least 16 along every axis."""
    return max(16, next_power_of_2(n))


def fits(num_classes: int, dim: int) -> bool:
    """Whether the fused kernel takes this head size (the centroids tile fits in registers)."""
    return _padded(num_classes) * _padded(dim) <= MAX_TILE


@triton.jit
def _softplus_and_sigmoid(theta):
    """softplus(theta) = max(theta, 0) + log1p(exp(-|theta|)) and its derivative sigmoid(theta),
    without overflow. log1p by Kahan's trick, log(w) u / (w - 1) with w = 1 + u rounded: plain
    log(1 + u) would lose all of a small softplus (theta << 0) to the rounding of 1 + u."""
    u = tl.exp(-tl.abs(theta))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * u / tl.where(w == 1.0, 1.0, w - 1.0))
    sigmoid = tl.where(theta >= 0, 1.0 / w, u / w)
    return tl.maximum(theta, 0.0) + log1p, sigmoid


@triton.jit
def _halo_kernel(x_ptr, y_ptr, c_ptr, theta_ptr, dx_ptr, part_ptr,
                 B, K, D, stride_xb, stride_xd, stride_y, stride_ck, stride_cd, part_stride,
                 scale, eps, abstain_offset, radial_weight,
                 K_PAD: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                 CENTRE: tl.constexpr, DISTILL: tl.constexpr, PUBLISHED: tl.constexpr,
                 SINGLE: tl.constexpr):
    """One program: loss, dx for its ROWS rows, and its partial [dC | dtheta | loss | check].

    `scale` is 1/B for reduction="mean", 1 for "sum". SINGLE (one program): the check slot holds
    1 when every target is valid (assertable as is); otherwise the count of invalid targets.
    """
    pid = tl.program_id(0)
    offs_k = tl.arange(0, K_PAD)
    offs_d = tl.arange(0, D_PAD)
    k_ok = offs_k < K
    d_ok = offs_d < D
    c_mask = k_ok[:, None] & d_ok[None, :]
    c = tl.load(c_ptr + offs_k[:, None] * stride_ck + offs_d[None, :] * stride_cd, mask=c_mask, other=0.0)
    centre = tl.zeros((D_PAD,), dtype=tl.float32)
    if CENTRE:
        centre = tl.sum(c, axis=0) / K  # padded rows load as 0, padded columns stay 0
        c = tl.where(c_mask, c - centre[None, :], 0.0)
    c_norms = tl.sum(c * c, axis=1)
    theta = tl.load(theta_ptr)
    if PUBLISHED:
        gamma, dgamma_dtheta = _softplus_and_sigmoid(theta)
        abstain = abstain_offset
    else:
        gamma = tl.exp(theta)
        abstain = -gamma * (1.0 - 2.0 / D) + abstain_offset
    shell = 0.5 - 1.0 / D

    dc = tl.zeros((K_PAD, D_PAD), dtype=tl.float32)
    g_colsum = tl.zeros((K_PAD,), dtype=tl.float32)
    dz_dot_z = tl.zeros((BLOCK,), dtype=tl.float32)
    loss = tl.zeros((BLOCK,), dtype=tl.float32)
    invalid = tl.zeros((BLOCK,), dtype=tl.int32)
    first = pid * ROWS
    for start in range(first, tl.minimum(first + ROWS, B), BLOCK):
        rows = start + tl.arange(0, BLOCK)
        row_ok = rows < B
        rows64 = rows.to(tl.int64)
        x_mask = row_ok[:, None] & d_ok[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_xb + offs_d[None, :] * stride_xd, mask=x_mask, other=0.0)
        y = tl.load(y_ptr + rows64 * stride_y, mask=row_ok, other=0)
        y_ok = (y >= 0) & (y < K)
        invalid += (row_ok & ~y_ok).to(tl.int32)
        y = tl.where(y_ok, y, 0).to(tl.int32)

        # Logits and softmax over the K known columns plus the constant abstain column.
        # Padded columns keep a finite z (0: their centroid is 0) and are masked out of every sum.
        z = gamma * (2.0 * tl.dot(x, tl.trans(c), input_precision="ieee") - c_norms[None, :]) / D
        z_known = tl.where(k_ok[None, :], z, float("-inf"))
        top = tl.maximum(tl.max(z_known, axis=1), abstain)
        e_known = tl.exp(z_known - top[:, None])
        total = tl.sum(e_known, axis=1) + tl.exp(abstain - top)
        log_total = top + tl.log(total)
        p = e_known / total[:, None]

        # Soft targets (detached), 0 on abstain and padding.
        is_true = offs_k[None, :] == y[:, None]
        negative = k_ok[None, :] & ~is_true
        if PUBLISHED:
            if DISTILL:
                # Scores <= 0, the true class's 0: no overflow, no running maximum needed.
                true_logits = tl.minimum(z - gamma * (tl.sum(x * x, axis=1) / D)[:, None], 0.0)
                scores = tl.where(negative, true_logits / eps, tl.where(is_true, 0.0, float("-inf")))
                e_scores = tl.exp(scores)
                t = e_scores / tl.sum(e_scores, axis=1)[:, None]
            else:
                t = tl.where(k_ok[None, :], eps / K, 0.0) + tl.where(is_true, 1.0 - eps, 0.0)
        else:
            if DISTILL:
                z_neg = tl.where(negative, z, float("-inf"))
                e_neg = tl.exp(z_neg - tl.max(z_neg, axis=1)[:, None])
                q = e_neg / tl.sum(e_neg, axis=1)[:, None]
            else:
                q = tl.where(negative, 1.0 / (K - 1), 0.0)
            t = tl.where(is_true, 1.0 - eps, eps * q)
        cross_entropy = -tl.sum(t * (z - log_total[:, None]), axis=1)

        # Radial term on e = x - c_y, gathered directly (exact at x = c_y).
        c_y = tl.load(c_ptr + y[:, None] * stride_ck + offs_d[None, :] * stride_cd,
                      mask=x_mask & y_ok[:, None], other=0.0)
        if CENTRE:
            c_y = tl.where(d_ok[None, :], c_y - centre[None, :], 0.0)
        e = tl.where(x_mask, x - c_y, 0.0)
        r2_raw = tl.sum(e * e, axis=1) / D
        r2 = tl.maximum(r2_raw, 1e-6)
        radial = -(shell * tl.log(r2) - 0.5 * r2)
        loss += tl.where(row_ok, cross_entropy + radial_weight * radial, 0.0)

        # Gradients (clamp_min passes the gradient where r2_raw >= the bound, as in torch).
        dz = tl.where(row_ok[:, None] & k_ok[None, :], p - t, 0.0)
        dz_dot_z += tl.sum(dz * z, axis=1)
        g = dz * (2.0 * gamma / D)
        h = tl.where(row_ok & (r2_raw >= 1e-6), radial_weight * (2.0 / D) * -(shell / r2 - 0.5), 0.0)
        he = h[:, None] * e
        dx = tl.dot(g, c, input_precision="ieee") + he
        tl.store(dx_ptr + rows64[:, None] * D + offs_d[None, :], dx * scale, mask=x_mask)
        one_hot = tl.where(is_true & row_ok[:, None], 1.0, 0.0)
        dc = tl.dot(tl.trans(g), x, dc, input_precision="ieee")
        dc = tl.dot(tl.trans(-one_hot), he, dc, input_precision="ieee")
        g_colsum += tl.sum(g, axis=0)

    dc -= g_colsum[:, None] * c  # the -||c_k||^2 term of every logit
    if CENTRE:
        dc = tl.where(c_mask, dc - (tl.sum(dc, axis=0) / K)[None, :], 0.0)
    part = part_ptr + pid.to(tl.int64) * part_stride
    tl.store(part + offs_k[:, None] * D + offs_d[None, :], dc * scale, mask=c_mask)
    dtheta = tl.sum(dz_dot_z, axis=0)  # gamma dL/dgamma, i.e. dL/dlog_gamma
    if PUBLISHED:
        dtheta = dtheta / gamma * dgamma_dtheta
    tl.store(part + K * D, dtheta * scale)
    tl.store(part + K * D + 1, tl.sum(loss, axis=0) * scale)
    bad = tl.sum(invalid, axis=0).to(tl.float32)
    if SINGLE:
        tl.store(part + K * D + 2, tl.where(bad == 0, 1.0, 0.0))
    else:
        tl.store(part + K * D + 2, bad)


HALO_KERNEL = CompiledLauncher(_halo_kernel)  # the step is launch-bound: skip the JIT's binding


def halo_loss_and_grads(embeddings: torch.Tensor, targets: torch.Tensor, centroids: torch.Tensor,
                        theta: torch.Tensor, eps: float, abstain_offset: float, radial_weight: float,
                        distill: bool, published: bool, centre: bool, mean: bool, rows_per_program: int = 512,
                        block: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grads, valid): the reduced loss (0-dim), the flat gradients [dx (B*D) | dC (K*D) |
    dtheta] of the loss, and a one-element tensor that is nonzero iff every target is in [0, K).

    theta is the gamma parameter (gamma_raw when published, else log_gamma); abstain_offset is the
    fixed abstain bias when published, else -margin (module docstring). The published "distill"
    targets divide by eps: with eps = 0 pass distill=False (both are then one-hot).

    Inputs fp32, read through their strides; one launch, plus one reduction over the programs'
    partials when the batch spans several programs (B > rows_per_program).
    """
    B, D = embeddings.shape
    K = centroids.shape[0]
    if rows_per_program % block:
        raise ValueError(f"rows_per_program ({rows_per_program}) must be a multiple of block ({block})")
    programs = cdiv(B, rows_per_program)
    flat = embeddings.new_empty(B * D + K * D + 3)
    partials = flat[B * D:] if programs == 1 else embeddings.new_empty(programs, K * D + 3)
    k_pad, d_pad = _padded(K), _padded(D)
    with _device_of(embeddings):
        HALO_KERNEL((programs,),
                    (embeddings, targets, centroids, theta, flat, partials,
                     B, K, D, *embeddings.stride(), targets.stride(0), *centroids.stride(), K * D + 3,
                     1.0 / B if mean else 1.0, float(eps), float(abstain_offset), float(radial_weight)),
                    {"K_PAD": k_pad, "D_PAD": d_pad, "ROWS": rows_per_program, "BLOCK": block,
                     "CENTRE": centre, "DISTILL": distill, "PUBLISHED": published, "SINGLE": programs == 1},
                    num_warps=4 if k_pad * d_pad <= 64 * 64 else 8)
    if programs > 1:
        torch.sum(partials, dim=0, out=flat[B * D:])
    valid = flat[-1] if programs == 1 else flat[-1] == 0
    return flat[-2], flat[:-2], valid


class FusedHALOLoss(torch.autograd.Function):
    """HALO's reduced loss; the backward scales the gradients the forward computed by grad_output.

    apply(embeddings, targets, centroids, theta, eps, abstain_offset, radial_weight, distill,
    published, centre, mean, rows_per_program) (`halo_loss_and_grads`); gradients flow to
    embeddings, centroids (raw when centre) and theta, the gamma parameter. Inputs are assumed
    validated (`rbf_lite.halo.HALOLoss`); on CUDA the targets' range is asserted asynchronously, as
    `check_batch` does.
    """

    @staticmethod
    def forward(ctx, embeddings, targets, centroids, theta, eps, abstain_offset, radial_weight, distill,
                published, centre, mean, rows_per_program):
        loss, grads, valid = halo_loss_and_grads(embeddings, targets, centroids, theta, eps, abstain_offset,
                                                 radial_weight, distill, published, centre, mean,
                                                 rows_per_program)
        if targets.is_cuda:
            torch._assert_async(valid, f"targets must lie in [0, {centroids.shape[0]})")
        ctx.grads, ctx.shapes = grads, (embeddings.shape, centroids.shape)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (B, D), (K, _) = ctx.shapes
        grads = ctx.grads * grad_loss  # the one backward launch
        needs = ctx.needs_input_grad
        return (grads[:B * D].view(B, D) if needs[0] else None, None,
                grads[B * D:-1].view(K, D) if needs[2] else None, grads[-1] if needs[3] else None,
                None, None, None, None, None, None, None, None)
