"""Train the tiny GPT on TinyStories: `python -m rbf_lite.lm --attention rbf --pos susie ...`.

One script for one device or many (`torchrun --nproc_per_node N -m rbf_lite.lm ...`, DDP): the
global batch is fixed and split over processes, and batch `step` is a pure function of
(seed, step) (see `ShuffledBatches`), so the data position in a checkpoint is just the step, and
two arms trained with one seed see the same batches in the same order (a paired comparison).
Rows are packed windows (`--layout packed`) or one story per row (`--layout stories`, padding out
of the loss). AdamW, linear warm-up then cosine decay, gradient clipping, bf16 (or fp16 with a
gradient scaler) autocast on CUDA (fp32 on the CPU). `--preset seed-headline|seed-susie` sets
everything to the seed's configuration (see `seed_presets`). Every metric goes to DIR/log.jsonl (validation loss, pre-norm q/k norms and parameter norms
at each evaluation); DIR/attention_maps.json keeps the final model's attention on a fixed prompt;
DIR/checkpoint.pt holds model, optimizer, scheduler,
step and RNG states, and `--resume` continues so exactly that an interrupted run ends with the
weights of an uninterrupted one (bit-identical on the CPU). `--stop-at` ends a run early on
purpose, e.g. to fit a long run into time-limited sessions. A folder that already holds a run is
never overwritten silently: continue it with `--resume` or replace it with `--overwrite`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist

from .attention import ATTENTION_KINDS
from .data.text import (IGNORE_INDEX, TOKENIZERS, PackedWindows, ShuffledBatches, StoryRows, TextTokenizer,
                        prepare_tinystories)
from .inspect_norms import parameter_norms, prompt_attention_maps, qk_norms
from .models.gpt import GPT, INITS, GPTConfig
from .positional import POSITIONAL_KINDS
from .runs import (JsonlLog, environment, load_checkpoint, prepare_run_dir, progress, read_jsonl,
                   save_checkpoint, seed_everything, write_json)
from .seed_presets import PRESETS, SEED_COMMIT, SEED_REPOSITORY, describe, preset_settings

SAMPLE_PROMPT = "Once upon a time"
# The prompt whose attention maps every run saves (OUT/attention_maps.json) for the book's figures.
ATTENTION_PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside."
NORM_PROBE_ROWS = 8  # validation rows whose pre-norm q/k norms are logged at each evaluation
LAYOUTS = ("packed", "stories")
PRECISIONS = ("bf16", "fp16")


@dataclass
class LMConfig:
    attention: str = "rbf"
    pos: str = "susie"
    registers: int = 1
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    context_length: int = 256
    init: str = "gpt2"              # gpt2 | torch (PyTorch's defaults, the seed's)
    projection_bias: bool = False   # biases on the q/k/v and output projections
    tie_lm_head: bool = True        # False: a separate LM head with a bias
    steps: int = 2000
    epochs: float | None = None     # set: steps = this many passes over the training rows (whole batches)
    batch_size: int = 64            # global: split evenly over processes
    lr: float = 1e-3
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    warmup_fraction: float | None = None  # set: warm-up = this fraction of the steps
    warmup_start: float | None = None     # None: ramp (s + 1) / W; x: from x to 1, as torch's LinearLR
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    decay_all: bool = False         # decay every parameter (the seed) rather than weight matrices only
    grad_clip: float | None = 1.0   # None or 0: no clipping
    precision: str = "bf16"         # autocast dtype on CUDA: bf16 | fp16 (with a gradient scaler)
    seed: int = 0
    data: str | list[str] | None = None  # text file(s) or folder; None: RBF_LITE_DATA, ../shared/data, hub
    data_source: str = "auto"       # auto | local | hub
    layout: str = "packed"          # packed windows | stories (one story per row, padding masked)
    train_stories: int | None = None       # first N training stories only (None: the whole split)
    validation_stories: int | None = None  # first N validation stories only (None: the whole split)
    validation_holdout: int | None = None  # validate on N held-out training stories instead
    train_tokens: int | None = None        # whole stories up to N tokens, in one fixed order
    tokenizer: str = "gpt2"         # gpt2 | bpe (trained on the training text)
    bpe_vocab_size: int = 4096
    eval_every: int = 200
    eval_points: int | None = None  # set: evaluate this many times, evenly spaced (sets eval_every)
    eval_batches: int = 20
    log_every: int = 10
    checkpoint_every: int = 500
    sample_tokens: int = 64         # greedy continuation of SAMPLE_PROMPT put in the summary
    out: str = "runs/lm"
    device: str = "auto"            # auto | cpu | cuda
    compile: bool = False
    resume: bool = False
    overwrite: bool = False         # replace a run already in `out` (else refuse, unless resuming)
    stop_at: int | None = None      # stop (with a checkpoint) after this step; schedule still spans `steps`
    preset: str | None = None       # the seed configuration these settings came from, if any
    preset_overrides: tuple[str, ...] = ()  # fields set explicitly on top of the preset

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.preset_overrides = tuple(self.preset_overrides)
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.pos not in POSITIONAL_KINDS:
            raise ValueError(f"pos must be one of {POSITIONAL_KINDS}, got {self.pos!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        for name, allowed in (("layout", LAYOUTS), ("precision", PRECISIONS), ("init", INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "log_every", "checkpoint_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("eval_points", "validation_holdout", "train_tokens"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.warmup_steps >= 0
                and self.weight_decay >= 0 and (self.grad_clip is None or self.grad_clip >= 0)):
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0, "
                             "weight_decay >= 0 and grad_clip >= 0 (0 or None: no clipping)")
        if not (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0 or None, got {self.epochs!r}")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction!r}")
        if self.warmup_start is not None and not 0 < self.warmup_start <= 1:
            raise ValueError(f"warmup_start must lie in (0, 1], got {self.warmup_start!r}")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps and self.epochs is None:
            raise ValueError(f"stop_at must lie in [1, steps={self.steps}], got {self.stop_at}")

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, context_length=self.context_length, d_model=self.d_model,
                         n_layers=self.n_layers, n_heads=self.n_heads, attention=self.attention,
                         pos=self.pos, num_registers=self.registers, init=self.init,
                         projection_bias=self.projection_bias, tie_lm_head=self.tie_lm_head)

    def resolved(self, train_rows: int) -> LMConfig:
        """Steps, warm-up and evaluation spacing made concrete for `train_rows` training rows."""
        # Whole batches only: a pass never repeats a row (the last partial batch, < batch_size
        # rows, is left out), so `epochs=1` is one pass with nothing seen twice.
        steps = (max(1, math.floor(self.epochs * train_rows / self.batch_size))
                 if self.epochs is not None else self.steps)
        warmup = round(self.warmup_fraction * steps) if self.warmup_fraction is not None else self.warmup_steps
        eval_every = max(1, steps // self.eval_points) if self.eval_points is not None else self.eval_every
        resolved = replace(self, steps=steps, warmup_steps=warmup, eval_every=eval_every)
        if resolved.stop_at is not None and not 1 <= resolved.stop_at <= steps:
            raise ValueError(f"stop_at must lie in [1, steps={steps}], got {resolved.stop_at}")
        return resolved


# Fields that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("resume", "overwrite", "stop_at", "device", "compile", "eval_every", "log_every",
                     "checkpoint_every", "sample_tokens")


def lr_factor(step: int, config: LMConfig) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step.

    The warm-up ramps (step + 1) / W, or, with `warmup_start`, from that factor at step 0 to 1 at
    step W as torch's LinearLR does (the seed's scheduler); the cosine is CosineAnnealingLR's.
    """
    if step < config.warmup_steps:
        if config.warmup_start is None:
            return (step + 1) / config.warmup_steps
        return config.warmup_start + (1 - config.warmup_start) * step / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def parameter_groups(model: torch.nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Decay the weight matrices of Linear and Embedding layers only; norms, registers and
    positional weights are left alone (decay would pull registers and SuSiE weights to zero).
    `decay_all` decays every parameter, as AdamW's default (and the seed) does."""
    if decay_all:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    params = list(model.parameters())  # tied weights appear once
    return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def autocast(device: torch.device, precision: str = "bf16"):
    """bf16 (or fp16) autocast on CUDA; the CPU stays in fp32 (exact, and half is slow there)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def gradient_norm(parameters) -> torch.Tensor:
    """The global L2 norm of the gradients (what clipping would measure), without clipping."""
    norms = [torch.linalg.vector_norm(p.grad) for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms))


def make_rows(tokens, config: LMConfig, eot_id: int, name: str) -> PackedWindows | StoryRows:
    """The training or validation rows in the configured layout."""
    if config.layout == "stories":
        return StoryRows(tokens, eot_id, config.context_length, name)
    return PackedWindows(tokens, config.context_length, name)


def _all_reduce_(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model: GPT, rows: PackedWindows | StoryRows, config: LMConfig, device: torch.device,
             rank: int = 0, world_size: int = 1) -> float:
    """Mean next-token loss per target token over the first eval_batches * batch_size validation
    rows (fewer if the split is smaller), split across processes; padding is not counted."""
    n = min(rows.num_rows, config.eval_batches * config.batch_size)
    mine = list(range(rank, n, world_size))
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, token count
    per_batch = max(1, config.batch_size // world_size)
    for start in range(0, len(mine), per_batch):
        x, y = (t.to(device) for t in rows.rows(mine[start:start + per_batch]))
        targets = (y != IGNORE_INDEX).sum().item()
        if targets == 0:
            continue
        with autocast(device, config.precision):
            _, loss = model(x, y)
        total += torch.tensor([loss.item() * targets, targets], dtype=torch.float64, device=device)
    total = _all_reduce_(total, world_size)
    return (total[0] / total[1]).item()


@torch.no_grad()
def mean_qk_norms(model: GPT, probe: torch.Tensor, mask: torch.Tensor | None = None,
                  precision: str = "bf16") -> list[dict[str, float]]:
    """Per layer, the mean pre-norm ||q|| and ||k|| over the tokens of `probe` (registers left out,
    all heads; with `mask` (B, N), only where it is True, e.g. not padding): the trajectories the
    seed's claim about norm growth is about."""
    r = model.config.num_registers
    with autocast(probe.device, precision):
        layers = qk_norms(model, probe)
    means = []
    for layer in layers:
        values = {name: layer[name][..., r:] for name in ("q", "k")}
        if mask is not None:
            values = {name: v[mask[:, None, :].expand_as(v)] for name, v in values.items()}
        means.append({name: v.mean().item() for name, v in values.items()})
    return means


def best_validation(log_path: Path) -> tuple[float | None, int | None]:
    """Lowest validation loss in the log and its step (read from the file, so resumes keep it)."""
    val = [(r["val_loss"], r["step"]) for r in read_jsonl(log_path) if "val_loss" in r]
    return min(val) if val else (None, None)


def save_attention_maps(model: GPT, tokenizer: TextTokenizer, path: Path, precision: str = "bf16") -> None:
    """Every layer's (H, N, N) weights on ATTENTION_PROMPT, rounded: a few kB per run."""
    with autocast(next(model.parameters()).device, precision):
        slots, layers = prompt_attention_maps(model, tokenizer, ATTENTION_PROMPT)
    maps = {"prompt": ATTENTION_PROMPT, "slots": slots,
            "layers": [torch.round(w.double(), decimals=4).tolist() for w in layers]}
    path.write_text(json.dumps(maps, separators=(",", ":")) + "\n")  # compact: thousands of numbers


LAYOUT_DESCRIPTIONS = {
    "packed": "packed windows of {c} + 1 tokens",
    "stories": "one story per row: its first {c} + 1 tokens, right-padded, padding out of the loss",
}


def _preset_record(config: LMConfig) -> dict | None:
    """What the summary says about the preset: its name, source, every setting and the overrides."""
    if config.preset is None:
        return None
    return {"name": config.preset, "seed_code": f"{SEED_REPOSITORY}@{SEED_COMMIT}",
            "settings": preset_settings(config.preset, config.attention),
            "overrides": {name: getattr(config, name) for name in config.preset_overrides}}


def _check_resumable(saved: dict, config: LMConfig) -> None:
    changed = [f.name for f in fields(config)
               if f.name not in RESUMABLE_CHANGES and saved.get(f.name) != getattr(config, f.name)]
    if changed:
        raise ValueError(f"cannot resume: the checkpoint was trained with different {', '.join(changed)} "
                         f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)})")


