"""Benchmark one generation step against a KV cache: `python -m rbf_lite.bench.decode`.

One new query per sequence (or a few, --queries) attends to a cache of M keys: rbf_lite's
flash-decoding kernel (`rbf_decode`, key norms kept with the cache) against torch SDPA on the same
cache, in the same process. Each step is timed three ways:
- `ms`: medians of CUDA-event timings of the eager call (`triton.testing.do_bench`, L2 flushed
  before each call). At short caches a step is a few microseconds of GPU work, and how much of the
  host's time per call this shows depends on how fast the host is (see the notes);
- `graph_ms`: the same, of the step captured once in a CUDA graph and replayed, as serving engines
  run decoding: the GPU's work, without Python or per-kernel launch costs;
- `loop_ms`: wall time per call of eager calls back to back, host time included.
Writes JSON: {device, torch, triton, commit, command, rows: [{variant, b, h, n_queries, cache, d,
dtype, ms, vs_sdpa, graph_ms, graph_vs_sdpa, loop_ms, loop_vs_sdpa}]}.

Before the first timing both steps run untimed for --warmup-s seconds (GPU clocks, host caches).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ..rbf import rbf_decode
from ..runs import environment, write_json
from .attention import DTYPES, back_to_back_ms


def graph_replay(step):
    """`step` captured once in a CUDA graph, replayable. It runs eagerly first on the stream that
    captures it (compilation; rbf_decode's workspace for that stream), so the graph holds the step's
    kernels only."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        step()
    return graph.replay


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--caches", default="1024,4096,16384,32768")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU")
    from triton.testing import do_bench
    result = {**environment("cuda"), "rows": []}
    print(f"{'variant':10s} {'batch':>5s} {'cache':>6s} {'ms':>8s} {'x sdpa':>7s} {'graph ms':>8s} {'x sdpa':>7s} "
          f"{'loop ms':>8s} {'x sdpa':>7s}")
    for b in (int(x) for x in args.batches.split(",")):
        for m in (int(x) for x in args.caches.split(",")):
            torch.manual_seed(0)
            shape = (b, args.heads, m, args.head_dim)
            k, v = (torch.randn(shape, device="cuda", dtype=DTYPES[args.dtype]) for _ in range(2))
            q = torch.randn(b, args.heads, args.queries, args.head_dim, device="cuda", dtype=DTYPES[args.dtype])
            key_sqnorms = k.float().square().sum(-1)  # kept with the cache, as generation does
            # SDPA's is_causal aligns top-left; the decoding mask (last queries) is explicit here.
            mask = None if args.queries == 1 else \
                torch.ones(args.queries, m, dtype=torch.bool, device="cuda").tril(m - args.queries)
            steps = (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                     lambda: rbf_decode(q, k, v, key_sqnorms=key_sqnorms))
            with torch.no_grad():
                warm_until = time.perf_counter() + (args.warmup_s if not result["rows"] else 0.0)
                while time.perf_counter() < warm_until:
                    for step in steps:
                        step()
                    torch.cuda.synchronize()
                times = [(do_bench(step, return_mode="median"), do_bench(graph_replay(step), return_mode="median"),
                          back_to_back_ms(step, 100)) for step in steps]
            sdpa_ms, sdpa_graph_ms, sdpa_loop_ms = times[0]
            for name, (ms, graph_ms, loop_ms) in zip(("sdpa", "rbf_decode"), times):
                result["rows"].append({"variant": name, "b": b, "h": args.heads, "n_queries": args.queries,
                                       "cache": m, "d": args.head_dim, "dtype": args.dtype,
                                       "ms": ms, "vs_sdpa": ms / sdpa_ms, "graph_ms": graph_ms,
                                       "graph_vs_sdpa": graph_ms / sdpa_graph_ms, "loop_ms": loop_ms,
                                       "loop_vs_sdpa": loop_ms / sdpa_loop_ms})
                print(f"{name:10s} {b:5d} {m:6d} {ms:8.4f} {ms / sdpa_ms:7.2f} {graph_ms:8.4f} "
                      f"{graph_ms / sdpa_graph_ms:7.2f} {loop_ms:8.4f} {loop_ms / sdpa_loop_ms:7.2f}", flush=True)
            if args.out:
                write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
