"""The tiny GPT (registers, KV-cache generation), its trainer (loss goes down, exact resume,
DDP = one process), the CLI, and the inspection helpers."""
import json
import math
import os
import random
import re
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from rbf_lite.attention import ATTENTION_KINDS, KVCache
from rbf_lite.bench.lm_step import CASES
from rbf_lite.bench.lm_step import main as run_step_benchmark
from rbf_lite.inspect_norms import key_norm_histograms, norm_trajectories, prompt_attention_maps, qk_norms
from rbf_lite.lm import LMConfig, build_parser, load_run, lr_factor, parse_args, train
from rbf_lite.seed_presets import PRESETS, preset_settings
from rbf_lite.models.gpt import GPT, GPTConfig
from rbf_lite.positional import POSITIONAL_KINDS
from rbf_lite.runs import read_jsonl

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile",
                                        "ignore:FlexAttention has no backward pass on the CPU")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Token caches go to this session's temp folder; the CPU runs `rbf` through the reference
    (what it does without TRITON_INTERPRET) so that training stays fast."""
    monkeypatch.setenv("RBF_LITE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="module")
def generated_text(tmp_path_factory) -> Path:
    """Template stories, for when the real sample is absent (and for the fast tests)."""
    rng = random.Random(0)
    names, things = ["Tom", "Lily", "Sam", "Mia", "Ben"], ["ball", "cat", "kite", "cake", "boat", "tree"]
    stories = [f"{a} had a {t}. The {t} was {c}. {a} gave the {t} to {b}, and {b} was happy."
               for a, b, t, c in ((rng.choice(names), rng.choice(names), rng.choice(things),
                                   rng.choice(["red", "big", "soft", "old"])) for _ in range(600))]
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(stories))
    return path


def tiny(out: Path, data, **overrides) -> LMConfig:
    config = LMConfig(attention="rbf", pos="susie", registers=1, d_model=64, n_layers=2, n_heads=2,
                      context_length=32, steps=30, batch_size=8, lr=3e-3, warmup_steps=5,
                      tokenizer="bpe", bpe_vocab_size=384, eval_every=1000, eval_batches=2, log_every=1,
                      checkpoint_every=1000, sample_tokens=4, data=str(data), out=str(out), device="cpu")
    return replace(config, **overrides)


def small_model(attention="rbf", pos="susie", registers=2, context=8) -> GPT:
    return GPT(GPTConfig(vocab_size=37, context_length=context, d_model=32, n_layers=2, n_heads=2,
                         attention=attention, pos=pos, num_registers=registers))


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_registers_start_at_zero_for_distance_attention_only(attention):
    model = small_model(attention)
    if attention.startswith("rbf"):
        assert torch.all(model.registers == 0)
        norms = qk_norms(model, torch.randint(0, 37, (2, 5)))
        assert torch.all(norms[0]["k"][..., :2] == 0)  # a zero register's key is zero: distance ||q||
    else:
        assert 0.005 < model.registers.std() < 0.05
    logits, loss = model(torch.randint(0, 37, (2, 5)), torch.randint(0, 37, (2, 5)))
    assert logits.shape == (2, 5, 37)  # registers never reach the LM head
    loss.backward()
    assert model.registers.grad.abs().sum() > 0


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
@pytest.mark.parametrize("pos", POSITIONAL_KINDS)
def test_kv_cache_logits_and_generation_equal_full_recomputation(attention, pos):
    model = small_model(attention, pos)
    tokens = torch.randint(0, 37, (2, 8))
    with torch.no_grad():
        full, _ = model(tokens)
        cache = KVCache(model.config.n_layers)
        stepwise = torch.cat([model(tokens[:, :3], cache=cache)[0]] +
                             [model(tokens[:, i:i + 1], cache=cache)[0] for i in range(3, 8)], dim=1)
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=1e-4)
    prompt = tokens[:, :3]  # 3 + 14 tokens run past the context of 8: the cache must be rebuilt
    assert torch.equal(model.generate(prompt, 14, temperature=0),
                       model.generate(prompt, 14, temperature=0, use_cache=False))
    sampled = [model.generate(prompt, 14, temperature=0.8, top_k=5, use_cache=use,
                              generator=torch.Generator().manual_seed(5)) for use in (True, False)]
    assert torch.equal(*sampled)


def test_bad_model_inputs_are_named():
    with pytest.raises(ValueError, match="attention must be one of"):
        GPTConfig(attention="linear")
    with pytest.raises(ValueError, match="head dims"):
        GPTConfig(d_model=48, n_heads=2, attention="rbf")
    with pytest.raises(ValueError, match="num_registers"):
        GPTConfig(num_registers=-1)
    model = small_model()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 37\)"):
        model(torch.tensor([[3, 40]]))
    with pytest.raises(ValueError, match="exceed the context length"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="torch.long"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=-1)


# ---------------------------------------------------------------- inspection


def test_inspection_helpers_shapes():
    model = small_model(registers=1)
    idx = torch.randint(0, 37, (3, 6))
    norms = qk_norms(model, idx)
    assert len(norms) == 2 and norms[0]["q"].shape == (3, 2, 7) and torch.all(norms[1]["k"] >= 0)
    hist = key_norm_histograms(model, idx, bins=10)
    assert hist[0]["counts"].sum() == 3 * 2 * 6 and len(hist[0]["edges"]) == 11

    class CharTokenizer:
        def encode(self, text):
            return [ord(c) % 37 for c in text]

        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    labels, maps = prompt_attention_maps(model, CharTokenizer(), "hello")
    assert labels[0] == "<reg0>" and len(labels) == 6 and maps[0].shape == (2, 6, 6)


# ---------------------------------------------------------------- training


def losses(out: Path, key: str) -> list[float]:
    return [r[key] for r in read_jsonl(out / "log.jsonl") if key in r]


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "sdpa_qknorm", "rbf"])
def test_training_on_the_tinystories_sample_lowers_the_loss(attention, shared_data, tmp_path):
    config = tiny(tmp_path / attention, shared_data / "tinystories", attention=attention,
                  pos="rope" if attention.startswith("sdpa") else "susie", bpe_vocab_size=512)
    summary = train(config)
    train_losses = losses(tmp_path / attention, "train_loss")
    assert len(train_losses) == 30 and train_losses[0] > math.log(512) - 0.3
    assert summary["train_loss"] < train_losses[0] - 0.5 and summary["val_loss"] < train_losses[0] - 0.5
    assert "train-sample.txt" in summary["data"]["train"] and summary["completed"]


@pytest.mark.slow
def test_training_on_generated_text_lowers_the_loss(generated_text, tmp_path):
    summary = train(tiny(tmp_path / "run", generated_text))
    first = losses(tmp_path / "run", "train_loss")[0]
    assert summary["train_loss"] < first - 1.0 and summary["val_loss"] < first - 1.0
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["config"]["attention"] == "rbf" and saved["environment"]["torch"] == torch.__version__
    assert saved["tokens_per_s"] > 0 and isinstance(saved["sample"], str)
    trajectories = norm_trajectories(tmp_path / "run" / "log.jsonl")
    assert trajectories["registers"][0] == [30]
    evaluations = [r for r in read_jsonl(tmp_path / "run" / "log.jsonl") if "val_loss" in r]
    assert saved["best_val_loss"] == min(r["val_loss"] for r in evaluations)
    probe = evaluations[-1]["qk_norms"]  # pre-norm q/k norms, one entry per layer
    assert len(probe) == saved["model"]["n_layers"] and all(layer["q"] > 0 and layer["k"] > 0 for layer in probe)
    maps = json.loads((tmp_path / "run" / "attention_maps.json").read_text())
    weights = torch.tensor(maps["layers"])  # (layers, heads, slots, slots), rows sum to 1, causal
    assert weights.shape[0] == saved["model"]["n_layers"] and weights.shape[-1] == len(maps["slots"])
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-2) and weights.triu(1).abs().max() == 0
    model, tokenizer = load_run(tmp_path / "run", device="cpu")
    assert model.config.attention == "rbf" and tokenizer.decode(tokenizer.encode("Tom had")) == "Tom had"


def test_interrupted_and_resumed_run_ends_bit_identical(generated_text, tmp_path):
    config = tiny(tmp_path / "straight", generated_text, steps=10, eval_every=4, log_every=2)
    straight = train(config)
    interrupted = replace(config, out=str(tmp_path / "resumed"))
    train(replace(interrupted, stop_at=4))  # on the log and eval grid, so the logs match too
    resumed = train(replace(interrupted, resume=True))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["train_loss"] == straight["train_loss"] and resumed["val_loss"] == straight["val_loss"]
    assert without_timing(tmp_path / "resumed") == without_timing(tmp_path / "straight")


def without_timing(out: Path) -> list[dict]:
    """Log records minus throughput, the one thing a resumed run may legitimately log differently."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_jsonl(out / "log.jsonl")]


