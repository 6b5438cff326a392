"""Fused scaled-RBF attention in Triton, FlashAttention-style: forward, backward, torch op.

Scores are s_ij = c (2 q_i.k_j - ||k_j||^2), the distance score -c||q_i - k_j||^2 without its
row-constant -c||q_i||^2, which softmax ignores. The kernels work in base 2: the scores are
multiplied by log2(e) in fp32 (after the dot product, so q and k are never rounded again), the
softmax uses exp2, and the saved log-sum-exp is in base 2 too.

Forward, per block of queries: load q once, stream key/value tiles through on-chip memory, keep
a running max and sum (online softmax), never form the N x M score matrix. Key norms ||k_j||^2 are
computed once per key by a small pre-pass, not once per tile. With causal masking the key loop is
split in two stages: blocks entirely below the diagonal run without any mask, and only the blocks
that straddle the diagonal (or the ragged end of the sequence) pay for it.

Backward, with P = softmax, dP = dO V^T, Delta_i = dO_i . O_i and dS = P (dP - Delta):
    dq_i = 2c sum_j dS_ij k_j
    dk_j = 2c (sum_i dS_ij q_i - k_j sum_i dS_ij)     (the second term comes from -||k_j||^2)
    dv_j = sum_i P_ij dO_i
One launch: each program computes dk, dv for one block of keys (looping over queries) and dq for
one block of queries (looping over keys), so nothing is accumulated atomically.

Without normalisation (normalize=False) the same kernels compute out_i = sum_j exp(-c||q_i - k_j||^2) v_j:
each weight is at most 1 and the row's offset is c||q_i||^2 instead of the log-sum-exp. Delta is
then 0, and dq_i gains the term -2c q_i sum_j dS_ij that softmax's zero-sum dS cancels.

Causal masking with N queries and M keys aligns the queries with the *last* N keys: query i sees
keys j <= i + (M - N), as when decoding against a KV cache.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources, PTXASError

LOG2E = 1.4426950408889634
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# Autotuning candidates, in one list per kernel, smallest tiles last.
TUNED_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2),
                         (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 2)]
]
TUNED_BWD_CONFIGS = [
    triton.Config({"BLOCK_M1": m1, "BLOCK_N1": n1, "BLOCK_M2": m2, "BLOCK_N2": n2}, num_warps=w, num_stages=s)
    for m1, n1, m2, n2, w, s in [(32, 128, 128, 32, 4, 5), (32, 128, 128, 32, 4, 3), (32, 128, 128, 32, 8, 3),
                                 (64, 128, 128, 64, 8, 3), (64, 128, 128, 64, 8, 2), (64, 64, 64, 64, 4, 3),
                                 (32, 64, 64, 32, 4, 3), (32, 64, 64, 32, 4, 2)]
]
if INTERPRETING:
    # One small, lopsided configuration: fast on the CPU, and BLOCK_M != BLOCK_N exercises every
    # boundary case of the stage split.
    FWD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    BWD_CONFIGS = [triton.Config({"BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16},
                                 num_warps=4, num_stages=1)]
elif os.environ.get("RBF_LITE_AUTOTUNE") == "0":
    # No tuning (e.g. tests on a GPU): the smallest configuration, which fits every dtype and D.
    FWD_CONFIGS, BWD_CONFIGS = TUNED_FWD_CONFIGS[-1:], TUNED_BWD_CONFIGS[-1:]
else:
    FWD_CONFIGS, BWD_CONFIGS = TUNED_FWD_CONFIGS, TUNED_BWD_CONFIGS


def _fits_fwd(config: triton.Config, dtype: torch.dtype) -> bool:
    """fp32 tiles are twice as large: keep only the configurations that fit in shared memory."""
    return dtype != torch.float32 or config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] <= 64 * 64


def _fits_bwd(config: triton.Config, dtype: torch.dtype) -> bool:
    return dtype != torch.float32 or config.kwargs["BLOCK_N1"] <= 64


class CompiledLauncher:
    """Launches a Triton kernel through its compiled form, without the JIT's per-call binding.

    `kernel[grid](*args)` binds and specialises every argument on each call: ~30 us per launch on
    the H100 host here, against ~10 us for the compiled kernel's own launcher, and the training
    shape and decoding are launch-bound. The compiled kernel is cached under everything Triton
    specialises on, more finely than Triton does (each integer's residue mod 16, or its value when
    it is 0, 1 or beyond int32; each pointer's residue mod 16 and dtype; the constexprs and compile
    options), so a cached kernel is only reused where the JIT would have chosen it too. The first
    call of each key goes through the JIT, which compiles; under the interpreter every call does.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        params = [] if INTERPRETING else kernel.params
        self.constexpr_names = [p.name for p in params if p.is_constexpr]
        # The compiled launcher takes every argument in signature order: ours end with the constexprs.
        self.direct = not INTERPRETING and all(p.is_constexpr for p in params[len(params) - len(self.constexpr_names):])
        self.compiled: dict[tuple, object] = {}

    @staticmethod
    def _specialisation(args) -> tuple:
        return tuple([(a.data_ptr() & 15, a.dtype) if isinstance(a, torch.Tensor)
                      else (a if a <= 1 or a >= 2 ** 31 else 16 + (a & 15)) if isinstance(a, int)
                      else type(a) for a in args])

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> None:
        if not self.direct:
            self.kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
            return
        values = tuple([constexprs[name] for name in self.constexpr_names])
        key = (values, num_warps, num_stages, torch.cuda.current_device(), self._specialisation(args))
        compiled = self.compiled.get(key)
        if compiled is None:
            self.compiled[key] = self.kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
            return
        compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *values)


