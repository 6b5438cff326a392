"""Training runs for the book's language-model and outlook chapters: run, load, plot, tabulate.

The chapters tell the story; these helpers do the work. A run is a folder written by
`rbf_lite.lm.train` (log.jsonl, summary.json, checkpoint.pt, tokenizer.json). Committed results
live under the repository's `results/`; `rbf_lite.viz.results_dir()` finds it from the book's folder or the
repository root, and every loader says plainly when there is nothing recorded yet.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

from . import DOT, PALETTE, RBF, go, make_subplots

# One colour per attention variant, used by every figure of these chapters.
VARIANT_COLORS = {"sdpa+rope": DOT, "sdpa_qknorm+rope": PALETTE[1], "rbf+susie": RBF,
                  "sdpa+learned": DOT, "rbf+learned": RBF}


def variant_color(label: str, index: int = 0) -> str:
    return VARIANT_COLORS.get(label, PALETTE[index % len(PALETTE)])


# --- reading runs -------------------------------------------------------------------------------------
def read_log(run_dir: str | Path) -> dict[str, np.ndarray]:
    """A run's log.jsonl as arrays: train_step, train_loss, tokens_per_s, val_step, val_loss; and
    qk_step, qk_norms (per evaluation, per layer, {'q', 'k'} mean pre-norm lengths) where logged."""
    from ..runs import read_jsonl
    records = read_jsonl(Path(run_dir) / "log.jsonl")
    train = [r for r in records if "train_loss" in r]
    val = [r for r in records if "val_loss" in r]
    return {
        "train_step": np.array([r["step"] for r in train]),
        "train_loss": np.array([r["train_loss"] for r in train]),
        "tokens_per_s": np.array([r.get("tokens_per_s", np.nan) for r in train]),
        "val_step": np.array([r["step"] for r in val]),
        "val_loss": np.array([r["val_loss"] for r in val]),
        "qk_step": [r["step"] for r in val if "qk_norms" in r],
        "qk_norms": [r["qk_norms"] for r in val if "qk_norms" in r],
    }


def read_summary(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def run_label(summary: Mapping) -> str:
    config = summary["config"]
    return f"{config['attention']}+{config['pos']}"


# --- figures ------------------------------------------------------------------------------------------
def loss_curves(runs: Mapping[str, str | Path], title: str = "Loss", log_x: bool = False) -> go.Figure:
    """Training loss (lines) and validation loss (markers) of one or more runs against the step."""
    fig = go.Figure()
    for i, (label, run_dir) in enumerate(runs.items()):
        log, color = read_log(run_dir), variant_color(label, i)
        fig.add_scatter(x=log["train_step"], y=log["train_loss"], mode="lines", name=f"{label} train",
                        line=dict(color=color), legendgroup=label)
        if len(log["val_step"]):
            fig.add_scatter(x=log["val_step"], y=log["val_loss"], mode="markers", name=f"{label} validation",
                            marker=dict(color=color, size=9, symbol="diamond"), legendgroup=label)
    fig.update_layout(title_text=title, xaxis_title="step", yaxis_title="next-token loss (nats)",
                      height=420, margin=dict(t=50, b=40))
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def attention_map_grid(maps: Mapping[str, tuple], prompt: str) -> go.Figure:
    """Head-averaged attention weights on `prompt`: one row per model, one column per layer.

    `maps` maps a label to (slot labels, per-layer (H, N, N) weights), as
    `inspect_norms.prompt_attention_maps` returns them or a run's attention_maps.json holds them.
    Slots are the register(s) first, then the tokens; row = query, column = key; causal, so the
    upper triangle is zero.
    """
    n_layers = max(len(m[1]) for m in maps.values())
    # Layers name the columns once, models name the rows (as y-axis titles): titles of the form
    # "model, layer j" over every panel collide when four layers share the column's width.
    fig = make_subplots(rows=len(maps), cols=n_layers, subplot_titles=[f"layer {j}" for j in range(n_layers)],
                        horizontal_spacing=0.04, vertical_spacing=0.1 if len(maps) < 4 else 0.05)
    for i, (label, (slots, layers)) in enumerate(maps.items()):
        names = [f"{k}:{s!r}" for k, s in enumerate(slots)]
        for j, weights in enumerate(layers):
            fig.add_heatmap(z=np.asarray(weights, dtype=float).mean(0), x=names, y=names, zmin=0, zmax=1,
                            colorscale="Viridis", showscale=i == 0 and j == 0,
                            colorbar=dict(title="weight", len=0.5),
                            hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>",
                            row=i + 1, col=j + 1)
            fig.update_yaxes(autorange="reversed", showticklabels=False, row=i + 1, col=j + 1)
            fig.update_xaxes(showticklabels=False, row=i + 1, col=j + 1)
        fig.update_yaxes(title_text=label, row=i + 1, col=1)
    shown = prompt if len(prompt) <= 90 else prompt[:87] + "..."
    fig.update_layout(title=dict(text=f"Attention, mean over heads (register first)<br><sup>{shown!r}</sup>",
                                 x=0, xanchor="left", xref="paper"),
                      height=max(300, 180 * len(maps) + 120), margin=dict(t=90, l=60, r=20, b=20))
    return fig


def qk_norm_summary(models: Mapping[str, torch.nn.Module], idx: torch.Tensor) -> dict:
    """Per model and layer, the pre-norm query and key norms of the tokens in `idx` (registers left out):
    {label: [{'q': array, 'k': array}, ...]}."""
    from ..inspect_norms import qk_norms
    out = {}
    for label, model in models.items():
        r = model.config.num_registers
        out[label] = [{name: layer[name][..., r:].flatten().cpu().numpy() for name in ("q", "k")}
                      for layer in qk_norms(model, idx)]
    return out


def qk_norm_figure(norms: Mapping[str, list], title: str = "Pre-norm query and key norms") -> go.Figure:
    """Box plots of `qk_norm_summary`'s norms: queries left, keys right, layers along x."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("query norms ||q||", "key norms ||k||"),
                        shared_yaxes=True)
    for i, (label, layers) in enumerate(norms.items()):
        for col, name in enumerate(("q", "k"), start=1):
            values = np.concatenate([layer[name] for layer in layers])
            x = np.concatenate([np.full(len(layer[name]), f"layer {j}") for j, layer in enumerate(layers)])
            fig.add_box(x=x, y=values, name=label, marker_color=variant_color(label, i), boxpoints=False,
                        legendgroup=label, showlegend=col == 1, row=1, col=col)
    fig.update_layout(title_text=title, boxmode="group", height=440, margin=dict(t=85, b=40))
    fig.update_yaxes(title_text="Euclidean norm (per head)", row=1, col=1)
    return fig


