"""Decoding against a KV cache: a few new queries, many cached keys (flash-decoding).

With one query per sequence the attention kernel has a single block of queries per head, so
B x H programs are all the parallelism there is, far too few for a long cache. Here the cache is
cut into chunks, one program per (chunk, head): each runs the same online softmax as the forward
kernel over its keys and writes a partial output normalised within the chunk and that chunk's
log-sum-exp; the last program of a head to finish (an atomic count per head says which) combines
the chunks by their softmax weight,
    out = sum_s 2^(lse_s - lse) o_s,  lse = log2 sum_s 2^(lse_s),
so that a step is one launch, as SDPA's: at short caches a step is bound by host time, and a
second launch and two more allocations cost more than the whole kernel (H100 host: 40-70 us per
step against 30-37 us with one launch). The partials and counts live in a workspace kept per GPU
and stream; the combining program sets its count back to 0 for the next step.
With a single chunk (many sequences, or short caches) the program writes the output directly.
Key norms ||k_j||^2 are passed in when the caller keeps them with the cache (they change only
where keys are appended), so a step reads each cached key once and computes no norm.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .rbf_attention import (LOG2E, CompiledLauncher, _device_of, _dot_precision, _fwd_inner, cdiv, next_power_of_2,
                           rowdot)

MAX_DECODE_QUERIES = 64  # beyond this the attention kernel's own query blocks parallelise well
KEYS_PER_CHUNK_MIN = 256


@triton.jit
def _combine_chunks(part, lse_offset, out, bh, b, h, n_chunks, N_Q, sob, soh, son, sod,
                    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """out[row] = sum_s 2^(lse_s - lse) o_s over one head's chunks, for each query row. The partials
    were written by other programs: read them from L2 (.cg), past this SM's L1."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    in_range = offs_s < n_chunks
    for row in range(0, N_Q):
        rows = (bh.to(tl.int64) * n_chunks + offs_s) * N_Q + row
        lse = tl.load(part + lse_offset + rows, mask=in_range, other=float("-inf"), cache_modifier=".cg")
        weights = tl.exp2(lse - tl.max(lse, 0))  # the top is finite: every query sees key 0
        parts = tl.load(part + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=in_range[:, None], other=0.0,
                        cache_modifier=".cg")
        result = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
        tl.store(out + b * sob + h * soh + row * son + offs_d * sod, result.to(out.dtype.element_ty))


@triton.jit
def _decode_kernel(q, k, v, kn, part, counts, out,
                   sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, snb, snh, sob, soh, son, sod,
                   H, N_Q, N_K, CHUNK, lse_offset, qk_scale, kn_scale,
                   HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, SINGLE_CHUNK: tl.constexpr):
    """Online softmax of all queries over keys [chunk * CHUNK, (chunk + 1) * CHUNK). SINGLE_CHUNK:
    the chunk is the whole cache, and the normalised rows go straight to `out`. Otherwise the
    chunk's output goes to `part` (its base-2 log-sum-exp at part + lse_offset), and the head's
    last program combines them."""
    chunk, bh = tl.program_id(0), tl.program_id(1)
    n_chunks = tl.num_programs(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    q_tile = tl.load(q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                     mask=row_ok[:, None], other=0.0)
    causal_offset = N_K - N_Q
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, N_K)
    # Keys j <= offset are visible to every query (query i sees j <= i + offset): no mask there.
    all_visible = tl.minimum((causal_offset + 1) // BLOCK_N * BLOCK_N, (N_K // BLOCK_N) * BLOCK_N)
    split = tl.maximum(tl.minimum(all_visible, end), start)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = k + b * skb + h * skh
    v_base = v + b * svb + h * svh
    kn_base = kn + b * snb + h * snh
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_tile, k_base, v_base, kn_base, False, b, h, skn, skd, svn, svd,
                               offs_m, start, split, causal_offset, N_K, qk_scale, kn_scale,
                               BLOCK_N, HEAD_DIM, False, True, DOT_PRECISION, True, False, False)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_tile, k_base, v_base, kn_base, False, b, h, skn, skd, svn, svd,
                               offs_m, split, end, causal_offset, N_K, qk_scale, kn_scale,
                               BLOCK_N, HEAD_DIM, True, True, DOT_PRECISION, True, False, False)
    if SINGLE_CHUNK:  # every query sees key 0, so l_i > 0
        tl.store(out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
                 (acc / l_i[:, None]).to(out.dtype.element_ty), mask=row_ok[:, None])
    else:
        seen = l_i > 0  # a query may see no key of this chunk: it contributes nothing
        chunk_out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        row = (bh.to(tl.int64) * n_chunks + chunk) * N_Q + offs_m
        tl.store(part + lse_offset + row, lse, mask=row_ok)
        tl.store(part + row[:, None] * HEAD_DIM + offs_d[None, :], chunk_out, mask=row_ok[:, None])
        # Every thread's stores before the count (the barrier), published by its release; the
        # program that counts last sees all the head's partials (acquire) and combines them.
        tl.debug_barrier()
        finished = tl.atomic_add(counts + bh, 1, sem="acq_rel", scope="gpu")
        if finished == n_chunks - 1:
            _combine_chunks(part, lse_offset, out, bh, b, h, n_chunks, N_Q, sob, soh, son, sod, HEAD_DIM, BLOCK_S)
            tl.store(counts + bh, 0)  # ready for the next step on this stream


