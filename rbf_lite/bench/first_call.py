"""What a first call at a new shape costs: `python -m rbf_lite.bench.first_call`.

A reader in a notebook changes the sequence length from cell to cell; each new shape's first call
pays for compiling (and, before the table of tuned choices, for timing every candidate). This
benchmark measures it as a user meets it: each shape in a fresh process, whose first
`rbf_attention` forward+backward (inputs already on the GPU, so CUDA's own start-up is not counted)
is timed, then a second call, then a first call at other lengths with the same head dim, dtype and
causality. Each shape runs twice: with Triton's compile cache empty ("cold", a fresh
TRITON_CACHE_DIR) and with the cache the cold run left ("warm", as in any later session). SDPA's
first and second calls are measured the same way, in processes of their own.

A first call runs stand-in kernels and leaves the tuned ones compiling in the background (see
rbf_lite/kernels/rbf_attention.py); the next call starts once they are done, as a notebook's next
cell would seconds later, and `background_s` says how long after the call that took. Each row
records which kernels had run after the first and the second call, and RBF_LITE_BACKGROUND_COMPILE
(set it to compare: "0" compiles the tuned kernels at their first launch, without stand-ins).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from ..runs import environment, write_json
from .attention import DTYPES

# (B, H, N, D, causal), then the other lengths tried in the same process: one in another length
# bucket on the same code path, one across the long-sequence boundary (4,096 keys), where other
# kernels run.
DEFAULT_CASES = [((2, 8, 2048, 64, True), (3000, 1500, 5000)),
                 ((2, 8, 3000, 128, False), (2048, 700, 6000)),
                 ((1, 16, 1537, 64, False), (1000, 4500)),
                 ((4, 8, 8192, 128, True), (6000, 2048)),
                 ((8, 4, 777, 32, True), (333, 1200))]


def first_calls(impl: str, shape: tuple, dtype: str, lengths: tuple) -> dict:
    """In this (fresh) process: the first and second forward+backward at `shape`, then a first
    call at each of `lengths`. Seconds for first calls, milliseconds for the second."""
    import torch.nn.functional as F
    from ..kernels.rbf_attention import background_compiles, finish_background_compiles
    from ..rbf import rbf_attention
    b, h, n, d, causal = shape
    if impl == "sdpa":
        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        def attend(q, k, v):
            return rbf_attention(q, k, v, causal=causal)

    def timed(length):
        """(forward s, forward+backward s, s until the background compiles it started were done)."""
        q, k, v = (torch.randn(b, h, length, d, device="cuda", dtype=DTYPES[dtype], requires_grad=True)
                   for _ in range(3))
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = attend(q, k, v)
        torch.cuda.synchronize()
        forward = time.perf_counter() - start
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        call = time.perf_counter() - start
        finish_background_compiles()
        return forward, call, time.perf_counter() - start - call

    first_fwd, first, background = timed(n)
    first_ran = _kernels_run()
    _, second, _ = timed(n)
    second_ran = _kernels_run()
    news = [timed(m) for m in lengths]
    row = {"impl": impl, "b": b, "h": h, "n": n, "d": d, "dtype": dtype, "causal": causal,
           "background_compile": background_compiles(), "first_call_s": first, "first_forward_s": first_fwd,
           "background_s": background, "second_call_ms": second * 1e3,
           "new_lengths": [{"n": m, "first_call_s": call, "background_s": after}
                           for m, (_, call, after) in zip(lengths, news)]}
    if impl == "rbf_lite":
        from ..kernels.rbf_attention import BWD_TUNER, FWD_TUNER
        row["choices"] = sorted({c["source"] for c in FWD_TUNER.choices() + BWD_TUNER.choices()})
        row["kernels_after_first_call"], row["kernels_after_second_call"] = first_ran, second_ran
    return row


def _kernels_run() -> dict:
    """Per direction, the attention kernels launched so far in this process: "stand-in" and/or "tuned"
    (see rbf_lite/kernels/rbf_attention.py)."""
    from ..kernels.rbf_attention import BWD_TUNER, FWD_TUNER
    ran = {}
    for tuner in (FWD_TUNER, BWD_TUNER):
        staged = tuner.launcher.constexpr_names.index("STAGED")
        ran[tuner.direction] = sorted({"tuned" if key[0][staged] else "stand-in" for key in tuner.launcher.compiled})
    return ran


def in_fresh_process(impl: str, shape: tuple, dtype: str, lengths: tuple, env: dict) -> dict:
    spec = json.dumps({"impl": impl, "shape": shape, "dtype": dtype, "lengths": lengths})
    done = subprocess.run([sys.executable, "-m", "rbf_lite.bench.first_call", "--child", spec],
                          env=os.environ | env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} {shape} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(rows: list[dict]) -> dict:
    """The largest first call per implementation and cache state, and the largest new-length call."""
    out = {}
    for row in rows:
        name = f"{row['impl']}_{row['triton_cache']}"
        out[f"{name}_max_first_call_s"] = max(out.get(f"{name}_max_first_call_s", 0.0), row["first_call_s"])
        for new in row["new_lengths"]:
            out[f"{name}_max_new_length_s"] = max(out.get(f"{name}_max_new_length_s", 0.0), new["first_call_s"])
    return out


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="(default: %(default)s)")
    parser.add_argument("--cases", default=None,
                        help="comma list of indices into DEFAULT_CASES to measure (default: all)")
    parser.add_argument("--out", default=None, help="write the JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one measurement, internal
    args = parser.parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        print(json.dumps(first_calls(spec["impl"], tuple(spec["shape"]), spec["dtype"], tuple(spec["lengths"]))))
        return None
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU")
    result = {**environment("cuda"), "rows": []}
    print(f"{'impl':9s} {'cache':5s} {'shape':>20s} {'causal':6s} {'first s':>8s} {'bg s':>5s} {'second ms':>9s}"
          "  new lengths (s, + background s)")
    with tempfile.TemporaryDirectory() as scratch:
        cases = DEFAULT_CASES if args.cases is None else [DEFAULT_CASES[int(i)] for i in args.cases.split(",")]
        for shape, lengths in cases:
            runs = [("sdpa", "n/a", {})]
            compile_cache = tempfile.mkdtemp(dir=scratch)
            tuning_cache = tempfile.mkdtemp(dir=scratch)  # empty: no earlier `python -m rbf_lite.tune`
            for state in ("cold", "warm"):
                runs.append(("rbf_lite", state, {"TRITON_CACHE_DIR": compile_cache, "RBF_LITE_CACHE": tuning_cache}))
            for impl, state, env in runs:
                row = in_fresh_process(impl, shape, args.dtype, lengths, env) | {"triton_cache": state}
                result["rows"].append(row)
                news = " ".join(f"{x['n']}: {x['first_call_s']:.2f}+{x['background_s']:.1f}"
                                for x in row["new_lengths"])
                print(f"{impl:9s} {state:5s} {'x'.join(map(str, shape[:4])):>20s} {shape[4]!s:6s} "
                      f"{row['first_call_s']:8.2f} {row['background_s']:5.1f} {row['second_call_ms']:9.2f}  {news}",
                      flush=True)
            result["summary"] = summary(result["rows"])
            if args.out:
                write_json(args.out, result)
    print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    main()
