"""Time every kernel configuration at your shapes, once, and keep the choices: `python -m rbf_lite.tune`.

By default `rbf_attention` never times anything on a call: it takes the configuration from the tuning
cache, the table shipped with the package, or a heuristic (rbf_lite/kernels/tuning.py). This command
is the opt-in for the last percent: for each shape it times every candidate of the forward and the
backward (what `RBF_LITE_AUTOTUNE=full` does on a first call) and writes the winners to the tuning
cache ($RBF_LITE_CACHE/tuning, by default ~/.cache/rbf_lite/tuning), which every later process on
this GPU with the same torch, Triton and kernel source reads.

Most of a candidate's cost is its compile, so worker processes first compile every candidate in
parallel (`--jobs`) into Triton's cache; the timing then runs in this process alone.

    python -m rbf_lite.tune --shapes "8,16,2048,64;1,32,8192,128" --dtypes bf16 --causal true

`--table` also writes the choices, with the runners-up's relative times, into the package's table for
this GPU (rbf_lite/kernels/tuned_configs.json): how maintainers measure a new GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from .bench.attention import DEFAULT_SHAPES, DTYPES
from .kernels import tuning
from .runs import environment, progress


def parse_shapes(text: str | None) -> list[tuple[int, int, int, int]]:
    if text is None:
        return list(DEFAULT_SHAPES)
    try:
        shapes = [tuple(int(x) for x in s.split(",")) for s in text.split(";") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 4 for s in shapes):
        raise SystemExit(f"--shapes takes B,H,N,D;B,H,N,D;... with integers, got {text!r}")
    return shapes


def runs(args) -> list[tuple]:
    dtypes = args.dtypes.split(",")
    unknown = set(dtypes) - set(DTYPES)
    if unknown:
        raise SystemExit(f"unknown dtypes {sorted(unknown)}; choose from {sorted(DTYPES)}")
    causals = [c.strip().lower() == "true" for c in args.causal.split(",")]
    return [(shape, dtype, causal) for shape in parse_shapes(args.shapes) for dtype in dtypes for causal in causals]


def forward_backward(shape, dtype: str, causal: bool) -> None:
    """One call each way at this shape: what triggers the tuner for both kernels."""
    from .rbf import rbf_attention
    q, k, v = (torch.randn(*shape, device="cuda", dtype=DTYPES[dtype], requires_grad=True) for _ in range(3))
    out = rbf_attention(q, k, v, causal=causal, backend="triton")
    out.backward(torch.randn_like(out))  # a dense gradient, as in training (an expanded one rules out TMA)
    torch.cuda.synchronize()


def compile_in_parallel(argv: list[str], jobs: int) -> None:
    """Run this command's shapes in `jobs` worker processes, each compiling its share of the candidates."""
    workers = [subprocess.Popen([sys.executable, "-m", "rbf_lite.tune", *argv, "--compile-share", f"{j}/{jobs}"],
                                env=os.environ | {"RBF_LITE_AUTOTUNE": "full"}) for j in range(jobs)]
    failed = [w.args for w in workers if w.wait() != 0]
    if failed:
        raise SystemExit(f"{len(failed)} compile workers failed (see their output above)")


def table_entries(tuner, env: dict) -> list[dict]:
    """This process's timed choices with the runners-up's relative times, read back from the cache."""
    gpu_name = env["device"]
    entries = []
    for choice in tuner.choices():
        stored = tuning.CACHE.entries(gpu_name).get(tuning.TuningCache.entry_key(tuner.direction, choice["key"]))
        entries.append({"key": choice["key"], "config": choice["config"],
                        "finalists": stored.get("finalists", []) if stored else []})
    return entries


def write_table(env: dict) -> None:
    from .kernels.rbf_attention import BWD_TUNER, FWD_TUNER
    table = json.loads(tuning.TABLE_FILE.read_text()) if tuning.TABLE_FILE.exists() else {"gpus": {}}
    major, minor = torch.cuda.get_device_capability()
    table["gpus"][env["device"]] = {
        "capability": f"{major}.{minor}",
        "provenance": {key: env[key] for key in ("torch", "triton", "commit", "command", "time")}
                      | {"kernel_source": tuning.kernel_source_hash()},
        "forward": table_entries(FWD_TUNER, env), "backward": table_entries(BWD_TUNER, env)}
    tuning.TABLE_FILE.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {len(table['gpus'][env['device']]['forward'])} forward and "
          f"{len(table['gpus'][env['device']]['backward'])} backward entries for {env['device']} to {tuning.TABLE_FILE.name}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=None, help="B,H,N,D;B,H,N,D;... (default: the benchmark's shapes)")
    parser.add_argument("--dtypes", default="bf16", help="comma list of bf16, fp16 (default: %(default)s)")
    parser.add_argument("--causal", default="true,false", help="comma list of true/false (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes compiling candidates in parallel first; 0 compiles while timing "
                             "(default: %(default)s)")
    parser.add_argument("--table", action="store_true",
                        help="also write the choices into the package's table for this GPU")
    parser.add_argument("--compile-share", default=None, help=argparse.SUPPRESS)  # worker/workers, internal
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tuning times the kernels on a CUDA GPU; none is available")
    todo = runs(args)
    if args.compile_share is not None:
        worker, workers = map(int, args.compile_share.split("/"))
        tuning.COMPILE_SHARE = (worker, workers)
        for shape, dtype, causal in todo:
            forward_backward(shape, dtype, causal)
        return
    if args.jobs > 0:
        start = time.perf_counter()
        print(f"compiling every candidate in {args.jobs} processes ...", flush=True)
        compile_in_parallel([a for a in argv if not a.startswith("--table")], args.jobs)
        print(f"compiled in {time.perf_counter() - start:.0f} s", flush=True)
    os.environ["RBF_LITE_AUTOTUNE"] = "full"
    tuning.RETIME = True
    for shape, dtype, causal in progress(todo, desc="tuning", unit="shape"):
        forward_backward(shape, dtype, causal)
    env = environment("cuda")
    print(f"choices cached in {tuning.CACHE.path(tuning.TuningCache.header(env['device']))}")
    if args.table:
        write_table(env)


if __name__ == "__main__":
    main()