DECODE = CompiledLauncher(_decode_kernel)
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, floats: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partials, int32 counts, all 0) for a multi-chunk step, kept per GPU and stream: steps on
    one stream run in order, so each can reuse what the one before left (counts back at 0). A CUDA
    graph that captures a step keeps the workspace of the stream it was captured on: replay it on that
    stream, or on one that no eager step of that stream overlaps."""
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    part, counts = _WORKSPACES.get(key) or (torch.empty(0), torch.empty(0))
    if part.numel() < floats or counts.numel() < heads:
        part = torch.empty(max(floats, part.numel()), device=device, dtype=torch.float32)
        counts = torch.zeros(max(heads, counts.numel()), device=device, dtype=torch.int32)
        _WORKSPACES[key] = part, counts
    return part, counts


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Per GPU, asked once: `get_device_properties` costs 3-5 us of host time per call (H100 host)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def default_chunks(batch_heads: int, n_keys: int, device: torch.device) -> int:
    """Enough chunks for about two programs per multiprocessor, none shorter than 256 keys."""
    return max(1, min(math.ceil(2 * _multiprocessors(device) / batch_heads), math.ceil(n_keys / KEYS_PER_CHUNK_MIN)))


def rbf_decode_triton(q, k, v, key_sqnorms, scale: float, num_chunks: int | None = None) -> torch.Tensor:
    """Causal RBF attention of N_Q <= 64 new queries against M cached keys (query i sees j <= i + M - N_Q)."""
    B, H, N, D = q.shape
    M = k.shape[2]
    chunks = num_chunks or default_chunks(B * H, M, q.device)
    # Key blocks of 128 where the cache is split (H100, same process: 3-12% faster steps at batch 1
    # and 8), of 64 for one chunk per head (about 1% faster at batch 64); fp32 tiles are twice as large.
    block_n = 32 if q.dtype == torch.float32 else 64 if chunks == 1 else 128
    chunk = cdiv(cdiv(M, chunks), block_n) * block_n  # chunks start on key-block bounds
    chunks = cdiv(M, chunk)
    out = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    with _device_of(q):
        lse_offset = B * H * chunks * N * D  # the partial outputs first, then their log-sum-exps
        if chunks == 1:  # never read: the kernel stores straight into out
            part = counts = out
        else:
            part, counts = _workspace(q.device, lse_offset + B * H * chunks * N, B * H)
        kn = rowdot(k, k) if key_sqnorms is None else key_sqnorms
        DECODE((chunks, B * H),
               (q, k, v, kn, part, counts, out, *q.stride(), *k.stride(), *v.stride(), kn.stride(0), kn.stride(1),
                *out.stride(), H, N, M, chunk, lse_offset, 2.0 * scale * LOG2E, scale * LOG2E),
               {"HEAD_DIM": D, "DOT_PRECISION": _dot_precision(q.dtype), "BLOCK_M": max(16, next_power_of_2(N)),
                "BLOCK_N": block_n, "BLOCK_S": next_power_of_2(chunks), "SINGLE_CHUNK": chunks == 1},
               num_warps=4, num_stages=2)
    return out
