"""Looking inside a trained GPT: q/k norms, key-norm histograms, attention maps, weight norms.

RBF attention scores -c||q - k||^2 = c(2 q.k - ||k||^2) - c||q||^2 penalise long keys, where dot
products reward them; these helpers show how that shapes what a model learns. Norms are taken
"pre-norm": straight out of the q/k projection, before any q/k normalisation or positional term.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .models.gpt import GPT
from .runs import read_jsonl


@torch.no_grad()
def qk_norms(model: GPT, idx: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer, {'q': (B, H, N), 'k': (B, H, N)} Euclidean norms of every slot's projected
    query and key (registers first), read from the fused qkv projection through hooks."""
    captured: list[torch.Tensor] = []
    hooks = [block.attn.qkv.register_forward_hook(lambda mod, inp, out: captured.append(out.detach()))
             for block in model.blocks]
    try:
        model.hidden_states(idx)
    finally:
        for hook in hooks:
            hook.remove()
    heads, head_dim = model.config.n_heads, model.config.d_model // model.config.n_heads
    norms = []
    for qkv in captured:
        b, n, _ = qkv.shape
        q, k, _ = qkv.float().view(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).norm(dim=-1)
        norms.append({"q": q, "k": k})
    return norms


def key_norm_histograms(model: GPT, idx: torch.Tensor, bins: int = 50,
                        include_registers: bool = False) -> list[dict[str, np.ndarray]]:
    """Per layer, {'counts', 'edges'} of the key norms of the tokens in `idx` (all heads)."""
    r = model.config.num_registers
    histograms = []
    for layer in qk_norms(model, idx):
        keys = layer["k"] if include_registers else layer["k"][..., r:]
        counts, edges = np.histogram(keys.flatten().cpu().numpy(), bins=bins)
        histograms.append({"counts": counts, "edges": edges})
    return histograms


def prompt_attention_maps(model: GPT, tokenizer, prompt: str) -> tuple[list[str], list[torch.Tensor]]:
    """Slot labels ('<reg0>', ..., then each token's text) and every layer's (H, N, N) weights;
    a prompt longer than the model's context is cut to its first context_length tokens."""
    ids = tokenizer.encode(prompt)[:model.config.context_length]
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    labels = [f"<reg{i}>" for i in range(model.config.num_registers)]
    labels += [tokenizer.decode([i]) for i in ids]
    return labels, [w[0].cpu() for w in model.attention_maps(idx)]


@torch.no_grad()
def parameter_norms(model: torch.nn.Module) -> dict[str, float]:
    """Frobenius norm of every parameter tensor, by name (the trainer logs these at each eval)."""
    return {name: p.detach().float().norm().item() for name, p in model.named_parameters()}


def norm_trajectories(log_path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """From a run's log.jsonl: parameter name -> (steps, norms), for plotting against training time."""
    trajectories: dict[str, tuple[list[int], list[float]]] = {}
    for record in read_jsonl(log_path):
        for name, norm in record.get("param_norms", {}).items():
            steps, norms = trajectories.setdefault(name, ([], []))
            steps.append(record["step"])
            norms.append(norm)
    if not trajectories:
        raise ValueError(f"{log_path} has no 'param_norms' records; they are logged at every evaluation")
    return trajectories
