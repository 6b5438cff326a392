"""Does skipping the tuner cost speed? `python -m rbf_lite.bench.tuning --baseline DIR`.

At each benchmark shape, times in one process the kernels as a first call now chooses them (the
tuning cache is empty: the shipped table, else the heuristic) against the same package as it was
before the table, which timed every candidate on the first call: a copy of that package's source
tree given as --baseline (e.g. `git archive <commit> rbf_lite | tar -x -C DIR`). The copy is
imported under another name, so both run side by side on the same inputs; rounds alternate between
them and each keeps its best median. Before timing, worker processes run the baseline's tuning once
per shape to fill Triton's compile cache, so that its tuner (which compiles every candidate) does
not take the whole GPU call.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..kernels.tuning import bucket
from ..runs import environment, write_json
from .attention import DEFAULT_SHAPES, DTYPES, time_variant

BASELINE_NAME = "rbf_lite_baseline"


def prepare_baseline(source: Path, scratch: Path) -> None:
    """Copy the package at `source` into `scratch` as BASELINE_NAME, its absolute names and custom ops renamed."""
    target = scratch / BASELINE_NAME
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in target.rglob("*.py"):
        text = path.read_text()
        renamed = re.sub(r"\brbf_lite(?=::|\.)", BASELINE_NAME, text)
        if renamed != text:
            path.write_text(renamed)


def import_baseline(scratch: Path):
    sys.path.insert(0, str(scratch))
    return importlib.import_module(f"{BASELINE_NAME}.rbf")


def warm_baseline(cases, scratch: Path, dtype: str, jobs: int) -> None:
    """Fill Triton's cache with the baseline's candidates: one worker process per case, `jobs` at a time."""
    pending = list(cases)
    running = []
    while pending or running:
        while pending and len(running) < jobs:
            shape, causal = pending.pop()
            spec = json.dumps({"shape": shape, "causal": causal, "dtype": dtype, "scratch": str(scratch)})
            running.append(subprocess.Popen([sys.executable, "-m", "rbf_lite.bench.tuning", "--warm", spec],
                                            stdout=subprocess.DEVNULL))
        running[0].wait()
        if running[0].returncode != 0:
            raise SystemExit("a warm-up worker failed")
        running.pop(0)


def call(rbf_module, shape, causal, dtype):
    """A forward+backward at this shape, through `rbf_module.rbf_attention` on the fused kernels."""
    q, k, v = (torch.randn(*shape, device="cuda", dtype=DTYPES[dtype], requires_grad=True) for _ in range(3))
    out = rbf_module.rbf_attention(q, k, v, causal=causal, backend="triton")
    out.backward(torch.randn_like(out))  # a dense gradient, as in training (an expanded one rules out TMA)
    torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=None, help="a copy of the rbf_lite package folder to compare with")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="(default: %(default)s)")
    parser.add_argument("--rep-ms", type=float, default=100, help="each do_bench's duration (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=8, help="warm-up processes at a time (default: %(default)s)")
    parser.add_argument("--out", default=None, help="write the JSON here")
    parser.add_argument("--warm", default=None, help=argparse.SUPPRESS)  # one warm-up case, internal
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU")
    if args.warm is not None:
        spec = json.loads(args.warm)
        call(import_baseline(Path(spec["scratch"])), tuple(spec["shape"]), spec["causal"], spec["dtype"])
        return None
    if args.baseline is None or not (Path(args.baseline) / "rbf.py").exists():
        raise SystemExit(f"--baseline must be a copy of the rbf_lite package folder (with rbf.py); got {args.baseline}")
    os.environ["RBF_LITE_AUTOTUNE"] = "table"
    os.environ["RBF_LITE_CACHE"] = tempfile.mkdtemp()  # no earlier `python -m rbf_lite.tune` choices
    from .. import rbf as current
    from ..kernels.rbf_attention import BWD_TUNER, FWD_TUNER
    cases = [(shape, causal) for shape in DEFAULT_SHAPES for causal in (True, False)]
    scratch = Path(tempfile.mkdtemp())
    prepare_baseline(Path(args.baseline), scratch)
    warm_baseline(cases, scratch, args.dtype, args.jobs)
    baseline = import_baseline(scratch)
    result = {**environment("cuda"), "baseline": (Path(args.baseline) / "COMMIT").read_text().strip()
              if (Path(args.baseline) / "COMMIT").exists() else str(args.baseline), "rows": []}
    print(f"{'shape':>16s} {'causal':6s} {'fwd now/tuned':>13s} {'f+b now/tuned':>13s}  now's choices")
    for shape, causal in cases:
        call(baseline, shape, causal, args.dtype)  # the baseline tunes here
        call(current, shape, causal, args.dtype)
        torch.manual_seed(0)
        q, k, v = (torch.randn(*shape, device="cuda", dtype=DTYPES[args.dtype]) for _ in range(3))
        impls = {name: (lambda q, k, v, causal, m=module: m.rbf_attention(q, k, v, causal=causal, backend="triton"))
                 for name, module in (("now", current), ("tuned", baseline))}
        best = {name: [float("inf"), float("inf")] for name in impls}
        for r in range(args.rounds):
            for name in (impls if r % 2 == 0 else list(impls)[::-1]):
                fwd, fwdbwd = time_variant(impls[name], q, k, v, causal, rep_ms=args.rep_ms)[:2]
                best[name] = [min(best[name][0], fwd), min(best[name][1], fwdbwd)]
        key_bucket = bucket(shape[2])
        chosen = [c for c in FWD_TUNER.choices() + BWD_TUNER.choices() if c["key"]["key_bucket"] == str(key_bucket)
                  and c["key"]["head_dim"] == str(shape[3]) and c["key"]["causal"] == str(causal)]
        row = {"b": shape[0], "h": shape[1], "n": shape[2], "d": shape[3], "dtype": args.dtype, "causal": causal,
               "fwd_ms": best["now"][0], "fwdbwd_ms": best["now"][1],
               "tuned_fwd_ms": best["tuned"][0], "tuned_fwdbwd_ms": best["tuned"][1],
               "fwd_vs_tuned": best["now"][0] / best["tuned"][0], "fwdbwd_vs_tuned": best["now"][1] / best["tuned"][1],
               "choices": chosen}
        result["rows"].append(row)
        print(f"{'x'.join(map(str, shape)):>16s} {causal!s:6s} {row['fwd_vs_tuned']:13.3f} {row['fwdbwd_vs_tuned']:13.3f}  "
              f"{sorted({c['source'] for c in chosen})}", flush=True)
        if args.out:
            write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