# --- recorded TinyStories runs ------------------------------------------------------------------------
def recorded_runs(root: str | Path | None) -> list[dict]:
    """Every finished run in a folder of run folders (`results/tinystories/<attention>-<pos>-seed<k>/`)
    that has summary.json and log.jsonl; the variant label and seed come from the summary."""
    if root is None or not Path(root).is_dir():
        return []
    runs = []
    for summary_path in sorted(Path(root).glob("*/summary.json")):
        run_dir = summary_path.parent
        if not (run_dir / "log.jsonl").is_file():
            continue
        summary = read_summary(run_dir)
        runs.append({"variant": run_label(summary), "seed": summary["config"]["seed"], "dir": run_dir,
                     "summary": summary, "log": read_log(run_dir)})
    return runs


def summarize_runs(runs: Iterable[dict]):
    """Per variant: number of seeds, and mean and spread (min to max) of the final validation loss,
    perplexity and tokens/s. A pandas DataFrame (one row per variant)."""
    import pandas as pd
    rows = {}
    for run in runs:
        rows.setdefault(run["variant"], []).append(run["summary"])
    table = []
    for variant, summaries in rows.items():
        row = {"variant": variant, "seeds": len(summaries),
               "completed": sum(bool(s.get("completed")) for s in summaries)}
        for key in ("val_loss", "val_perplexity", "tokens_per_s"):
            values = np.array([s[key] for s in summaries if s.get(key) is not None], dtype=float)
            if len(values):
                row[f"{key} mean"] = values.mean()
                row[f"{key} spread"] = values.max() - values.min()
        table.append(row)
    return pd.DataFrame(table).set_index("variant")