class Tuner:
    """Chooses a kernel's configuration once per key by timing each candidate, then launches directly.

    `triton.autotune` does the same but rebuilds its key from every argument on each call: at the
    launch-bound training shape that was ~30 us per launch (74 us against 41 us for a direct
    launch on the H100). Here the key is computed by the caller from what matters (length
    buckets, head dim, causality, dtype, device), and a cached choice costs one dict lookup.
    """

    def __init__(self, kernel, configs, fits):
        self.launcher, self.configs, self.fits = CompiledLauncher(kernel), configs, fits
        self.chosen: dict[tuple, triton.Config] = {}

    def launch(self, key: tuple, dtype: torch.dtype, grid, *args, **constexprs) -> None:
        config = self.chosen.get(key)
        if config is None:
            config = self.chosen[key] = self._choose(dtype, grid, args, constexprs)
        self._run(config, grid, args, constexprs)

    def _run(self, config, grid, args, constexprs):
        self.launcher(grid(config.kwargs), args, constexprs | config.kwargs, config.num_warps, config.num_stages)

    def _choose(self, dtype, grid, args, constexprs) -> triton.Config:
        candidates = [c for c in self.configs if self.fits(c, dtype)] or self.configs[-1:]
        if len(candidates) == 1:
            return candidates[0]
        from triton.testing import do_bench
        times = {}
        for config in candidates:  # every kernel here writes its outputs whole: re-running is safe
            try:
                times[config] = do_bench(lambda: self._run(config, grid, args, constexprs), warmup=5, rep=25)
            except (OutOfResources, PTXASError):  # too large for this GPU: not a candidate
                continue
        if not times:
            raise RuntimeError("no kernel configuration fits this GPU's shared memory")
        return min(times, key=times.get)


def _bucket(n: int) -> int:
    """Autotuning key for a length: its power-of-two bucket, so growing caches don't retune each step."""
    return 1 << max(4, math.ceil(math.log2(max(n, 1))))


