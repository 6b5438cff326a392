"""Tokens/s of one training step of the default GPT: sdpa+rope, sdpa_qknorm+rope, rbf+susie.

`python -m rbf_lite.bench.lm_step --out FILE.json`. One fixed batch of random tokens (default
64 x 256), forward + backward + clipping + AdamW, bf16 autocast on the GPU. After warm-up steps
(which also absorb Triton autotuning and torch.compile), steps are timed with CUDA events.
The headline is time_ratio_vs_sdpa = step time / sdpa's step time (the project aims <= 1.10
for rbf+susie).
"""
from __future__ import annotations

import argparse
import time

import torch

from ..lm import autocast, parameter_groups, resolve_device
from ..models.gpt import GPT, GPTConfig
from ..runs import environment, seed_everything, write_json

CASES = (("sdpa", "rope"), ("sdpa_qknorm", "rope"), ("rbf", "susie"))


def time_training_step(config: GPTConfig, batch_size: int, device: torch.device, steps: int = 20,
                       warmup: int = 5, compile: bool = False, seed: int = 0) -> dict:
    """Mean milliseconds and tokens/s of `steps` training steps on one fixed random batch."""
    seed_everything(seed)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if compile else model
    tokens = torch.randint(0, config.vocab_size, (batch_size, config.context_length + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        with autocast(device):
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        from ..kernels.rbf_attention import finish_background_compiles
        finish_background_compiles()  # kernels a first call compiles in a thread must not share the timing
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize(device)
        ms = start.elapsed_time(end) / steps
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        ms = (time.perf_counter() - t0) * 1000 / steps
    return {"attention": config.attention, "pos": config.pos, "ms_per_step": ms,
            "tokens_per_s": batch_size * config.context_length / (ms / 1000),
            "parameters": model.num_parameters()}


def main(argv: list[str] | None = None) -> dict:
    d = GPTConfig()
    p = argparse.ArgumentParser(prog="python -m rbf_lite.bench.lm_step", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--context", type=int, default=d.context_length)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--layers", type=int, default=d.n_layers)
    p.add_argument("--heads", type=int, default=d.n_heads)
    p.add_argument("--registers", type=int, default=d.num_registers)
    p.add_argument("--vocab", type=int, default=d.vocab_size)
    p.add_argument("--steps", type=int, default=20, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    results = []
    for attention, pos in CASES:
        config = GPTConfig(vocab_size=a.vocab, context_length=a.context, d_model=a.d_model, n_layers=a.layers,
                           n_heads=a.heads, attention=attention, pos=pos, num_registers=a.registers)
        results.append(time_training_step(config, a.batch_size, device, a.steps, a.warmup, a.compile))
        print(f"{attention}+{pos}: {results[-1]['ms_per_step']:.2f} ms/step, "
              f"{results[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    baseline = results[0]["ms_per_step"]
    for r in results:
        r["time_ratio_vs_sdpa"] = r["ms_per_step"] / baseline
    report = {"benchmark": "one training step (forward, backward, clip, AdamW) of the tiny GPT on a "
                           "fixed random batch", "settings": vars(a), "environment": environment(device),
              "results": results}
    write_json(a.out, report)
    return report


if __name__ == "__main__":
    main()