def test_resume_refuses_a_changed_config_or_a_missing_checkpoint(generated_text, tmp_path):
    config = tiny(tmp_path / "run", generated_text, steps=4)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(replace(config, resume=True))
    train(replace(config, stop_at=2))
    with pytest.raises(ValueError, match="different lr"):
        train(replace(config, resume=True, lr=1e-2))
    with pytest.raises(ValueError, match="already at step 2"):
        train(replace(config, resume=True, stop_at=2))


def test_an_existing_run_is_neither_overwritten_nor_mixed_without_a_flag(generated_text, tmp_path):
    config = tiny(tmp_path / "run", generated_text, steps=2)
    first = train(config)
    log_lines = (tmp_path / "run" / "log.jsonl").read_text()
    with pytest.raises(FileExistsError, match="--resume|--overwrite"):
        train(config)
    assert (tmp_path / "run" / "log.jsonl").read_text() == log_lines, "the refused run touched the folder"
    again = train(replace(config, overwrite=True))
    assert again["train_loss"] == first["train_loss"], "--overwrite starts the run afresh"
    assert parse_args(["--overwrite"]).overwrite and not parse_args([]).overwrite


def test_cli_help_gives_every_option_a_sentence_and_its_default():
    parser = build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    bookkeeping = {"preset_overrides"}  # set by --preset and the flags given, not a flag of its own
    assert len(options) == len(fields(LMConfig)) - len(bookkeeping), "every LMConfig field has one option"
    text = parser.format_help()
    for action in options:
        flag = action.option_strings[0]
        block = re.search(rf"\n  {re.escape(flag)}\b(.*?)(?=\n  -|\n\n|\Z)", text, re.S)
        assert block, f"{flag} is missing from --help"
        body = " ".join(block.group(1).split())
        assert re.search(r"[a-z]{3,} .*\(default: [^)]*\)$", body), f"{flag}: no sentence or no default: {body!r}"


