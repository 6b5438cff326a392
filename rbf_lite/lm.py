"""Train the tiny GPT on TinyStories: `python -m rbf_lite.lm --attention rbf --pos susie ...`.

One script for one device or many (`torchrun --nproc_per_node N -m rbf_lite.lm ...`, DDP): the
global batch is fixed and split over processes, and batch `step` is a pure function of
(seed, step) (see `ShuffledBatches`), so the data position in a checkpoint is just the step.
AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA (fp32 on the
CPU). Every metric goes to DIR/log.jsonl (validation loss, pre-norm q/k norms and parameter norms
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from .attention import ATTENTION_KINDS
from .data.text import TOKENIZERS, PackedWindows, ShuffledBatches, TextTokenizer, prepare_tinystories
from .inspect_norms import parameter_norms, prompt_attention_maps, qk_norms
from .models.gpt import GPT, GPTConfig
from .positional import POSITIONAL_KINDS
from .runs import (JsonlLog, environment, load_checkpoint, prepare_run_dir, progress, read_jsonl,
                   save_checkpoint, seed_everything, write_json)

SAMPLE_PROMPT = "Once upon a time"
# The prompt whose attention maps every run saves (OUT/attention_maps.json) for the book's figures.
ATTENTION_PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside."
NORM_PROBE_WINDOWS = 8  # validation windows whose pre-norm q/k norms are logged at each evaluation


@dataclass
class LMConfig:
    attention: str = "rbf"
    pos: str = "susie"
    registers: int = 1
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    context_length: int = 256
    steps: int = 2000
    batch_size: int = 64            # global: split evenly over processes
    lr: float = 1e-3
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    data: str | None = None         # text file or folder; None: RBF_LITE_DATA, ../shared/data, hub
    data_source: str = "auto"       # auto | local | hub
    train_stories: int | None = None       # first N training stories only (None: the whole split)
    validation_stories: int | None = None  # first N validation stories only (None: the whole split)
    tokenizer: str = "gpt2"         # gpt2 | bpe (trained on the training text)
    bpe_vocab_size: int = 4096
    eval_every: int = 200
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

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.pos not in POSITIONAL_KINDS:
            raise ValueError(f"pos must be one of {POSITIONAL_KINDS}, got {self.pos!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "log_every", "checkpoint_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.warmup_steps >= 0
                and self.weight_decay >= 0 and self.grad_clip > 0):
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0, "
                             "weight_decay >= 0 and grad_clip > 0")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ValueError(f"stop_at must lie in [1, steps={self.steps}], got {self.stop_at}")

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, context_length=self.context_length, d_model=self.d_model,
                         n_layers=self.n_layers, n_heads=self.n_heads, attention=self.attention,
                         pos=self.pos, num_registers=self.registers)


# Fields that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("resume", "overwrite", "stop_at", "device", "compile", "eval_every", "log_every",
                     "checkpoint_every", "sample_tokens")


def lr_factor(step: int, config: LMConfig) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay the weight matrices of Linear and Embedding layers only; norms, registers and
    positional weights are left alone (decay would pull registers and SuSiE weights to zero)."""
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


def autocast(device: torch.device):
    """bf16 autocast on CUDA; the CPU stays in fp32 (exact, and bf16 is slow there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _all_reduce_(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model: GPT, windows: PackedWindows, config: LMConfig, device: torch.device,
             rank: int = 0, world_size: int = 1) -> float:
    """Mean next-token loss over the first eval_batches * batch_size validation windows (fewer if
    the split is smaller), split across processes."""
    n = min(windows.num_windows, config.eval_batches * config.batch_size)
    mine = list(range(rank, n, world_size))
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, token count
    per_batch = max(1, config.batch_size // world_size)
    for start in range(0, len(mine), per_batch):
        x, y = (t.to(device) for t in windows.rows(mine[start:start + per_batch]))
        with autocast(device):
            _, loss = model(x, y)
        total += torch.tensor([loss.item() * y.numel(), y.numel()], dtype=torch.float64, device=device)
    total = _all_reduce_(total, world_size)
    return (total[0] / total[1]).item()


@torch.no_grad()
def mean_qk_norms(model: GPT, probe: torch.Tensor) -> list[dict[str, float]]:
    """Per layer, the mean pre-norm ||q|| and ||k|| over the tokens of `probe` (registers left out,
    all heads): the trajectories the seed's claim about norm growth is about."""
    r = model.config.num_registers
    with autocast(probe.device):
        layers = qk_norms(model, probe)
    return [{name: layer[name][..., r:].mean().item() for name in ("q", "k")} for layer in layers]


def best_validation(log_path: Path) -> tuple[float | None, int | None]:
    """Lowest validation loss in the log and its step (read from the file, so resumes keep it)."""
    val = [(r["val_loss"], r["step"]) for r in read_jsonl(log_path) if "val_loss" in r]
    return min(val) if val else (None, None)