def train(config: LMConfig) -> dict:
    """Train (or resume) one run; returns the summary also written to OUT/summary.json."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device, local_rank)
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    try:
        return _train(config, device, rank, world_size)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def _train(config: LMConfig, device: torch.device, rank: int, world_size: int) -> dict:
    if config.batch_size % world_size:
        raise ValueError(f"batch_size={config.batch_size} does not split over {world_size} processes")
    out = Path(config.out)
    checkpoint_path = out / "checkpoint.pt"
    is_main = rank == 0
    if is_main:
        prepare_run_dir(out, config.resume, config.overwrite)
    seed_everything(config.seed)
    if rank != 0:  # rank 0 builds the token caches, the others then read them
        dist.barrier()
    data = prepare_tinystories(config.data, config.tokenizer, config.bpe_vocab_size, config.data_source,
                               config.train_stories, config.validation_stories,
                               validation_holdout=config.validation_holdout, train_tokens=config.train_tokens)
    if is_main and world_size > 1:
        dist.barrier()
    eot = data.tokenizer.eot_id
    train_rows = make_rows(data.train, config, eot, "the training split")
    val_rows = make_rows(data.validation, config, eot, "the validation split")
    config = config.resolved(train_rows.num_rows)
    batches = ShuffledBatches(train_rows, config.batch_size, config.seed)
    probe_x, probe_y = val_rows.rows(range(min(NORM_PROBE_ROWS, val_rows.num_rows)))
    norm_probe, probe_mask = probe_x.to(device), (probe_y != IGNORE_INDEX).to(device)

    model = GPT(config.model_config(data.tokenizer.vocab_size)).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay, config.decay_all),
                                  lr=config.lr, betas=config.betas, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    # fp16 needs loss scaling (bf16 has float32's range); a disabled scaler passes everything through.
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and config.precision == "fp16")
    start_step = 0
    if config.resume:
        state = load_checkpoint(checkpoint_path, map_location=device)
        _check_resumable(state["config"], config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_step = state["data_step"]
        if start_step >= (config.stop_at or config.steps):
            raise ValueError(f"{checkpoint_path} is already at step {start_step}: nothing left to train "
                             f"(raise --steps or --stop-at, or start a fresh run without --resume)")
    forward = model
    if world_size > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        forward = torch.compile(forward)

    log = JsonlLog(out / "log.jsonl", resume_from_step=start_step if config.resume else None) if is_main else None
    if is_main:
        (out / "tokenizer.json").write_text(data.tokenizer.backend.to_str())
    end_step = config.stop_at or config.steps
    tokens_per_step = config.batch_size * config.context_length
    train_loss = val_loss = None
    # Throughput leaves out this process's first logged interval: it pays for Triton's autotuning,
    # cuDNN's algorithm search and the allocator's warm-up, which a long run amortises.
    timed_time, timed_steps, warm = 0.0, 0, False
    interval_start, interval_steps = time.perf_counter(), 0
    bar = progress(total=config.steps, initial=start_step, desc=f"{config.attention}+{config.pos}",
               unit="step", disable=not is_main)
    for step in range(start_step, end_step):
        x, y = (t.to(device, non_blocking=True) for t in batches.batch(step, rank, world_size))
        with autocast(device, config.precision):
            _, loss = forward(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip) if config.grad_clip
                     else gradient_norm(model.parameters()))
        scaler.step(optimizer)  # skipped when fp16 gradients overflowed
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        interval_steps += 1
        bar.update(1)
        if done % config.log_every == 0 or done == end_step:
            train_loss = _all_reduce_(loss.detach().float(), world_size).item() / world_size
            elapsed = time.perf_counter() - interval_start  # .item() above synchronised the GPU
            if warm or done == end_step:
                timed_time, timed_steps = timed_time + elapsed, timed_steps + interval_steps
            warm = True
            tokens_per_s = interval_steps * tokens_per_step / elapsed
            if is_main:
                log.write(step=done, train_loss=train_loss, lr=scheduler.get_last_lr()[0],
                          grad_norm=grad_norm.item(), tokens_per_s=tokens_per_s)
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            interval_start, interval_steps = time.perf_counter(), 0
        pause_start = time.perf_counter()  # evaluation and checkpoints are not training throughput
        if done % config.eval_every == 0 or done == end_step:
            val_loss = evaluate(model, val_rows, config, device, rank, world_size)
            if is_main:
                log.write(step=done, val_loss=val_loss, val_perplexity=math.exp(val_loss),
                          qk_norms=mean_qk_norms(model, norm_probe, probe_mask, config.precision),
                          param_norms=parameter_norms(model))
        if is_main and (done % config.checkpoint_every == 0 or done == end_step):
            save_checkpoint(checkpoint_path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), data_step=done,
                            config=asdict(config))
        interval_start += time.perf_counter() - pause_start
    bar.close()
    best_val_loss, best_val_step = best_validation(out / "log.jsonl") if is_main else (None, None)
    summary = {
        "config": asdict(config),
        "model": asdict(model.config),
        "parameters": model.num_parameters(),
        "environment": environment(device),
        "world_size": world_size,
        "preset": _preset_record(config),
        "data": {**data.sources, "tokenizer": data.tokenizer.name, "train_tokens": len(data.train),
                 "validation_tokens": len(data.validation), "train_rows": train_rows.num_rows,
                 "validation_rows": val_rows.num_rows, "counts": data.counts,
                 "layout": LAYOUT_DESCRIPTIONS[config.layout].format(c=config.context_length)},
        "steps_done": end_step,
        "completed": end_step == config.steps,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss) if val_loss is not None else None,
        "best_val_loss": best_val_loss,
        "best_val_step": best_val_step,
        "tokens_per_s": timed_steps * tokens_per_step / timed_time if timed_time > 0 else None,
    }
    if is_main and config.sample_tokens > 0:
        summary["sample"] = sample_text(model, data.tokenizer, SAMPLE_PROMPT, config.sample_tokens,
                                        precision=config.precision)
    if is_main:
        save_attention_maps(model, data.tokenizer, out / "attention_maps.json", config.precision)
        write_json(out / "summary.json", summary)
    return summary


@torch.no_grad()
def sample_text(model: GPT, tokenizer: TextTokenizer, prompt: str, max_new_tokens: int,
                temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
                precision: str = "bf16") -> str:
    """Continue `prompt` with the KV-cached generator; greedy unless temperature > 0."""
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with autocast(device, precision):
        out = model.generate(idx, max_new_tokens, temperature, top_k, generator=generator)
    return tokenizer.decode(out[0].tolist())


def load_run(out: str | Path, device: str = "auto") -> tuple[GPT, TextTokenizer]:
    """The trained model and its tokenizer from a run folder (for the book's chapters)."""
    from tokenizers import Tokenizer
    out = Path(out)
    state = load_checkpoint(out / "checkpoint.pt", map_location="cpu")
    config = LMConfig(**state["config"])
    backend = Tokenizer.from_file(str(out / "tokenizer.json"))
    eot = backend.token_to_id("<|endoftext|>")
    model = GPT(config.model_config(backend.get_vocab_size()))
    model.load_state_dict(state["model"])
    name = "gpt2" if config.tokenizer == "gpt2" else f"bpe{config.bpe_vocab_size}"
    return model.to(resolve_device(device)).eval(), TextTokenizer(name, backend, eot)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one option per LMConfig field, each with a sentence and its default."""
    d = LMConfig()
    p = argparse.ArgumentParser(prog="python -m rbf_lite.lm", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default=d.preset,
                   help="the seed's configuration: seed-headline (learned positions, no registers) or "
                        "seed-susie (SDPA+RoPE vs RBF+SuSiE, one register); --attention sdpa|rbf picks "
                        "the arm, and any other flag given overrides the preset (the summary says so)")
    model = p.add_argument_group("model")
    model.add_argument("--attention", choices=ATTENTION_KINDS, default=d.attention,
                       help="sdpa: dot product; sdpa_qknorm: with QK-norm; rbf: distance, fused kernel; "
                            "rbf_reference / rbf_flex: the same in plain PyTorch / FlexAttention")
    model.add_argument("--pos", choices=POSITIONAL_KINDS, default=d.pos,
                       help="positions: rope (rotary), susie (sinusoids added to q and k), learned "
                            "(absolute embeddings) or none")
    model.add_argument("--registers", type=int, default=d.registers,
                       help="number of learned register tokens prepended to every sequence")
    model.add_argument("--d-model", type=int, default=d.d_model, help="width of the residual stream")
    model.add_argument("--layers", type=int, default=d.n_layers, help="number of transformer blocks")
    model.add_argument("--heads", type=int, default=d.n_heads, help="attention heads per block")
    model.add_argument("--context", type=int, default=d.context_length, help="tokens per training row")
    model.add_argument("--init", choices=INITS, default=d.init,
                       help="gpt2: N(0, 0.02) weights, scaled residual writes; torch: PyTorch's defaults")
    model.add_argument("--projection-bias", action="store_true",
                       help="give the q/k/v and output projections biases")
    model.add_argument("--untied-head", dest="tie_lm_head", action="store_false",
                       help="a separate LM head with a bias instead of the tied token embedding")
    data = p.add_argument_group("data")
    data.add_argument("--data", nargs="+", default=d.data, help="TinyStories text file(s) or a folder "
                      "(every training file in it is used); unset: $RBF_LITE_DATA, then ../shared/data, "
                      "then the Hugging Face hub")
    data.add_argument("--data-source", choices=("auto", "local", "hub"), default=d.data_source,
                      help="where stories come from: local files, the hub, or local when found (auto)")
    data.add_argument("--train-stories", type=int, default=d.train_stories,
                      help="use only the first N training stories (a sample; from the hub only these "
                           "are downloaded); unset: the whole split")
    data.add_argument("--validation-stories", type=int, default=d.validation_stories,
                      help="use only the first N validation stories; unset: the whole split")
    data.add_argument("--validation-holdout", type=int, default=d.validation_holdout,
                      help="validate on N training stories held out (chosen with seed 42) instead of "
                           "the validation split, as the seed did")
    data.add_argument("--train-tokens", type=int, default=d.train_tokens,
                      help="train on whole stories, in one fixed order, up to N tokens (nested subsets "
                           "for data-scaling runs); unset: all training text")
    data.add_argument("--layout", choices=LAYOUTS, default=d.layout,
                      help="packed: windows cut from one token stream; stories: one story per row, "
                           "truncated and right-padded, padding out of the loss (the seed's)")
    data.add_argument("--tokenizer", choices=TOKENIZERS, default=d.tokenizer,
                      help="GPT-2's 50,257-token BPE, or a small BPE learned from the training stories")
    data.add_argument("--bpe-vocab", type=int, default=d.bpe_vocab_size,
                      help="vocabulary size of the learned BPE (with --tokenizer bpe)")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=d.steps, help="training steps (the schedule's length)")
    optim.add_argument("--epochs", type=float, default=d.epochs,
                       help="train for this many passes over the training rows instead of --steps")
    optim.add_argument("--batch-size", type=int, default=d.batch_size,
                       help="global batch in windows, split evenly over all processes")
    optim.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    optim.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                       help="the cosine decay ends at lr times this ratio")
    optim.add_argument("--warmup", type=int, default=d.warmup_steps, help="steps of linear learning-rate warm-up")
    optim.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction,
                       help="warm-up over this fraction of the steps instead of --warmup")
    optim.add_argument("--warmup-start", type=float, default=d.warmup_start,
                       help="start the warm-up at this fraction of the rate, as torch's LinearLR; "
                            "unset: ramp (step + 1) / warm-up")
    optim.add_argument("--betas", type=float, nargs=2, default=list(d.betas), metavar=("BETA1", "BETA2"),
                       help="AdamW's moment decay rates")
    optim.add_argument("--weight-decay", type=float, default=d.weight_decay,
                       help="AdamW weight decay of the weight matrices (norms, registers and positions get "
                            "none, unless --decay-all)")
    optim.add_argument("--decay-all", action="store_true", help="decay every parameter, as AdamW's default")
    optim.add_argument("--grad-clip", type=float, default=d.grad_clip,
                       help="clip the gradient's global norm to this; 0: no clipping")
    optim.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                       help="autocast dtype on CUDA; fp16 adds a gradient scaler")
    optim.add_argument("--seed", type=int, default=d.seed, help="seed of the initialisation and of the batch order")
    run = p.add_argument_group("logging and the run folder")
    run.add_argument("--out", default=d.out, help="run folder: log.jsonl, summary.json, checkpoint.pt, "
                     "attention_maps.json, tokenizer.json")
    run.add_argument("--eval-every", type=int, default=d.eval_every,
                     help="steps between validation losses (and q/k norm probes)")
    run.add_argument("--eval-points", type=int, default=d.eval_points,
                     help="evaluate this many times, evenly spaced over the run, instead of --eval-every")
    run.add_argument("--eval-batches", type=int, default=d.eval_batches,
                     help="validation batches per evaluation (fewer if the split is smaller)")
    run.add_argument("--log-every", type=int, default=d.log_every, help="steps between training-loss log lines")
    run.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                     help="steps between checkpoints (one is always written at the end)")
    run.add_argument("--sample-tokens", type=int, default=d.sample_tokens,
                     help=f"tokens of greedy continuation of {SAMPLE_PROMPT!r} put in the summary")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device,
                     help="where to train; auto: the GPU when torch sees one")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--resume", action="store_true", help="continue the run in OUT from its checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")
    run.add_argument("--stop-at", type=int, default=d.stop_at,
                     help="stop after this step with a checkpoint (the schedule still spans --steps)")
    return p


# Command-line names that differ from the LMConfig field they set.
FLAG_FIELDS = {"layers": "n_layers", "heads": "n_heads", "context": "context_length",
               "warmup": "warmup_steps", "bpe_vocab": "bpe_vocab_size"}
_UNSET = object()


def parse_args(argv: list[str] | None = None) -> LMConfig:
    """LMConfig's defaults, then the preset's settings, then every flag given explicitly."""
    parser = build_parser()
    # A namespace pre-filled with a marker: argparse fills in defaults only where a name is missing,
    # so whatever is not the marker afterwards was typed.
    names = [a.dest for a in parser._actions if a.dest != "help"]
    given = parser.parse_args(argv, namespace=argparse.Namespace(**{n: _UNSET for n in names}))
    explicit = {FLAG_FIELDS.get(n, n): v for n, v in vars(given).items() if v is not _UNSET}
    if isinstance(explicit.get("data"), list) and len(explicit["data"]) == 1:
        explicit["data"] = explicit["data"][0]
    if explicit.get("grad_clip") == 0:
        explicit["grad_clip"] = None
    if "betas" in explicit:
        explicit["betas"] = tuple(explicit["betas"])
    preset = explicit.pop("preset", None)
    if preset is None:
        return LMConfig(**explicit)
    settings = preset_settings(preset, explicit.get("attention", "rbf"))
    overrides = tuple(sorted(n for n, v in explicit.items() if n in settings and v != settings[n]))
    return LMConfig(**{**settings, **explicit, "preset_overrides": overrides})


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    if config.preset is not None and int(os.environ.get("RANK", "0")) == 0:
        record = _preset_record(config)
        print(f"preset {config.preset} ({record['seed_code']}), arm {config.attention}:\n"
              f"{describe(record['settings'])}")
        if record["overrides"]:
            print("overridden by flags:\n" + describe(record["overrides"]))
    summary = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train_loss {summary['train_loss']:.4f}  val_loss {summary['val_loss']:.4f}  "
              f"tokens/s {summary['tokens_per_s']:,.0f}  -> {summary['config']['out']}")


if __name__ == "__main__":
    main()