@triton.jit
def _rowdot_kernel(x_ptr, y_ptr, out_ptr, sxb, sxh, sxn, sxd, syb, syh, syn, syd, H, N,
                   D: tl.constexpr, BLOCK: tl.constexpr):
    """out[b, h, n] = sum_d x[b, h, n, d] * y[b, h, n, d] in fp32: key norms and the backward's Delta."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    mask = rows[:, None] < N
    x = tl.load(x_ptr + b.to(tl.int64) * sxb + h * sxh + rows[:, None] * sxn + cols[None, :] * sxd, mask=mask, other=0.0)
    y = tl.load(y_ptr + b.to(tl.int64) * syb + h * syh + rows[:, None] * syn + cols[None, :] * syd, mask=mask, other=0.0)
    tl.store(out_ptr + bh.to(tl.int64) * N + rows, tl.sum(x.to(tl.float32) * y.to(tl.float32), axis=1), mask=rows < N)


ROWDOT = CompiledLauncher(_rowdot_kernel)


def rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) x (B, H, N, D) -> (B, H, N) fp32 row-wise dot products, read through strides."""
    B, H, N, D = x.shape
    out = torch.empty((B, H, N), device=x.device, dtype=torch.float32)
    block = 64
    ROWDOT((triton.cdiv(N, block), B * H), (x, y, out, *x.stride(), *y.stride(), H, N), {"D": D, "BLOCK": block})
    return out


