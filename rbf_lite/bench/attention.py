"""Benchmark RBF attention against torch SDPA on one GPU: `python -m rbf_lite.bench`.

Every variant is timed in the same process, on the same inputs, with `triton.testing.do_bench`
(CUDA events, median). Ratios are against SDPA's default backend at the same shape, dtype and
causality, so "1.20x" means 20% slower than what `F.scaled_dot_product_attention` gives you.
Variants:
  sdpa, sdpa_flash, sdpa_cudnn   dot-product attention (default backend; FLASH and CUDNN pinned)
  sdpa_qknorm                    RMS-normalised q and k, then SDPA (the QK-norm baseline)
  rbf_padded_sdpa                RBF through SDPA: q' = [q, 1, 0..], k' = [k, -||k||^2/2, 0..], scale 2c
  rbf_flex                       RBF through FlexAttention with a score_mod adding -c||k||^2
  rbf_lite                       this package's fused Triton kernels
peak_mib is the memory a forward+backward allocates beyond its inputs.

Two timings per variant. *_ms: `do_bench`, which flushes L2 before each call and times the call
with CUDA events; at launch-bound shapes part of the host time hides behind the flush, by an amount
that depends on the host's speed, so these ratios swing from run to run there. *_loop_ms: calls
enqueued back to back and the wall time per call, host included: what a training loop of small
operations sees. At long sequences both agree.

With no arguments (bf16, the nine shapes, both causalities, every variant) it took 5.6 minutes on an
H200 (results/bench/attention_bf16_h200.json); `--dtypes fp16` or `bf16,fp16` for the other table.
The JSON is rewritten after each shape, with `wall_s`, the seconds spent so far. `--resume` continues
a run that stopped (a time limit) from the file it left: shapes whose every variant is there are
kept, the others measured again whole, so that each ratio still compares timings taken in one
process; only a file from the same device, versions and commit is continued.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..rbf import rbf_attention, rbf_attention_reference
from ..runs import environment, write_json

DEFAULT_SHAPES = [(4, 8, n, 64) for n in (1024, 4096, 8192, 16384)] + \
                 [(2, 16, n, 128) for n in (1024, 4096, 8192, 16384)] + [(64, 4, 256, 64)]
VARIANTS = ["sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_qknorm", "rbf_padded_sdpa", "rbf_flex", "rbf_lite"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _sdpa(backend: SDPBackend | None):
    def run(q, k, v, causal):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def _sdpa_qknorm(q, k, v, causal):
    return F.scaled_dot_product_attention(F.rms_norm(q, q.shape[-1:]), F.rms_norm(k, k.shape[-1:]), v, is_causal=causal)


def _rbf_padded_sdpa(q, k, v, causal):
    """c(2 q.k - ||k||^2) = 2c [q, 1].[k, -||k||^2/2]; pad D+1 to a multiple of 8 for the fast kernels."""
    d, pad = q.shape[-1], 8
    q_ext = torch.cat([q, torch.ones_like(q[..., :1]), q.new_zeros(*q.shape[:-1], pad - 1)], -1)
    k_ext = torch.cat([k, -0.5 * k.float().square().sum(-1, keepdim=True).to(k.dtype), k.new_zeros(*k.shape[:-1], pad - 1)], -1)
    v_ext = F.pad(v, (0, pad))
    out = F.scaled_dot_product_attention(q_ext, k_ext, v_ext, is_causal=causal, scale=2.0 / math.sqrt(d))
    return out[..., :d]


_flex_cache: dict = {}


def _rbf_flex(q, k, v, causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _flex_cache:
        # One compiled graph per shape and grad mode: raise the recompile limit so that it never
        # falls back to the unfused (N x N) implementation halfway through the table.
        torch._dynamo.config.recompile_limit = 512
        _flex_cache["fn"] = torch.compile(flex_attention, dynamic=False)
    B, H, N, D = q.shape
    key = (N, k.shape[2], causal, q.device)
    if causal and key not in _flex_cache:
        _flex_cache[key] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, N, k.shape[2], device=q.device)
    c = 1.0 / math.sqrt(D)
    key_sq = k.float().square().sum(-1)

    def score_mod(score, b, h, q_idx, kv_idx):
        return 2.0 * score - c * key_sq[b, h, kv_idx]

    return _flex_cache["fn"](q, k, v, score_mod=score_mod, block_mask=_flex_cache.get(key) if causal else None, scale=c)


def _rbf_lite(q, k, v, causal):
    return rbf_attention(q, k, v, causal=causal, backend="triton")


IMPLEMENTATIONS: dict[str, Callable] = {
    "sdpa": _sdpa(None), "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION), "sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
    "sdpa_qknorm": _sdpa_qknorm, "rbf_padded_sdpa": _rbf_padded_sdpa, "rbf_flex": _rbf_flex, "rbf_lite": _rbf_lite,
}


def back_to_back_ms(fn, budget_ms: float) -> float:
    """Wall time per call of `fn` called repeatedly for about budget_ms, synchronised at the ends."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    calls = max(10, int(budget_ms / max((time.perf_counter() - start) * 1e3, 1e-3)))
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def time_variant(fn, q, k, v, causal, warmup_ms=50, rep_ms=300):
    """(forward ms, forward+backward ms, peak MiB beyond the inputs, back-to-back forward ms,
    back-to-back forward+backward ms) for one implementation."""
    from triton.testing import do_bench

    from ..kernels.rbf_attention import finish_background_compiles
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            return fn(q, k, v, causal)

    def fwdbwd():
        out = fn(qg, kg, vg, causal)
        return torch.autograd.grad(out, (qg, kg, vg), dout)

    fwdbwd()  # compiles; first calls may go on compiling in a thread, which must not share the timing
    finish_background_compiles()
    fwd_ms = do_bench(fwd, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fwdbwd_ms = do_bench(fwdbwd, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fwd_loop_ms, fwdbwd_loop_ms = back_to_back_ms(fwd, rep_ms / 3), back_to_back_ms(fwdbwd, rep_ms / 3)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwdbwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return fwd_ms, fwdbwd_ms, peak, fwd_loop_ms, fwdbwd_loop_ms


def accuracy_rows(dtypes, device="cuda"):
    """Relative error vs float64 of rbf_lite (RBF) and SDPA (dot product) at the same dtype."""
    rows = []
    for dtype_name in dtypes:
        for d in (64, 128):
            for causal in (True, False):
                q, k, v = (torch.randn(2, 4, 1024, d, device=device, dtype=DTYPES[dtype_name]) for _ in range(3))
                q64, k64, v64 = (t.double() for t in (q, k, v))
                rbf_ref = rbf_attention_reference(q64, k64, v64, causal=causal)
                rbf = rbf_attention(q, k, v, causal=causal, backend="triton")
                with sdpa_kernel(SDPBackend.MATH):
                    sdpa_ref = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal)
                sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                err = lambda x, ref: ((x.double() - ref).norm() / ref.norm()).item()  # noqa: E731
                rows.append({"dtype": dtype_name, "d": d, "causal": causal,
                             "rbf_lite_rel_err": err(rbf, rbf_ref), "sdpa_rel_err": err(sdpa, sdpa_ref)})
    return rows


PROVENANCE = ("device", "torch", "triton", "commit")


def resumed(previous: dict, current: dict, dtypes: list[str]) -> dict:
    """The result to continue from `previous` (a file this benchmark wrote), stamped `current`:
    its rows, accuracy and tuning choices; the commands of both runs."""
    differ = [f"{key}: {previous.get(key)!r} in the file, {current[key]!r} now" for key in PROVENANCE
              if previous.get(key) != current[key]]
    if differ:
        raise SystemExit("--resume continues only a run of the same device, versions and commit; " + "; ".join(differ))
    measured = {row["dtype"] for row in previous.get("accuracy", [])}
    if not set(dtypes) <= measured:
        raise SystemExit(f"--resume: the file has accuracy rows for {sorted(measured)}, not for {sorted(dtypes)}")
    return {**current, "command": previous["command"], "resumed_by": previous.get("resumed_by", []) + [current["command"]],
            "wall_s": previous.get("wall_s", 0.0),
            "rows": previous["rows"], "accuracy": previous["accuracy"], "tuned": previous.get("tuned", {})}


def _shape(row: dict) -> tuple:
    return row["b"], row["h"], row["n"], row["d"], row["dtype"], row["causal"]


def measured_group(rows: list[dict], b: int, h: int, n: int, d: int, dtype: str, causal: bool,
                   variants: list[str]) -> bool:
    """Whether every variant has a row (a timing or a recorded error) for this shape."""
    have = {row["variant"] for row in rows if _shape(row) == (b, h, n, d, dtype, causal)}
    return set(variants) <= have


def _merged_choices(previous: dict, tuners: dict) -> dict:
    """Tuning choices of the earlier run and of this one (this one's win where a key repeats)."""
    merged = {}
    for direction, tuner in tuners.items():
        choices = {json.dumps(c["key"], sort_keys=True): c for c in previous.get(direction, []) + tuner.choices()}
        merged[direction] = list(choices.values())
    return merged


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=None, help="B,H,N,D;B,H,N,D;... (default: the issue's shapes)")
    parser.add_argument("--dtypes", default="bf16", help="comma list of bf16, fp16 (default: %(default)s)")
    parser.add_argument("--causal", default="true,false", help="comma list of true/false")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=None, help="write the JSON here")
    parser.add_argument("--rep-ms", type=float, default=300)
    parser.add_argument("--resume", action="store_true", help="continue the run that wrote --out (see above)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.resume and not (args.out and Path(args.out).exists()):
        raise SystemExit(f"--resume needs the file of an earlier run as --out; not found: {args.out}")
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU")
    shapes = DEFAULT_SHAPES if args.shapes is None else \
        [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    variants = args.variants.split(",")
    unknown = set(variants) - set(IMPLEMENTATIONS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    causals = [c.strip().lower() == "true" for c in args.causal.split(",")]
    dtypes = args.dtypes.split(",")
    if args.resume:
        result = resumed(json.loads(Path(args.out).read_text()), environment("cuda"), dtypes)
    else:
        result = {**environment("cuda"), "rows": [], "accuracy": accuracy_rows(dtypes), "tuned": {}}
    from ..kernels.rbf_attention import BWD_TUNER, FWD_TUNER
    previous_choices, wall_before = result["tuned"], result.get("wall_s", 0.0)  # (wall_s: every run's seconds)
    print(f"{'variant':16s} {'shape':>18s} {'dtype':5s} {'causal':6s} {'fwd ms':>8s} {'f+b ms':>8s} "
          f"{'fwd x':>6s} {'f+b x':>6s} {'loop fwd x':>10s} {'loop f+b x':>10s} {'peak MiB':>9s}")
    for dtype_name in dtypes:
        for (b, h, n, d) in shapes:
            for causal in causals:
                if measured_group(result["rows"], b, h, n, d, dtype_name, causal, variants):
                    print(f"{'(kept)':16s} {f'{b}x{h}x{n}x{d}':>18s} {dtype_name:5s} {causal!s:6s}")
                    continue
                result["rows"] = [row for row in result["rows"] if _shape(row) != (b, h, n, d, dtype_name, causal)]
                torch.manual_seed(0)
                q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=DTYPES[dtype_name]) for _ in range(3))
                baseline = None
                for name in ["sdpa"] + [x for x in variants if x != "sdpa"]:
                    try:
                        fwd_ms, fwdbwd_ms, peak, fwd_loop, fwdbwd_loop = time_variant(
                            IMPLEMENTATIONS[name], q, k, v, causal, rep_ms=args.rep_ms)
                    except Exception as e:  # a pinned backend may not support a shape: record why
                        result["rows"].append({"variant": name, "b": b, "h": h, "n": n, "d": d, "dtype": dtype_name,
                                               "causal": causal, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                        print(f"{name:16s} {f'{b}x{h}x{n}x{d}':>18s} {dtype_name:5s} {causal!s:6s} failed: {type(e).__name__}")
                        continue
                    if name == "sdpa":
                        baseline = (fwd_ms, fwdbwd_ms, fwd_loop, fwdbwd_loop)
                    row = {"variant": name, "b": b, "h": h, "n": n, "d": d, "dtype": dtype_name, "causal": causal,
                           "fwd_ms": fwd_ms, "fwdbwd_ms": fwdbwd_ms,
                           "fwd_vs_sdpa": fwd_ms / baseline[0], "fwdbwd_vs_sdpa": fwdbwd_ms / baseline[1],
                           "fwd_loop_ms": fwd_loop, "fwdbwd_loop_ms": fwdbwd_loop,
                           "fwd_loop_vs_sdpa": fwd_loop / baseline[2], "fwdbwd_loop_vs_sdpa": fwdbwd_loop / baseline[3],
                           "peak_mib": peak}
                    result["rows"].append(row)
                    print(f"{name:16s} {f'{b}x{h}x{n}x{d}':>18s} {dtype_name:5s} {causal!s:6s} {fwd_ms:8.3f} "
                          f"{fwdbwd_ms:8.3f} {row['fwd_vs_sdpa']:6.2f} {row['fwdbwd_vs_sdpa']:6.2f} "
                          f"{row['fwd_loop_vs_sdpa']:10.2f} {row['fwdbwd_loop_vs_sdpa']:10.2f} {peak:9.1f}", flush=True)
                del q, k, v
                result["tuned"] = _merged_choices(previous_choices, {"forward": FWD_TUNER, "backward": BWD_TUNER})
                result["wall_s"] = wall_before + time.perf_counter() - started
                if args.out:
                    write_json(args.out, result)
    for row in result["accuracy"]:
        print(f"accuracy {row['dtype']} D{row['d']} causal={row['causal']}: rbf_lite {row['rbf_lite_rel_err']:.2e} "
              f"vs SDPA {row['sdpa_rel_err']:.2e}")
    print(f"{time.perf_counter() - started:.0f} s")
    return result


if __name__ == "__main__":
    main()