def run_cli(args: list[str], out: Path, nproc: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [sys.executable, "-m", "rbf_lite.lm"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "rbf_lite.lm"]
    done = subprocess.run(launcher + args + ["--out", str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_on_the_same_global_batch(generated_text, tmp_path):
    args = ["--attention", "rbf", "--pos", "susie", "--registers", "1", "--steps", "6", "--seed", "3",
            "--data", str(generated_text), "--d-model", "64", "--layers", "2", "--heads", "2",
            "--context", "32", "--batch-size", "8", "--tokenizer", "bpe", "--bpe-vocab", "384",
            "--eval-batches", "2", "--lr", "3e-3", "--warmup", "2", "--sample-tokens", "0", "--device", "cpu"]
    single = run_cli(args, tmp_path / "one")
    ddp = run_cli(args, tmp_path / "ddp", nproc=2)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert (tmp_path / "ddp" / "log.jsonl").exists() and "--steps 6" in single["environment"]["command"]


def test_cli_flags_map_to_the_config_and_bad_values_fail():
    config = parse_args(["--attention", "sdpa_qknorm", "--pos", "rope", "--registers", "3", "--steps", "7",
                         "--seed", "2", "--data", "x.txt", "--out", "o", "--d-model", "128", "--batch-size", "4"])
    assert (config.attention, config.pos, config.registers, config.steps, config.seed, config.data,
            config.out, config.d_model, config.batch_size) == ("sdpa_qknorm", "rope", 3, 7, 2, "x.txt", "o", 128, 4)
    assert parse_args([]).d_model == 256 and parse_args([]).n_layers == 4 and parse_args([]).registers == 1
    with pytest.raises(SystemExit):
        parse_args(["--attention", "cosine"])
    with pytest.raises(ValueError, match="stop_at"):
        LMConfig(steps=5, stop_at=9)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        LMConfig(steps=0)


def test_step_benchmark_writes_timings_and_ratios(tmp_path):
    report = run_step_benchmark(["--out", str(tmp_path / "bench.json"), "--batch-size", "2", "--context", "16",
                    "--d-model", "32", "--heads", "2", "--layers", "1", "--vocab", "64", "--steps", "2",
                    "--warmup", "1", "--device", "cpu"])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["results"] == report["results"] and len(report["results"]) == len(CASES)
    assert [(r["attention"], r["pos"]) for r in report["results"]] == list(CASES)
    assert report["results"][0]["time_ratio_vs_sdpa"] == 1.0
    assert all(r["tokens_per_s"] > 0 for r in report["results"]) and "torch" in saved["environment"]


# ---------------------------------------------------------------- the seed's presets


SEED_SETTINGS = {  # read off train_rbf_transformer.py at 61707b5, independently of seed_presets.py
    "layout": "stories", "tokenizer": "gpt2", "d_model": 256, "n_layers": 4, "n_heads": 4, "batch_size": 64,
    "lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.01, "decay_all": True, "grad_clip": None,
    "warmup_fraction": 0.03, "warmup_start": 1e-5, "min_lr_ratio": 0.01, "epochs": 1.0, "precision": "fp16",
    "init": "torch", "projection_bias": True, "tie_lm_head": False,
}


@pytest.mark.parametrize("preset, arm, pos, registers", [
    ("seed-headline", "sdpa", "learned", 0), ("seed-headline", "rbf", "learned", 0),
    ("seed-susie", "sdpa", "rope", 1), ("seed-susie", "rbf", "susie", 1)])
def test_presets_set_every_seed_setting(preset, arm, pos, registers):
    config = parse_args(["--preset", preset, "--attention", arm, "--seed", "4"])
    for name, value in SEED_SETTINGS.items():
        assert getattr(config, name) == value, name
    assert (config.pos, config.registers, config.seed, config.preset) == (pos, registers, 4, preset)
    assert config.context_length == 255 - registers, "rows of 256 - R tokens; inputs drop the last"
    assert config.preset_overrides == (), "nothing was overridden"
    assert set(preset_settings(preset, arm)) - {"preset"} <= {f.name for f in fields(LMConfig)}


def test_flags_override_a_preset_and_say_so():
    config = parse_args(["--preset", "seed-headline", "--attention", "rbf", "--lr", "3e-4", "--d-model", "128",
                         "--heads", "2", "--batch-size", "64"])
    assert config.lr == 3e-4 and config.d_model == 128 and config.n_heads == 2
    assert config.preset_overrides == ("d_model", "lr", "n_heads"), "a value equal to the preset's is no override"
    with pytest.raises(ValueError, match="arms"):
        parse_args(["--preset", "seed-susie", "--attention", "sdpa_qknorm"])
    with pytest.raises(SystemExit):
        parse_args(["--preset", "seed-everything"])
    assert set(PRESETS) == {"seed-headline", "seed-susie"}


def test_torch_init_is_pytorchs_default_with_biases_and_an_untied_head():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=4000, context_length=64, d_model=256, n_layers=2, n_heads=4, attention="sdpa",
                       pos="learned", num_registers=1, init="torch", projection_bias=True, tie_lm_head=False)
    model = GPT(config)
    assert model.token_embedding.weight.std().item() == pytest.approx(1.0, rel=0.02)  # nn.Embedding: N(0, 1)
    assert model.position_embedding.table.weight.std().item() == pytest.approx(1.0, rel=0.05)
    bound = 1 / math.sqrt(256)  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases
    qkv = model.blocks[0].attn.qkv
    assert qkv.bias is not None and model.blocks[0].attn.proj.bias is not None
    assert qkv.weight.abs().max() <= bound and qkv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert model.lm_head.weight is not model.token_embedding.weight and model.lm_head.bias is not None
    assert model.registers.std().item() == pytest.approx(256 ** -0.5, rel=0.3), "SDPA registers: N(0, 1/d)"
    rbf = GPT(replace(config, attention="rbf"))
    assert torch.equal(rbf.registers, torch.zeros_like(rbf.registers)), "RBF registers start at zero"
    ours = GPT(replace(config, init="gpt2", projection_bias=False, tie_lm_head=True))
    assert ours.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert ours.lm_head.weight is ours.token_embedding.weight and ours.blocks[0].attn.qkv.bias is None


def test_seed_schedule_matches_torchs_linear_then_cosine_schedulers():
    config = replace(LMConfig(), steps=200, warmup_steps=6, warmup_start=1e-5, min_lr_ratio=0.01, lr=1e-3)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-5, total_iters=6)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200 - 6, eta_min=1e-5)
    seed = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[6])
    for step in range(200):
        assert config.lr * lr_factor(step, config) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-6, abs=1e-12)
        optimizer.step()
        seed.step()