@triton.jit
def _key_stages(start_m, N_K, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Split the keys a query block visits: [0, lo) needs no mask, [lo, hi) does.

    Unmasked blocks are whole (inside N_K) and, when causal, entirely visible to every row of the
    block (keys j <= start_m + offset); the masked stage holds the diagonal and the ragged end.
    """
    full_blocks_end = (N_K // BLOCK_N) * BLOCK_N
    if CAUSAL:
        lo = tl.minimum(tl.maximum((start_m + causal_offset + 1) // BLOCK_N * BLOCK_N, 0), full_blocks_end)
        hi = tl.minimum(start_m + BLOCK_M + causal_offset, N_K)
    else:
        lo = full_blocks_end
        hi = N_K
    return lo, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kn_base, stride_kn, stride_kd, stride_vn, stride_vd,
               offs_m, lo, hi, causal_offset, N_K, qk_scale, kn_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               DOT_PRECISION: tl.constexpr, NORMALIZED: tl.constexpr):
    """Accumulate over key blocks [lo, hi); MASKED blocks check bounds and causality.

    NORMALIZED: online softmax (running max m_i and sum l_i). Otherwise m_i is the row's own
    c||q_i||^2 (base 2), s - m_i is the true score -c||q_i - k_j||^2 <= 0, and its exp is summed as is.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            in_bounds = cols < N_K
            kt = tl.load(kt_ptrs, mask=in_bounds[None, :], other=0.0)
            kn = tl.load(kn_base + cols, mask=in_bounds, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            kn = tl.load(kn_base + cols)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale - kn[None, :] * kn_scale
        if MASKED:
            visible = in_bounds[None, :]
            if CAUSAL:
                visible = visible & (offs_m[:, None] + causal_offset >= cols[None, :])
            s = tl.where(visible, s, float("-inf"))
        if MASKED:
            v = tl.load(v_ptrs, mask=in_bounds[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        if NORMALIZED:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no visible key yet (possible in a decode chunk) keeps m = -inf:
            # subtract 0 instead, so that its exp2(-inf) terms are 0 and not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new
        else:
            p = tl.exp2(s - m_i[:, None])
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(q, k, v, kn, out, lse,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                H, N_Q, N_K, qk_scale, kn_scale,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                NORMALIZED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    if CAUSAL:
        # The last query blocks have the most keys to visit: start them first so that the short
        # ones fill the tail of the schedule instead of leaving a few long ones running alone.
        pid_m = tl.num_programs(0) - 1 - pid_m
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    q_tile = tl.load(q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                     mask=row_ok[:, None], other=0.0)
    k_base = k + b * skb + h * skh
    v_base = v + b * svb + h * svh
    kn_base = kn + bh.to(tl.int64) * N_K

    if NORMALIZED:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    else:
        m_i = tl.sum(q_tile.to(tl.float32) * q_tile.to(tl.float32), 1) * kn_scale
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    causal_offset = N_K - N_Q
    lo, hi = _key_stages(start_m, N_K, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_tile, k_base, v_base, kn_base, skn, skd, svn, svd,
                               offs_m, 0, lo, causal_offset, N_K, qk_scale, kn_scale,
                               BLOCK_N, HEAD_DIM, False, CAUSAL, DOT_PRECISION, NORMALIZED)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_tile, k_base, v_base, kn_base, skn, skd, svn, svd,
                               offs_m, lo, hi, causal_offset, N_K, qk_scale, kn_scale,
                               BLOCK_N, HEAD_DIM, True, CAUSAL, DOT_PRECISION, NORMALIZED)
    if NORMALIZED:
        acc = acc / l_i[:, None]
        m_i = m_i + tl.log2(l_i)
    # What the backward subtracts from a base-2 score to get log2 P: the log-sum-exp, or c||q_i||^2.
    tl.store(lse + bh.to(tl.int64) * N_Q + offs_m, m_i, mask=row_ok)
    tl.store(out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             acc.to(out.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_dkdv_inner(dk, dv, dsum, k_tile, v_tile, kn, q_base, do_base, lse_base, delta_base,
                    sqn, sqd, sdon, sdod, offs_n, lo, hi, causal_offset, N_Q, qk_scale, kn_scale,
                    BLOCK_M1: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dk (before its key-norm correction), dv and sum_i dS_ij over query blocks [lo, hi)."""
    offs_m = tl.arange(0, BLOCK_M1)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M1):
        rows = start_m + offs_m
        q_ptrs = q_base + rows[:, None] * sqn + offs_d[None, :] * sqd
        do_ptrs = do_base + rows[:, None] * sdon + offs_d[None, :] * sdod
        if MASKED:
            row_ok = rows < N_Q
            q_tile = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do_tile = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse_i = tl.load(lse_base + rows, mask=row_ok, other=0.0)
            delta_i = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        else:
            q_tile = tl.load(q_ptrs)
            do_tile = tl.load(do_ptrs)
            lse_i = tl.load(lse_base + rows)
            delta_i = tl.load(delta_base + rows)
        # Transposed scores: rows are keys, columns are queries.
        st = tl.dot(k_tile, tl.trans(q_tile), input_precision=DOT_PRECISION) * qk_scale - kn[:, None] * kn_scale
        pt = tl.exp2(st - lse_i[None, :])
        if MASKED:
            visible = row_ok[None, :]
            if CAUSAL:
                visible = visible & (rows[None, :] + causal_offset >= offs_n[:, None])
            pt = tl.where(visible, pt, 0.0)
        dv = tl.dot(pt.to(do_tile.dtype), do_tile, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v_tile, tl.trans(do_tile), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta_i[None, :])
        dsum += tl.sum(dst, 1)
        dk = tl.dot(dst.to(q_tile.dtype), q_tile, dk, input_precision=DOT_PRECISION)
    return dk, dv, dsum


@triton.jit
def _bwd_dq_inner(dq, dsum, q_tile, do_tile, lse_i, delta_i, k_base, v_base, kn_base, skn, skd, svn, svd,
                  offs_m, lo, hi, causal_offset, N_K, qk_scale, kn_scale,
                  BLOCK_N2: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                  CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, NORMALIZED: tl.constexpr):
    """Accumulate sum_j dS_ij k_j over key blocks [lo, hi), and sum_j dS_ij when it is not 0.

    Under softmax sum_j dS_ij = 0, so the -c||q_i||^2 part of the score has no gradient; without
    normalisation it has, and dq_i gets the extra term -2c q_i sum_j dS_ij (added by the caller).
    """
    offs_n = tl.arange(0, BLOCK_N2)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N2):
        cols = start_n + offs_n
        kt_ptrs = k_base + cols[None, :] * skn + offs_d[:, None] * skd
        vt_ptrs = v_base + cols[None, :] * svn + offs_d[:, None] * svd
        if MASKED:
            in_bounds = cols < N_K
            kt = tl.load(kt_ptrs, mask=in_bounds[None, :], other=0.0)
            vt = tl.load(vt_ptrs, mask=in_bounds[None, :], other=0.0)
            kn = tl.load(kn_base + cols, mask=in_bounds, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
            kn = tl.load(kn_base + cols)
        s = tl.dot(q_tile, kt, input_precision=DOT_PRECISION) * qk_scale - kn[None, :] * kn_scale
        p = tl.exp2(s - lse_i[:, None])
        if MASKED:
            visible = in_bounds[None, :]
            if CAUSAL:
                visible = visible & (offs_m[:, None] + causal_offset >= cols[None, :])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do_tile, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta_i[:, None])
        if not NORMALIZED:
            dsum += tl.sum(ds, 1)
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)
    return dq, dsum


@triton.jit
def _bwd_kernel(q, k, v, kn, do, lse, delta, dq, dk, dv,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
                sgb, sgh, sgn, sgd, sgkb, sgkh, sgkn, sgkd,
                H, N_Q, N_K, qk_scale, kn_scale, two_c,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, NORMALIZED: tl.constexpr,
                BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr):
    """dq is written with strides (sgb..sgd); dk and dv share strides (sgkb..sgkd)."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = q + b * sqb + h * sqh
    k_base = k + b * skb + h * skh
    v_base = v + b * svb + h * svh
    do_base = do + b * sdob + h * sdoh
    kn_base = kn + bh.to(tl.int64) * N_K
    lse_base = lse + bh.to(tl.int64) * N_Q
    delta_base = delta + bh.to(tl.int64) * N_Q
    causal_offset = N_K - N_Q

    # Part 1: dk, dv for keys [start_n, start_n + BLOCK_N1).
    start_n = pid * BLOCK_N1
    if start_n < N_K:
        offs_n = start_n + tl.arange(0, BLOCK_N1)
        key_ok = offs_n < N_K
        k_tile = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=key_ok[:, None], other=0.0)
        v_tile = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=key_ok[:, None], other=0.0)
        # Padding keys get an infinite norm: their scores are -inf and their P is exactly 0.
        kn_tile = tl.load(kn_base + offs_n, mask=key_ok, other=float("inf"))
        dk_acc = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
        dv_acc = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
        dsum = tl.zeros([BLOCK_N1], dtype=tl.float32)
        full_rows_end = (N_Q // BLOCK_M1) * BLOCK_M1
        if CAUSAL:
            # Row i sees key j when i + offset >= j. Rows from `first` on see some of these keys;
            # query blocks starting at or after `all_visible` see all of them.
            first = tl.maximum(start_n - causal_offset, 0) // BLOCK_M1 * BLOCK_M1
            all_visible = (tl.maximum(start_n + BLOCK_N1 - 1 - causal_offset, 0) + BLOCK_M1 - 1) // BLOCK_M1 * BLOCK_M1
        else:
            first = 0
            all_visible = 0
        # Stages: masked blocks across the diagonal, unmasked full blocks, the masked ragged tail.
        diag_end = tl.maximum(tl.minimum(all_visible, full_rows_end), first)
        dk_acc, dv_acc, dsum = _bwd_dkdv_inner(dk_acc, dv_acc, dsum, k_tile, v_tile, kn_tile, q_base, do_base,
                                               lse_base, delta_base, sqn, sqd, sdon, sdod, offs_n,
                                               first, diag_end, causal_offset, N_Q, qk_scale, kn_scale,
                                               BLOCK_M1, HEAD_DIM, True, CAUSAL, DOT_PRECISION)
        dk_acc, dv_acc, dsum = _bwd_dkdv_inner(dk_acc, dv_acc, dsum, k_tile, v_tile, kn_tile, q_base, do_base,
                                               lse_base, delta_base, sqn, sqd, sdon, sdod, offs_n,
                                               diag_end, full_rows_end, causal_offset, N_Q, qk_scale, kn_scale,
                                               BLOCK_M1, HEAD_DIM, False, CAUSAL, DOT_PRECISION)
        dk_acc, dv_acc, dsum = _bwd_dkdv_inner(dk_acc, dv_acc, dsum, k_tile, v_tile, kn_tile, q_base, do_base,
                                               lse_base, delta_base, sqn, sqd, sdon, sdod, offs_n,
                                               tl.maximum(full_rows_end, diag_end), N_Q, causal_offset, N_Q,
                                               qk_scale, kn_scale, BLOCK_M1, HEAD_DIM, True, CAUSAL, DOT_PRECISION)
        # The key-norm term of dk: d(-||k_j||^2)/dk_j = -2 k_j, weighted by sum_i dS_ij.
        dk_tile = two_c * (dk_acc - k_tile.to(tl.float32) * dsum[:, None])
        dv_ptrs = dv + b * sgkb + h * sgkh + offs_n[:, None] * sgkn + offs_d[None, :] * sgkd
        dk_ptrs = dk + b * sgkb + h * sgkh + offs_n[:, None] * sgkn + offs_d[None, :] * sgkd
        tl.store(dv_ptrs, dv_acc.to(dv.dtype.element_ty), mask=key_ok[:, None])
        tl.store(dk_ptrs, dk_tile.to(dk.dtype.element_ty), mask=key_ok[:, None])

    # Part 2: dq for queries [start_m, start_m + BLOCK_M2).
    start_m = pid * BLOCK_M2
    if start_m < N_Q:
        offs_m = start_m + tl.arange(0, BLOCK_M2)
        row_ok = offs_m < N_Q
        q_tile = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0)
        do_tile = tl.load(do_base + offs_m[:, None] * sdon + offs_d[None, :] * sdod, mask=row_ok[:, None], other=0.0)
        lse_i = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        delta_i = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dq_acc = tl.zeros([BLOCK_M2, HEAD_DIM], dtype=tl.float32)
        dsum = tl.zeros([BLOCK_M2], dtype=tl.float32)
        lo, hi = _key_stages(start_m, N_K, causal_offset, BLOCK_M2, BLOCK_N2, CAUSAL)
        dq_acc, dsum = _bwd_dq_inner(dq_acc, dsum, q_tile, do_tile, lse_i, delta_i, k_base, v_base, kn_base, skn, skd, svn, svd,
                               offs_m, 0, lo, causal_offset, N_K, qk_scale, kn_scale,
                               BLOCK_N2, HEAD_DIM, False, CAUSAL, DOT_PRECISION, NORMALIZED)
        dq_acc, dsum = _bwd_dq_inner(dq_acc, dsum, q_tile, do_tile, lse_i, delta_i, k_base, v_base, kn_base, skn, skd, svn, svd,
                               offs_m, lo, hi, causal_offset, N_K, qk_scale, kn_scale,
                               BLOCK_N2, HEAD_DIM, True, CAUSAL, DOT_PRECISION, NORMALIZED)
        dq_ptrs = dq + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :] * sgd
        if not NORMALIZED:
            dq_acc -= q_tile.to(tl.float32) * dsum[:, None]
        tl.store(dq_ptrs, (two_c * dq_acc).to(dq.dtype.element_ty), mask=row_ok[:, None])


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products ("ieee"), not TF32: that is what asking for fp32 means."""
    return "ieee" if dtype == torch.float32 else "tf32"


FWD_TUNER = Tuner(_fwd_kernel, FWD_CONFIGS, _fits_fwd)
BWD_TUNER = Tuner(_bwd_kernel, BWD_CONFIGS, _fits_bwd)


def _device_of(t: torch.Tensor):
    """Launch on the tensor's GPU, whatever the current device is (multi-GPU processes)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _tuning_key(q, k, causal, normalize):
    return (_bucket(q.shape[2]), _bucket(k.shape[2]), q.shape[3], causal, normalize, q.dtype, q.device)


def _forward(q, k, v, causal: bool, scale: float, normalize: bool):
    """Output; per row the base-2 log-sum-exp (or c||q_i||^2 without normalisation); ||k_j||^2."""
    B, H, N, D = q.shape
    M = k.shape[2]
    out = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    with _device_of(q):
        kn = rowdot(k, k)
        FWD_TUNER.launch(_tuning_key(q, k, causal, normalize), q.dtype, lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H),
                         q, k, v, kn, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                         H, N, M, 2.0 * scale * LOG2E, scale * LOG2E,
                         HEAD_DIM=D, CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype), NORMALIZED=normalize)
    return out, lse, kn


def _backward(dout, q, k, v, out, lse, kn, causal: bool, scale: float, normalize: bool):
    """(dq, dk, dv). The kernel's scores and lse are in base 2, so P = exp2(s2 - lse2) is the true
    softmax, and dS = P (dP - Delta) is the gradient with respect to the natural-unit score."""
    B, H, N, D = q.shape
    M = k.shape[2]
    dq = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, H, M, D), device=q.device, dtype=k.dtype)
    dv = torch.empty_like(dk)
    with _device_of(q):
        # Delta_i = dO_i . O_i comes from the softmax's normalisation; without it, it is 0.
        delta = rowdot(out, dout) if normalize else torch.zeros((B, H, N), device=q.device, dtype=torch.float32)
        BWD_TUNER.launch(_tuning_key(q, k, causal, normalize), q.dtype,
                         lambda meta: (max(triton.cdiv(M, meta["BLOCK_N1"]), triton.cdiv(N, meta["BLOCK_M2"])), B * H),
                         q, k, v, kn, dout, lse, delta, dq, dk, dv,
                         *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *dk.stride(),
                         H, N, M, 2.0 * scale * LOG2E, scale * LOG2E, 2.0 * scale,
                         HEAD_DIM=D, CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype), NORMALIZED=normalize)
    return dq, dk, dv