def save_attention_maps(model: GPT, tokenizer: TextTokenizer, path: Path) -> None:
    """Every layer's (H, N, N) weights on ATTENTION_PROMPT, rounded: a few kB per run."""
    with autocast(next(model.parameters()).device):
        slots, layers = prompt_attention_maps(model, tokenizer, ATTENTION_PROMPT)
    maps = {"prompt": ATTENTION_PROMPT, "slots": slots,
            "layers": [torch.round(w.double(), decimals=4).tolist() for w in layers]}
    path.write_text(json.dumps(maps, separators=(",", ":")) + "\n")  # compact: thousands of numbers


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
                               config.train_stories, config.validation_stories)
    if is_main and world_size > 1:
        dist.barrier()
    train_windows = PackedWindows(data.train, config.context_length, "the training split")
    val_windows = PackedWindows(data.validation, config.context_length, "the validation split")
    batches = ShuffledBatches(train_windows, config.batch_size, config.seed)
    norm_probe = val_windows.rows(range(min(NORM_PROBE_WINDOWS, val_windows.num_windows)))[0].to(device)

    model = GPT(config.model_config(data.tokenizer.vocab_size)).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.95), fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    start_step = 0
    if config.resume:
        state = load_checkpoint(checkpoint_path, map_location=device)
        _check_resumable(state["config"], config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
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
        with autocast(device):
            _, loss = forward(x, y)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
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
            val_loss = evaluate(model, val_windows, config, device, rank, world_size)
            if is_main:
                log.write(step=done, val_loss=val_loss, val_perplexity=math.exp(val_loss),
                          qk_norms=mean_qk_norms(model, norm_probe), param_norms=parameter_norms(model))
        if is_main and (done % config.checkpoint_every == 0 or done == end_step):
            save_checkpoint(checkpoint_path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), data_step=done, config=asdict(config))
        interval_start += time.perf_counter() - pause_start
    bar.close()
    best_val_loss, best_val_step = best_validation(out / "log.jsonl") if is_main else (None, None)
    summary = {
        "config": asdict(config),
        "model": asdict(model.config),
        "parameters": model.num_parameters(),
        "environment": environment(device),
        "world_size": world_size,
        "data": {**data.sources, "tokenizer": data.tokenizer.name, "train_tokens": len(data.train),
                 "validation_tokens": len(data.validation),
                 "layout": f"packed windows of {config.context_length} + 1 tokens"},
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
        summary["sample"] = sample_text(model, data.tokenizer, SAMPLE_PROMPT, config.sample_tokens)
    if is_main:
        save_attention_maps(model, data.tokenizer, out / "attention_maps.json")
        write_json(out / "summary.json", summary)
    return summary


@torch.no_grad()
def sample_text(model: GPT, tokenizer: TextTokenizer, prompt: str, max_new_tokens: int,
                temperature: float = 0.0, top_k: int | None = None, seed: int = 0) -> str:
    """Continue `prompt` with the KV-cached generator; greedy unless temperature > 0."""
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with autocast(device):
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
    model.add_argument("--context", type=int, default=d.context_length, help="tokens per training window")
    data = p.add_argument_group("data")
    data.add_argument("--data", default=d.data, help="TinyStories text file or folder; unset: "
                      "$RBF_LITE_DATA, then ../shared/data, then the Hugging Face hub")
    data.add_argument("--data-source", choices=("auto", "local", "hub"), default=d.data_source,
                      help="where stories come from: local files, the hub, or local when found (auto)")
    data.add_argument("--train-stories", type=int, default=d.train_stories,
                      help="use only the first N training stories (a sample; from the hub only these "
                           "are downloaded); unset: the whole split")
    data.add_argument("--validation-stories", type=int, default=d.validation_stories,
                      help="use only the first N validation stories; unset: the whole split")
    data.add_argument("--tokenizer", choices=TOKENIZERS, default=d.tokenizer,
                      help="GPT-2's 50,257-token BPE, or a small BPE learned from the training stories")
    data.add_argument("--bpe-vocab", type=int, default=d.bpe_vocab_size,
                      help="vocabulary size of the learned BPE (with --tokenizer bpe)")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=d.steps, help="training steps (the schedule's length)")
    optim.add_argument("--batch-size", type=int, default=d.batch_size,
                       help="global batch in windows, split evenly over all processes")
    optim.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    optim.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                       help="the cosine decay ends at lr times this ratio")
    optim.add_argument("--warmup", type=int, default=d.warmup_steps, help="steps of linear learning-rate warm-up")
    optim.add_argument("--weight-decay", type=float, default=d.weight_decay,
                       help="AdamW weight decay of the weight matrices (norms, registers and positions get none)")
    optim.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient's global norm to this")
    optim.add_argument("--seed", type=int, default=d.seed, help="seed of the initialisation and of the batch order")
    run = p.add_argument_group("logging and the run folder")
    run.add_argument("--out", default=d.out, help="run folder: log.jsonl, summary.json, checkpoint.pt, "
                     "attention_maps.json, tokenizer.json")
    run.add_argument("--eval-every", type=int, default=d.eval_every,
                     help="steps between validation losses (and q/k norm probes)")
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


def parse_args(argv: list[str] | None = None) -> LMConfig:
    a = build_parser().parse_args(argv)
    return LMConfig(attention=a.attention, pos=a.pos, registers=a.registers, d_model=a.d_model,
                    n_layers=a.layers, n_heads=a.heads, context_length=a.context, steps=a.steps,
                    batch_size=a.batch_size, lr=a.lr, min_lr_ratio=a.min_lr_ratio,
                    warmup_steps=a.warmup, weight_decay=a.weight_decay, grad_clip=a.grad_clip,
                    seed=a.seed, data=a.data, data_source=a.data_source, train_stories=a.train_stories,
                    validation_stories=a.validation_stories, tokenizer=a.tokenizer,
                    bpe_vocab_size=a.bpe_vocab, eval_every=a.eval_every, eval_batches=a.eval_batches,
                    log_every=a.log_every, checkpoint_every=a.checkpoint_every,
                    sample_tokens=a.sample_tokens, out=a.out, device=a.device, compile=a.compile,
                    resume=a.resume, overwrite=a.overwrite, stop_at=a.stop_at)


def main(argv: list[str] | None = None) -> None:
    summary = train(parse_args(argv))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train_loss {summary['train_loss']:.4f}  val_loss {summary['val_loss']:.4f}  "
              f"tokens/s {summary['tokens_per_s']:,.0f}  -> {summary['config']['out']}")


if __name__ == "__main__":
    main()