def test_epochs_warmup_fraction_and_eval_points_resolve_from_the_data():
    config = replace(LMConfig(), epochs=1.0, warmup_fraction=0.03, eval_points=25, batch_size=64)
    resolved = config.resolved(train_rows=16_000)
    assert resolved.steps == 250 and resolved.warmup_steps == 8 and resolved.eval_every == 10
    assert config.resolved(train_rows=16_063).steps == 250, "a partial last batch is left out: no row twice"
    with pytest.raises(ValueError, match="epochs"):
        LMConfig(epochs=0)


@pytest.mark.slow
def test_story_layout_trains_validates_on_held_out_stories_and_records_the_preset(generated_text, tmp_path):
    out = tmp_path / "stories"
    config = tiny(out, generated_text, layout="stories", validation_holdout=40, epochs=1.0, warmup_fraction=0.1,
                  eval_points=4, init="torch", projection_bias=True, tie_lm_head=False, betas=(0.9, 0.999),
                  decay_all=True, grad_clip=None, warmup_start=1e-5, preset="seed-susie",
                  preset_overrides=("d_model",))
    summary = train(config)
    rows, distinct = summary["data"]["train_rows"], len(set(generated_text.read_text().split("\n<|endoftext|>\n")))
    assert summary["data"]["validation_rows"] == 40 and rows == distinct - 40, "one row per distinct story"
    assert summary["steps_done"] == rows // 8 == 41 and summary["config"]["warmup_steps"] == 4
    assert len(losses(out, "val_loss")) >= 4 and summary["val_loss"] < losses(out, "train_loss")[0] - 1.0
    assert "one story per row" in summary["data"]["layout"]
    assert summary["preset"]["name"] == "seed-susie" and "d_model" in summary["preset"]["overrides"]
    assert all(r["grad_norm"] > 0 for r in read_jsonl(out / "log.jsonl") if "grad_norm" in r)