@torch.library.custom_op("rbf_lite::rbf_attention_fwd", mutates_args=())
def rbf_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                      normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: the output, plus for the backward each row's base-2 offset and ||k_j||^2."""
    return _forward(q, k, v, causal, scale, normalize)


@rbf_attention_fwd.register_fake
def _(q, k, v, causal, scale, normalize):
    B, H, N, D = q.shape
    return (q.new_empty((B, H, N, D)), q.new_empty((B, H, N), dtype=torch.float32),
            q.new_empty((B, H, k.shape[2]), dtype=torch.float32))


@torch.library.custom_op("rbf_lite::rbf_attention_bwd", mutates_args=())
def rbf_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, kn: torch.Tensor, causal: bool, scale: float,
                      normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: (dq, dk, dv) from the forward's output, row offsets and key norms."""
    return _backward(dout, q, k, v, out, lse, kn, causal, scale, normalize)


@rbf_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, kn, causal, scale, normalize):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, normalize = inputs
    out, lse, kn = output
    ctx.save_for_backward(q, k, v, out, lse, kn)
    ctx.causal, ctx.scale, ctx.normalize = causal, scale, normalize


def _backward_rule(ctx, dout, _dlse, _dkn):
    q, k, v, out, lse, kn = ctx.saved_tensors
    dq, dk, dv = rbf_attention_bwd(dout, q, k, v, out, lse, kn, ctx.causal, ctx.scale, ctx.normalize)
    return dq, dk, dv, None, None, None


rbf_attention_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


class _EagerRBFAttention(torch.autograd.Function):
    """The same kernels for eager mode, without the custom op's dispatch (tens of us per call)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, normalize):
        out, lse, kn = _forward(q, k, v, causal, scale, normalize)
        ctx.save_for_backward(q, k, v, out, lse, kn)
        ctx.causal, ctx.scale, ctx.normalize = causal, scale, normalize
        return out

    @staticmethod
    def backward(ctx, dout):
        return (*_backward(dout, *ctx.saved_tensors, ctx.causal, ctx.scale, ctx.normalize), None, None, None)


def rbf_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                     normalize: bool = True) -> torch.Tensor:
    """The fused attention; inputs are assumed validated by `rbf_lite.rbf_attention`.

    Under torch.compile the custom op is traced as one node; in eager mode an autograd.Function
    runs the same forward and backward with less overhead per call.
    """
    if torch.compiler.is_compiling():
        return rbf_attention_fwd(q, k, v, causal, scale, normalize)[0]
    return _EagerRBFAttention.apply(q, k, v, causal, scale, normalize)
