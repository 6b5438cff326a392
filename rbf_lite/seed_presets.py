"""The seed's two TinyStories configurations: `python -m rbf_lite.lm --preset NAME --attention ARM`.

Read from the seed's training script (4rtemi5/rbf_attention at 61707b5, `train_rbf_transformer.py`
and `rbf_attention.py`), setting by setting:

- data: one row per story, tokenized with GPT-Neo's vocabulary (GPT-2's), truncated to
  256 - registers tokens, right-padded, padded targets left out of the loss; the model reads the
  first 255 - registers of them; validation on held-out training stories; one pass;
- model: d_model 256, 4 layers of 4 heads, PyTorch's default initialisation, biases on q/k/v and
  the output projection, an untied LM head with a bias;
- optimiser: AdamW, lr 1e-3, betas (0.9, 0.999), weight decay 0.01 on every parameter, no
  gradient clipping, batch 64, float16 autocast with a gradient scaler;
- schedule: linear warm-up from 1e-5 of the rate (the seed's 1,000 of 33k steps, so 3% of the run
  here), then cosine to 1e-5.

`seed-headline` is the configuration of the seed's measured win: learned absolute positions and no
registers, for both arms. `seed-susie` is the one it moved to afterwards: SDPA with RoPE against
RBF with SuSiE, one register each (zeros for RBF, N(0, 1/d) for SDPA).

Two choices are ours and say so: the held-out validation set has 512 stories (the seed's 0.1% of
2.1 M would be 2 of our 17k), and 25 evaluations spread over the run (the seed evaluated every
1,000 steps). Everything else an explicit flag changes is recorded as an override.
"""
from __future__ import annotations

SEED_REPOSITORY = "4rtemi5/rbf_attention"
SEED_COMMIT = "61707b5"
ARMS = ("sdpa", "rbf")
SEED_MAX_SEQ_LEN = 256  # tokens per tokenized row, registers included

COMMON = dict(
    layout="stories", tokenizer="gpt2", d_model=256, n_layers=4, n_heads=4, batch_size=64,
    lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01, decay_all=True, grad_clip=None,
    warmup_fraction=0.03, warmup_start=1e-5, min_lr_ratio=0.01, epochs=1.0, precision="fp16",
    init="torch", projection_bias=True, tie_lm_head=False,
    validation_holdout=512, eval_points=25, eval_batches=8,
)
PRESETS = {
    "seed-headline": dict(registers=0, pos={"sdpa": "learned", "rbf": "learned"}),
    "seed-susie": dict(registers=1, pos={"sdpa": "rope", "rbf": "susie"}),
}


def preset_settings(name: str, attention: str) -> dict:
    """Every LMConfig field the preset fixes for one arm (`attention` is 'sdpa' or 'rbf')."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    if attention not in ARMS:
        raise ValueError(f"preset {name!r} compares the arms {ARMS}; --attention {attention!r} is "
                         "not one of them")
    preset = PRESETS[name]
    registers = preset["registers"]
    return {**COMMON, "preset": name, "attention": attention, "pos": preset["pos"][attention],
            "registers": registers, "context_length": SEED_MAX_SEQ_LEN - registers - 1}


def describe(settings: dict) -> str:
    """The settings as `name=value` lines, for the run's printout."""
    return "\n".join(f"  {key} = {value!r}" for key, value in sorted(settings.items()))
