"""A tiny GPT whose attention kind, positions and registers are all switchable.

Token embedding (+ learned absolute positions if chosen), `num_registers` learned vectors
prepended to every sequence, pre-LayerNorm blocks (attention, then a 4x GELU MLP), a final norm
and an LM head (tied to the token embedding unless asked otherwise). Registers give attention a
place to put weight when no token is relevant; they are dropped before the LM head and are never
predicted.

Registers start at zero for distance attention: with bias-free projections a zero register's key
is zero, so a query's distance to it is just ||q||, a neutral "look away" target. Dot-product
attention gets small random registers (a zero key would give every query the same logit 0).

Two initialisations: `init="gpt2"` (ours: N(0, 0.02) weights, residual writes shrunk by
sqrt(2 n_layers), a tied LM head) and `init="torch"`, the seed's: PyTorch's default of every
layer (N(0, 1) embeddings, Kaiming-uniform linears), with `projection_bias=True` and an untied
LM head with a bias, and dot-product registers drawn from N(0, 1/d_model).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import ATTENTION_KINDS, CausalSelfAttention, KVCache
from ..positional import POSITIONAL_KINDS, LearnedPositions, qk_positional
from ..rbf import SUPPORTED_HEAD_DIMS

DISTANCE_KINDS = ("rbf", "rbf_reference", "rbf_flex")
INITS = ("gpt2", "torch")


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 256   # tokens, registers not counted
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    attention: str = "rbf"
    pos: str = "susie"
    num_registers: int = 1
    mlp_ratio: int = 4
    init: str = "gpt2"              # gpt2 | torch (PyTorch's defaults, as the seed)
    projection_bias: bool = False   # biases on the q/k/v and output projections
    tie_lm_head: bool = True        # False: a separate LM head with a bias

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.pos not in POSITIONAL_KINDS:
            raise ValueError(f"pos must be one of {POSITIONAL_KINDS}, got {self.pos!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (isinstance(self.num_registers, int) and self.num_registers >= 0):
            raise ValueError(f"num_registers must be an integer >= 0, got {self.num_registers!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        head_dim = self.d_model // self.n_heads
        if self.attention in DISTANCE_KINDS and head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"{self.attention} attention supports head dims {SUPPORTED_HEAD_DIMS}; "
                             f"d_model/n_heads = {head_dim}")
        if self.pos in ("rope", "susie") and head_dim % 2:
            raise ValueError(f"{self.pos} needs an even head dimension, got {head_dim}")


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        head_dim = config.d_model // config.n_heads
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(
            config.d_model, config.n_heads, config.attention,
            qk_positional(config.pos, config.n_heads, head_dim, config.num_registers), layer_index,
            bias=config.projection_bias)
        self.norm2 = nn.LayerNorm(config.d_model)
        hidden = config.mlp_ratio * config.d_model
        self.mlp = nn.Sequential(nn.Linear(config.d_model, hidden), nn.GELU(),
                                 nn.Linear(hidden, config.d_model))

    def forward(self, x, positions, cache=None, return_attn=False):
        attended, weights = self.attn(self.norm1(x), positions, cache, return_attn)
        x = x + attended
        return x + self.mlp(self.norm2(x)), weights


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = (LearnedPositions(config.context_length, config.d_model)
                                   if config.pos == "learned" else None)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=not config.tie_lm_head)
        if config.tie_lm_head:
            self.lm_head.weight = self.token_embedding.weight
        if config.init == "gpt2":
            self.apply(self._init_weights)
            for block in self.blocks:  # GPT-2: shrink residual writes so the stream's scale stays ~1
                for layer in (block.attn.proj, block.mlp[2]):
                    nn.init.normal_(layer.weight, std=0.02 / (2 * config.n_layers) ** 0.5)
        registers = torch.zeros(config.num_registers, config.d_model)
        if config.attention not in DISTANCE_KINDS:
            registers.normal_(std=0.02 if config.init == "gpt2" else config.d_model ** -0.5)
        self.registers = nn.Parameter(registers)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None, return_attn: bool = False):
        """Final-norm token states (B, T, C) and, if asked, every layer's attention weights.

        Without a cache, or with an empty one, the registers are prepended; a non-empty cache
        already holds them, and `idx` continues the cached tokens.
        """
        self._check_tokens(idx)
        r = self.config.num_registers
        prefill = cache is None or cache.length == 0
        token_start = 0 if prefill else cache.length - r
        t = idx.shape[1]
        if token_start + t > self.config.context_length:
            raise ValueError(f"{token_start + t} tokens exceed the context length "
                             f"{self.config.context_length}; crop the input (generate() does)")
        token_positions = torch.arange(token_start, token_start + t, device=idx.device)
        x = self.token_embedding(idx)
        if self.position_embedding is not None:
            x = x + self.position_embedding(token_positions)
        positions = token_positions
        if prefill and r:
            x = torch.cat([self.registers.to(x.dtype).expand(idx.shape[0], -1, -1), x], dim=1)
            positions = torch.arange(-r, t, device=idx.device)
        maps = []
        for block in self.blocks:
            x, weights = block(x, positions, cache, return_attn)
            maps.append(weights)
        x = self.final_norm(x)
        return (x[:, r:] if prefill else x), maps

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """Logits (B, T, V) and, given targets (B, T), the mean next-token cross-entropy."""
        hidden, _ = self.hidden_states(idx, cache)
        logits = self.lm_head(hidden)
        if targets is None:
            return logits, None
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from input {tuple(idx.shape)}")
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's weights (B, H, R+T, R+T), register slots first; small inputs only."""
        return self.hidden_states(idx, return_attn=True)[1]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append `max_new_tokens` tokens; temperature 0 is greedy, top_k keeps the k likeliest.

        The model sees at most the last `context_length` tokens. With the cache, each step feeds
        only the newest token; when the cache is full it is rebuilt from the last window, which
        gives exactly what recomputing the cropped window from scratch gives.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        context, r = self.config.context_length, self.config.num_registers
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -context:])
            elif cache is None or cache.length - r >= context:
                cache = KVCache(self.config.n_layers, key_sqnorms=self.config.attention == "rbf")
                logits, _ = self(idx[:, -context:], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            idx = torch.cat([idx, sample_next(logits[:, -1].float(), temperature, top_k, generator)], dim=1)
        return idx

    def _check_tokens(self, idx: torch.Tensor) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError("idx must be a (batch, tokens) tensor of dtype torch.long, got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
        if idx.shape[1] == 0:
            raise ValueError("idx must hold at least one token")
        # Range-checked on the CPU only: on a GPU the check would stall every step on a host sync
        # (there an out-of-range id ends in the embedding's device-side assert instead).
        if idx.device.type == "cpu" and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), "
                             f"got [{idx.min().item()}, {idx.max().item()}]")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B, 1) from last-position logits (B, V)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