def recorded_loss_figure(runs: list[dict], title: str = "Recorded TinyStories runs") -> go.Figure:
    """Validation loss of recorded runs: the mean over seeds per variant, with a min-max band."""
    fig = go.Figure()
    by_variant: dict[str, list[dict]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run["log"])
    for i, (variant, logs) in enumerate(by_variant.items()):
        steps = sorted(set.intersection(*(set(log["val_step"].tolist()) for log in logs)))
        if not steps:
            continue
        values = np.array([[dict(zip(log["val_step"].tolist(), log["val_loss"]))[s] for s in steps] for log in logs])
        color = variant_color(variant, i)
        fig.add_scatter(x=steps + steps[::-1], y=list(values.max(0)) + list(values.min(0)[::-1]),
                        fill="toself", line=dict(width=0), fillcolor=color, opacity=0.2,
                        hoverinfo="skip", showlegend=False, legendgroup=variant)
        fig.add_scatter(x=steps, y=values.mean(0), mode="lines+markers", line=dict(color=color),
                        name=f"{variant} ({len(logs)} seeds)", legendgroup=variant)
    fig.update_layout(title_text=title, xaxis_title="step", yaxis_title="validation loss (nats)", height=420)
    return fig


# --- benchmarks ---------------------------------------------------------------------------------------
def lm_step_table(path: str | Path):
    """results/bench/lm_step.json as a DataFrame (one row per attention variant) and its environment."""
    import pandas as pd
    from urllib.request import urlopen
    text = urlopen(str(path)).read().decode() if str(path).startswith("https://") else Path(path).read_text()
    record = json.loads(text)
    table = pd.DataFrame(record["results"])
    table.insert(0, "variant", table["attention"] + "+" + table["pos"])
    table = table.drop(columns=["attention", "pos"]).set_index("variant")
    return table, record.get("environment", {}), record.get("settings", {})


def attention_ratio_table(path: str | Path, variant: str = "rbf_lite"):
    """From an attention benchmark JSON (results/bench/attention_*.json): `variant`'s forward and
    forward+backward times as ratios to SDPA (the default backend) at every measured shape."""
    import pandas as pd
    record = json.loads(Path(path).read_text())
    rows = [r for r in record["rows"] if r["variant"] == variant]
    table = pd.DataFrame(rows)[["b", "h", "n", "d", "causal", "fwd_ms", "fwd_vs_sdpa", "fwdbwd_ms", "fwdbwd_vs_sdpa"]]
    return table.sort_values(["causal", "d", "n"], ascending=[False, True, True]).reset_index(drop=True)


# --- provenance ---------------------------------------------------------------------------------------
PROVENANCE_FIELDS = ("device", "torch", "triton", "commit", "command", "time")


def provenance(record: Mapping) -> dict:
    """The environment stamp of one result file: at the top level (attention benchmarks) or under
    "environment" (training runs and the step benchmarks)."""
    env = record.get("environment") if isinstance(record.get("environment"), Mapping) else record
    return {key: env.get(key) for key in PROVENANCE_FIELDS}


def provenance_table(root: str | Path):
    """Every JSON file under `root` with its device, torch, triton, commit (short), time and command."""
    import pandas as pd
    root = Path(root)
    rows = []
    for path in sorted(root.rglob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            rows.append({"file": str(path.relative_to(root)), "command": f"unreadable: {e}"})
            continue
        stamp = provenance(record if isinstance(record, Mapping) else {})
        if not any(stamp.values()):  # e.g. a run's attention_maps.json: its summary.json holds the stamp
            continue
        row = {"file": str(path.relative_to(root)), **stamp}
        if row.get("commit"):
            row["commit"] = row["commit"][:7]
        rows.append(row)
    return pd.DataFrame(rows, columns=["file", *PROVENANCE_FIELDS]).set_index("file")


def verify_checksums(root: str | Path, sums_file: str = "SHA256SUMS"):
    """Hash every file listed in `root/SHA256SUMS` and compare: a DataFrame of path, size, match."""
    import hashlib

    import pandas as pd
    root = Path(root)
    rows = []
    for line in (root / sums_file).read_text().splitlines():
        if not line.strip():
            continue
        expected, name = line.split(maxsplit=1)
        path = root / name.lstrip("*")
        if not path.is_file():
            rows.append({"file": name.removeprefix("./"), "bytes": None, "sha256 matches": False})
            continue
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        rows.append({"file": name.removeprefix("./"), "bytes": path.stat().st_size,
                     "sha256 matches": digest.hexdigest() == expected})
    return pd.DataFrame(rows).set_index("file")
