"""The seed's two TinyStories configurations as run here: paired RBF - SDPA differences.

Runs are read from any folder tree of run folders (`results/tinystories-seed/<preset>/<arm>-seed<k>/`,
`results/tinystories-scaling/<preset>/<subset>/<arm>-seed<k>/`); what a run is (preset, arm, seed,
training-token cap, width) comes from its summary, not its path. Two runs are a pair when they
differ only in the arm: same preset, cap, width and seed, hence the same initial data order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import go, make_subplots
from ..metrics import paired_difference
from .report import results_root
from .training import read_log, read_summary, variant_color

ARMS = ("sdpa", "rbf")
PRESET_TITLES = {"seed-headline": "learned positions", "seed-susie": "RoPE vs SuSiE"}
# What the seed reported, read off its published curves (one seed each, 33k steps, full dataset).
SEED_READINGS = {
    "seed-headline": "training loss about 1.52 (SDPA) vs 1.49 (RBF) at 33k steps: RBF ahead by ~0.03",
    "seed-susie": "SDPA+RoPE and RBF+SuSiE tied",
}
LAST_TRAIN_LOGS = 5  # the training loss at the end: the mean of this many last logged steps


def seed_runs(folder: str | Path, results: str | Path | None = None) -> list[dict]:
    """Every finished run (summary.json and log.jsonl) under results/`folder`, with its preset,
    arm, seed, training-token cap and width read from the summary."""
    root = results_root(results) / folder
    runs = []
    for summary_path in sorted(root.glob("**/summary.json")):
        run_dir = summary_path.parent
        if not (run_dir / "log.jsonl").is_file():
            continue
        summary = read_summary(run_dir)
        config = summary["config"]
        runs.append({"preset": config["preset"], "arm": config["attention"], "seed": config["seed"],
                     "cap": config.get("train_tokens"), "d_model": config["d_model"],
                     "train_tokens": summary["data"]["train_tokens"], "dir": run_dir,
                     "summary": summary, "log": read_log(run_dir)})
    return runs


def _final_train_loss(run: dict) -> float:
    return float(np.mean(run["log"]["train_loss"][-LAST_TRAIN_LOGS:]))


def pairs(runs: Sequence[dict]) -> dict[tuple, list[tuple[dict, dict]]]:
    """(preset, cap, d_model) -> [(sdpa run, rbf run)] by seed, for seeds both arms finished."""
    by_key: dict[tuple, dict[int, dict[str, dict]]] = {}
    for run in runs:
        key = (run["preset"], run["cap"], run["d_model"])
        by_key.setdefault(key, {}).setdefault(run["seed"], {})[run["arm"]] = run
    return {key: [(arms["sdpa"], arms["rbf"]) for _, arms in sorted(seeds.items()) if set(ARMS) <= set(arms)]
            for key, seeds in sorted(by_key.items(), key=lambda item: (item[0][0], item[0][1] or 0, item[0][2]))}


def _interval(diff: dict) -> str:
    return f"{diff['mean']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}]"


def _arm(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.4f} ± {values.std(ddof=1):.4f}" if len(values) > 1 else f"{values.mean():.4f}"


def paired_rows(runs: Sequence[dict]) -> list[dict]:
    """One row per (preset, cap, width): seeds, tokens, each arm's final validation loss and the
    paired RBF - SDPA difference of the final validation and training losses with 95% intervals."""
    rows = []
    for (preset, cap, d_model), matched in pairs(runs).items():
        if len(matched) < 2:
            continue
        sdpa, rbf = ([run[i] for run in matched] for i in (0, 1))
        val = paired_difference([r["summary"]["val_loss"] for r in rbf], [r["summary"]["val_loss"] for r in sdpa])
        train = paired_difference([_final_train_loss(r) for r in rbf], [_final_train_loss(r) for r in sdpa])
        rows.append({"preset": preset, "cap": cap, "d_model": d_model, "seeds": len(matched),
                     "train tokens": sdpa[0]["train_tokens"], "steps": sdpa[0]["summary"]["steps_done"],
                     "SDPA val loss": _arm([r["summary"]["val_loss"] for r in sdpa]),
                     "RBF val loss": _arm([r["summary"]["val_loss"] for r in rbf]),
                     "val": val, "train": train,
                     "RBF − SDPA, val [95%]": _interval(val),
                     "RBF − SDPA, train [95%]": _interval(train)})
    return rows


def paired_table(runs: Sequence[dict], d_model: int = 256, cap=None) -> pd.DataFrame:
    """The headline comparison: per preset, at one width and data size (all the data by default),
    beside what the seed reported."""
    rows = [r for r in paired_rows(runs) if r["d_model"] == d_model and r["cap"] == cap]
    return pd.DataFrame([{"preset": r["preset"], "seeds": r["seeds"], "steps": r["steps"],
                          "SDPA val loss": r["SDPA val loss"], "RBF val loss": r["RBF val loss"],
                          "RBF − SDPA, val [95%]": r["RBF − SDPA, val [95%]"],
                          "RBF − SDPA, train [95%]": r["RBF − SDPA, train [95%]"],
                          "the seed": SEED_READINGS[r["preset"]]} for r in rows])


def scaling_table(runs: Sequence[dict], d_model: int = 256) -> pd.DataFrame:
    """Per preset and training-data size: the paired RBF - SDPA validation difference."""
    rows = [r for r in paired_rows(runs) if r["d_model"] == d_model]
    return pd.DataFrame([{"preset": r["preset"], "train tokens": r["train tokens"], "steps": r["steps"],
                          "seeds": r["seeds"], "SDPA val loss": r["SDPA val loss"],
                          "RBF − SDPA, val [95%]": r["RBF − SDPA, val [95%]"]}
                         for r in sorted(rows, key=lambda r: (r["preset"], r["train tokens"]))])


def width_table(runs: Sequence[dict]) -> pd.DataFrame:
    """Per preset and width, on all the data: the paired RBF - SDPA validation difference."""
    rows = [r for r in paired_rows(runs) if r["cap"] is None]
    return pd.DataFrame([{"preset": r["preset"], "d_model": r["d_model"], "seeds": r["seeds"],
                          "SDPA val loss": r["SDPA val loss"],
                          "RBF − SDPA, val [95%]": r["RBF − SDPA, val [95%]"]}
                         for r in sorted(rows, key=lambda r: (r["preset"], r["d_model"]))])


def paired_curve_figure(runs: Sequence[dict], d_model: int = 256, cap=None) -> go.Figure:
    """RBF - SDPA validation loss along training, one panel per preset: the paired mean and its
    95% interval at each evaluation (below zero: RBF ahead)."""
    matched = {key: m for key, m in pairs(runs).items() if key[1] == cap and key[2] == d_model and len(m) > 1}
    fig = make_subplots(rows=1, cols=len(matched), shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=[f"{key[0]}: {PRESET_TITLES[key[0]]}" for key in matched])
    for col, (key, m) in enumerate(matched.items(), start=1):
        steps = m[0][0]["log"]["val_step"]
        diffs = [paired_difference([b["log"]["val_loss"][i] for _, b in m], [a["log"]["val_loss"][i] for a, _ in m])
                 for i in range(len(steps))]
        color = variant_color(key[0], col - 1)
        fig.add_scatter(x=list(steps) + list(steps[::-1]), y=[d["high"] for d in diffs] + [d["low"] for d in diffs][::-1],
                        fill="toself", line=dict(width=0), fillcolor=color, opacity=0.25, hoverinfo="skip",
                        showlegend=False, row=1, col=col)
        fig.add_scatter(x=steps, y=[d["mean"] for d in diffs], mode="lines+markers", line=dict(color=color),
                        name=f"{key[0]} ({len(m)} seeds)", showlegend=False, row=1, col=col)
        fig.add_hline(y=0, line=dict(color="grey", dash="dot"), row=1, col=col)
        fig.update_xaxes(title_text="step", row=1, col=col)
    fig.update_yaxes(title_text="RBF − SDPA val loss (nats)", row=1, col=1)
    fig.update_layout(height=400, margin=dict(t=60, b=60),
                      title=dict(text="Paired difference along training (mean, 95% interval)", x=0.01))
    return fig


def scaling_figure(runs: Sequence[dict], d_model: int = 256) -> go.Figure:
    """The paired RBF - SDPA validation difference at the end of one pass, against the number of
    training tokens (log scale), one line per preset, 95% intervals as error bars."""
    rows = [r for r in paired_rows(runs) if r["d_model"] == d_model]
    fig = go.Figure()
    for i, preset in enumerate(sorted({r["preset"] for r in rows})):
        mine = sorted((r for r in rows if r["preset"] == preset), key=lambda r: r["train tokens"])
        fig.add_scatter(x=[r["train tokens"] for r in mine], y=[r["val"]["mean"] for r in mine],
                        error_y=dict(type="data", symmetric=False,
                                     array=[r["val"]["high"] - r["val"]["mean"] for r in mine],
                                     arrayminus=[r["val"]["mean"] - r["val"]["low"] for r in mine]),
                        mode="lines+markers", name=preset, line=dict(color=variant_color(preset, i)))
    fig.add_hline(y=0, line=dict(color="grey", dash="dot"))
    fig.update_xaxes(type="log", title_text="training tokens (one pass)")
    fig.update_yaxes(title_text="RBF − SDPA val loss (nats)")
    fig.update_layout(height=380, margin=dict(t=60, b=40),
                      title=dict(text="Does the gap move with data?", x=0.01),
                      legend=dict(orientation="h", y=-0.25))
    return fig


def norm_runs(runs: Sequence[dict], preset: str, d_model: int = 256, cap=None) -> list[dict]:
    """The runs of one preset on all the data, in the shape report.qk_norm_trajectories reads
    (a 'variant' per arm)."""
    return [{**run, "variant": f"{run['arm']}+{run['summary']['config']['pos']}"}
            for run in runs if run["preset"] == preset and run["d_model"] == d_model and run["cap"] == cap]
