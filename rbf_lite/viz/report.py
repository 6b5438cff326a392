"""The GPU results in the book: every table and figure built from the committed runs in `results/`.

    python -m rbf_lite.viz.report --out report/

writes each table (Markdown) and each figure (standalone HTML) to `report/`; the chapters call the
same functions, so the page and the files always agree. Nothing here trains or times anything: it
reads `summary.json`, `log.jsonl`, `attention_maps.json` and `latents.npz` as the trainers wrote them
(`rbf_lite.lm`, `rbf_lite.cifar`), and the benchmark JSON files under `results/bench/`.
Spreads are sample standard deviations over seeds.
"""
from __future__ import annotations

import argparse
import ast
import json
import shlex
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from plotly.colors import qualitative

from . import REPOSITORY, go, make_subplots, number, results_dir
from .. import metrics
from ..runs import read_jsonl
from .halo import ABSTAIN, HEAD_NAMES, SCORE_NAMES, SEED_CLAIMS, reliability_figure
from .training import attention_map_grid, lm_step_table, recorded_loss_figure, recorded_runs, variant_color

VARIANT_ORDER = ("sdpa+rope", "sdpa_qknorm+rope", "rbf+susie", "rbf+rope")
MAIN_SCORE = {"cce": "msp", "cce_ls": "msp", "halo": "not_abstain", "halo_rbf_lite": "not_abstain"}  # each head's own OOD score
TINYSTORIES, SWEEP = "tinystories", "cifar10-sweep"
# Loaders that read a results folder fixed inside them, so that a chapter's call names no folder;
# `chapters_loading` credits each call of one of them with its folder.
FIXED_FOLDER_LOADERS = {"tinystories_runs": TINYSTORIES, "sweep_table": SWEEP}


def results_root(results: str | Path | None = None) -> Path:
    """The results folder: `results` if given, else the checkout's, else a downloaded copy."""
    if results is not None:
        if not Path(results).is_dir():
            raise FileNotFoundError(f"{results} is not a folder of results")
        return Path(results)
    return results_dir() or fetch_results()


def fetch_results(cache: str | Path = Path.home() / ".cache" / "rbf_lite") -> Path:
    """Where only the package is installed (Colab): the repository's `results/`, downloaded once
    from its main branch into `cache`."""
    import io
    import tarfile
    from urllib.request import urlopen
    target = Path(cache) / "results"
    if not target.is_dir():
        archive = f"{REPOSITORY}/archive/refs/heads/main.tar.gz"
        try:
            data = urlopen(archive).read()
        except OSError as error:
            raise FileNotFoundError(f"no results/ folder beside the package or the book, and {archive} "
                                    f"could not be read ({error}); clone the repository") from error
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and "/results/" in m.name]
            for m in members:
                m.name = m.name.split("/results/", 1)[1]
            tar.extractall(target, members=members, filter="data")
    return target


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count, ignoring None."""
    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def pm(values: Iterable[float], digits: int = 3, percent: bool = False) -> str:
    """'mean ± std' as text, in percent if asked."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "-"
    scale, unit = (100, "%") if percent else (1, "")
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}{unit}"


# --- TinyStories ------------------------------------------------------------------------------------------------------------
def tinystories_runs(results: str | Path | None = None) -> list[dict]:
    """The recorded runs of results/tinystories/, in VARIANT_ORDER then seed."""
    runs = recorded_runs(results_root(results) / TINYSTORIES)
    rank = {v: i for i, v in enumerate(VARIANT_ORDER)}
    return sorted(runs, key=lambda r: (rank.get(r["variant"], len(rank)), r["seed"]))


def _grouped(items: Iterable, key) -> dict[str, list]:
    """Items by key(item), in order of first appearance."""
    grouped: dict[str, list] = {}
    for item in items:
        grouped.setdefault(key(item), []).append(item)
    return grouped


def _by_variant(runs: Sequence[dict]) -> dict[str, list[dict]]:
    return _grouped(runs, lambda run: run["variant"])


def head_of(summary: dict) -> str:
    """A CIFAR run's head (`rbf_lite.cifar.Config.head`). Summaries written before the published
    HALO became the default have no "head": their HALO is the rbf_lite derivation."""
    if "head" in summary:
        return summary["head"]
    config = summary["config"]
    if config["loss"] == "cce":
        return "cce_ls" if config.get("label_smoothing", 0) > 0 else "cce"
    return "halo" if config.get("halo_variant") == "published" else "halo_rbf_lite"


def _by_head(summaries: Sequence[dict]) -> dict[str, list[dict]]:
    return _grouped(summaries, head_of)


def tinystories_table(runs: Sequence[dict]) -> pd.DataFrame:
    """Per variant: seeds, the lowest validation loss (mean ± std) and where it fell, the final
    validation and training losses, how far validation rose after its best (overfitting), tokens/s."""
    rows = []
    for variant, group in _by_variant(runs).items():
        s = [r["summary"] for r in group]
        best_steps = [x["best_val_step"] for x in s]
        rise = [x["val_loss"] - x["best_val_loss"] for x in s]
        rows.append({"variant": variant, "seeds": len(s),
                     "best val loss": pm(x["best_val_loss"] for x in s),
                     "best at step": f"{min(best_steps)}-{max(best_steps)}",
                     "final val loss": pm(x["val_loss"] for x in s),
                     "final train loss": pm(x["train_loss"] for x in s),
                     "val rise after best": pm(rise),
                     "tokens/s": f"{mean_std(x['tokens_per_s'] for x in s)[0]:,.0f}",
                     "parameters": f"{s[0]['parameters']:,}"})
    return pd.DataFrame(rows).set_index("variant")


def mean_final_qk_norms(group: Sequence[dict]) -> dict[str, np.ndarray]:
    """Mean over seeds of the last evaluation's per-layer pre-norm ||q|| and ||k||."""
    last = [run["log"]["qk_norms"][-1] for run in group]
    return {name: np.mean([[layer[name] for layer in layers] for layers in last], axis=0) for name in ("q", "k")}


def qk_norm_table(runs: Sequence[dict]) -> pd.DataFrame:
    """Per variant and layer: the mean pre-norm ||q|| and ||k|| at the end of training, and at the
    first evaluation (the norms the model starts from)."""
    rows = []
    for variant, group in _by_variant(runs).items():
        first = [run["log"]["qk_norms"][0] for run in group]
        final = mean_final_qk_norms(group)
        for layer in range(len(final["q"])):
            rows.append({"variant": variant, "layer": layer,
                         "||k|| first eval": np.mean([f[layer]["k"] for f in first]),
                         "||q|| final": final["q"][layer], "||k|| final": final["k"][layer]})
    return pd.DataFrame(rows).set_index(["variant", "layer"]).round(2)


def qk_norm_trajectories(runs: Sequence[dict]) -> go.Figure:
    """Mean pre-norm query (top) and key (bottom) norms against the step, one column per layer,
    one line per variant (mean over seeds, with its min-max band)."""
    grouped = _by_variant(runs)
    n_layers = len(runs[0]["log"]["qk_norms"][0])
    fig = make_subplots(rows=2, cols=n_layers, shared_xaxes=True, shared_yaxes=True,
                        subplot_titles=[f"layer {j}" for j in range(n_layers)],
                        horizontal_spacing=0.03, vertical_spacing=0.08)
    for i, (variant, group) in enumerate(grouped.items()):
        steps = group[0]["log"]["qk_step"]
        color = variant_color(variant, i)
        for row, name in enumerate(("q", "k"), start=1):
            for layer in range(n_layers):
                values = np.array([[norms[layer][name] for norms in run["log"]["qk_norms"]] for run in group])
                fig.add_scatter(x=steps + steps[::-1], y=list(values.max(0)) + list(values.min(0)[::-1]),
                                fill="toself", line=dict(width=0), fillcolor=color, opacity=0.2,
                                hoverinfo="skip", showlegend=False, row=row, col=layer + 1)
                fig.add_scatter(x=steps, y=values.mean(0), mode="lines", line=dict(color=color),
                                name=variant, legendgroup=variant, showlegend=row == 1 and layer == 0,
                                row=row, col=layer + 1)
    fig.update_yaxes(title_text="mean ||q||", row=1, col=1)
    fig.update_yaxes(title_text="mean ||k||", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2)
    fig.update_layout(title_text="Pre-norm query and key norms during training (TinyStories, mean over seeds)",
                      height=520, margin=dict(t=70, b=40), legend=dict(orientation="h", y=-0.15))
    return fig


def recorded_attention_maps(runs: Sequence[dict], seed: int = 0) -> go.Figure:
    """Each variant's head-averaged attention on the fixed prompt, from its attention_maps.json."""
    maps, prompt = {}, ""
    for run in runs:
        if run["seed"] == seed:
            saved = json.loads((Path(run["dir"]) / "attention_maps.json").read_text())
            maps[run["variant"]], prompt = (saved["slots"], saved["layers"]), saved["prompt"]
    return attention_map_grid(maps, prompt)


def samples(runs: Sequence[dict], seed: int = 0) -> dict[str, str]:
    """The greedy continuation of the sample prompt that each variant's summary holds."""
    return {run["variant"]: run["summary"]["sample"] for run in runs if run["seed"] == seed}


def tinystories_comparison(runs: Sequence[dict]) -> pd.DataFrame:
    """The seed's two TinyStories claims beside what our runs measured (numbers computed here)."""
    grouped = _by_variant(runs)
    best = {v: mean_std(run["summary"]["best_val_loss"] for run in g) for v, g in grouped.items()}
    ranking = " < ".join(f"{v} {best[v][0]:.3f}" for v in sorted(best, key=lambda v: best[v][0]))
    finals = {v: mean_final_qk_norms(g) for v, g in grouped.items()}
    keys = ", ".join(f"{v} {finals[v]['k'].mean():.1f}" for v in sorted(finals, key=lambda v: finals[v]["k"].mean()))
    queries = ", ".join(f"{v} {finals[v]['q'].mean():.1f}" for v in sorted(finals, key=lambda v: finals[v]["q"].mean()))
    return pd.DataFrame([
        {"claim": "validation loss", "seed (full TinyStories, one epoch)": "RBF + SuSiE below SDPA from early on",
         "ours (2 MiB sample, 600 steps, 3 seeds)": f"lowest validation loss, mean over seeds: {ranking}"},
        {"claim": "pre-norm q/k magnitudes", "seed (full TinyStories, one epoch)":
             "RBF keeps them from exploding; QK-norm is not needed",
         "ours (2 MiB sample, 600 steps, 3 seeds)": f"final mean ||k|| over layers: {keys}; ||q||: {queries}"},
    ]).set_index("claim")


# --- CIFAR-10 ---------------------------------------------------------------------------------------------------------------
def cifar_summaries(experiment: str, results: str | Path | None = None) -> list[dict]:
    """The run summaries of results/<experiment>/ (cifar10, cifar10-openset, ...), sorted by run
    folder, each with its folder's name under "run"."""
    summaries = []
    for path in sorted((results_root(results) / experiment).glob("*/summary.json")):
        summaries.append({**json.loads(path.read_text()), "run": path.parent.name})
    return summaries


def cifar_table(summaries: Sequence[dict]) -> pd.DataFrame:
    """Per head: seeds, epochs, accuracy, NLL, ECE, abstain rate, and per OOD set the AUROC and
    FPR@95 of the head's own score (MSP for the linear head, 1 - p(abstain) for HALO)."""
    rows = []
    for loss, group in _by_head(summaries).items():
        row = {"head": HEAD_NAMES.get(loss, loss), "seeds": len(group), "epochs": group[0]["epochs"],
               "accuracy": pm((s["accuracy"] for s in group), 2, True), "NLL": pm(s["nll"] for s in group),
               "ECE": pm((s["ece"] for s in group), 4)}
        if "ece_temperature" in group[0]:
            row.update({"ECE, known classes": pm((s["ece_known"] for s in group), 4),
                        "ECE after temperature": pm((s["ece_temperature"] for s in group), 4),
                        "temperature": pm(s["temperature"] for s in group)})
        row["abstain rate"] = pm((s.get("abstain_rate") for s in group), 2, True)
        for name in group[0]["ood"]:
            score = MAIN_SCORE[loss]
            row[f"{name} AUROC"] = pm((s["ood"][name][score]["auroc"] for s in group), 2, True)
            row[f"{name} FPR@95"] = pm((s["ood"][name][score]["fpr95"] for s in group), 2, True)
        rows.append(row)
    return pd.DataFrame(rows).set_index("head")


def detection_table(summaries: Sequence[dict]) -> pd.DataFrame:
    """Every OOD set and every score of every head: AUROC, FPR@95 and AUPR, mean ± std over seeds."""
    rows = []
    for loss, group in _by_head(summaries).items():
        for name, scores in group[0]["ood"].items():
            for score in scores:
                rows.append({"head": HEAD_NAMES.get(loss, loss), "OOD set": name,
                             "score": SCORE_NAMES.get(score, score),
                             **{label: pm((s["ood"][name][score][key] for s in group), 1, True)
                                for label, key in (("AUROC", "auroc"), ("FPR@95", "fpr95"), ("AUPR", "aupr"))}})
    return pd.DataFrame(rows).set_index(["head", "OOD set", "score"])


def cifar_comparison(cifar10: Sequence[dict], openset: Sequence[dict], linear: str = "cce",
                     halo: str = "halo") -> pd.DataFrame:
    """The seed's CIFAR-10 numbers beside ours, for the heads `linear` and `halo`. SVHN and CIFAR-100
    are not available offline: far-OOD stands in with Fashion-MNIST, near-OOD with the held-out
    classes of the open-set split."""
    ours, near = _by_head(cifar10), _by_head(openset)
    held_out = next(iter(openset[0]["ood"])) if openset else None

    def ood(groups, loss, name, key):
        if loss not in groups or name is None:
            return "-"
        return pm((s["ood"][name][MAIN_SCORE[loss]][key] for s in groups[loss]), 2, True)

    measured = {
        "accuracy": lambda loss: pm((s["accuracy"] for s in ours.get(loss, [])), 2, True),
        "ECE": lambda loss: pm((s["ece"] for s in ours.get(loss, [])), 4),
        "SVHN AUROC": lambda loss: ood(ours, loss, "fashion-mnist", "auroc"),
        "SVHN FPR@95": lambda loss: ood(ours, loss, "fashion-mnist", "fpr95"),
        "CIFAR-100 AUROC": lambda loss: ood(near, loss, held_out, "auroc"),
        "CIFAR-100 FPR@95": lambda loss: ood(near, loss, held_out, "fpr95"),
    }
    ours_set = {"accuracy": "CIFAR-10 test (JPEG)", "ECE": "CIFAR-10 test (JPEG)",
                "SVHN AUROC": "Fashion-MNIST", "SVHN FPR@95": "Fashion-MNIST",
                "CIFAR-100 AUROC": f"{held_out} (open-set)", "CIFAR-100 FPR@95": f"{held_out} (open-set)"}
    rows = [{"metric": metric, "seed: cross-entropy": seed_ce, "seed: HALO": seed_halo,
             "ours: cross-entropy": measured[metric](linear), "ours: HALO": measured[metric](halo),
             "our set": ours_set[metric]} for metric, seed_ce, seed_halo in SEED_CLAIMS]
    return pd.DataFrame(rows).set_index("metric")


def seed_regime_comparison(runs: Sequence[dict], heads: Sequence[str] = ("cce", "cce_ls", "halo")) -> pd.DataFrame:
    """Every head of the long runs, mean ± std over seeds, beside the seed's numbers (its
    cross-entropy baseline used label smoothing). Rows the seed reports on sets we do not have
    (SVHN) are compared on our far-OOD stand-in, Fashion-MNIST; the seed has no number for the
    other rows."""
    groups = _by_head(runs)
    seed = {metric: (ce, halo) for metric, ce, halo in SEED_CLAIMS}

    def ood(name, key):
        return lambda group, head: pm((s["ood"][name][MAIN_SCORE[head]][key] for s in group), 2, True)

    rows = [("accuracy", "accuracy", lambda g, h: pm((s["accuracy"] for s in g), 2, True)),
            ("NLL", None, lambda g, h: pm(s["nll"] for s in g)),
            ("ECE", "ECE", lambda g, h: pm((s["ece"] for s in g), 4)),
            ("ECE, known classes", None, lambda g, h: pm((s["ece_known"] for s in g), 4)),
            ("ECE after temperature", None, lambda g, h: pm((s["ece_temperature"] for s in g), 4)),
            ("temperature", None, lambda g, h: pm(s["temperature"] for s in g)),
            ("far-OOD AUROC", "SVHN AUROC", ood("fashion-mnist", "auroc")),
            ("far-OOD FPR@95", "SVHN FPR@95", ood("fashion-mnist", "fpr95")),
            ("MNIST AUROC", None, ood("mnist", "auroc")),
            ("uniform noise AUROC", None, ood("uniform-noise", "auroc")),
            ("Gaussian noise AUROC", None, ood("gaussian-noise", "auroc"))]
    table = []
    for label, seed_key, measure in rows:
        ce, halo = seed.get(seed_key, ("-", "-"))
        row = {"metric": label, "seed: CE + smoothing": ce, "seed: HALO": halo}
        row.update({HEAD_NAMES[h]: measure(groups[h], h) if h in groups else "-" for h in heads})
        table.append(row)
    return pd.DataFrame(table).set_index("metric")


def recipe_table(runs: Sequence[dict]) -> pd.DataFrame:
    """The recipe search: one cross-entropy run per setting, the settings that varied and what each
    measured, from no cutout to cutout and then by batch, learning rate and weight decay. Every run
    of the search shares its epochs and training images (checked)."""
    for key, value in (("epochs", lambda s: s["config"]["epochs"]),
                       ("training images", lambda s: s["dataset"]["train_images"])):
        if len({value(s) for s in runs}) > 1:
            raise ValueError(f"the recipe runs differ in {key}; this table assumes one value")
    rows = [{"batch": s["config"]["batch_size"], "peak lr": s["config"]["lr"],
             "weight decay": s["config"]["weight_decay"], "cutout": s["config"].get("cutout", 0),
             "accuracy": s["accuracy"], "ECE": s["ece"], "ECE after T": s["ece_temperature"]} for s in runs]
    frame = pd.DataFrame(rows)
    order = frame.assign(minus_batch=-frame["batch"]).sort_values(["cutout", "minus_batch", "peak lr", "weight decay"]).index
    return frame.loc[order].reset_index(drop=True)


def pooled_reliability(group: Sequence[dict]) -> dict[str, np.ndarray]:
    """The reliability bins of several runs pooled: counts added, confidences and accuracies
    averaged with the counts as weights."""
    counts = np.array([s["reliability"]["count"] for s in group], dtype=float)
    total = counts.sum(0)
    safe = np.maximum(total, 1)
    pooled = {k: (counts * np.array([s["reliability"][k] for s in group])).sum(0) / safe
              for k in ("confidence", "accuracy")}
    return {**pooled, "count": total.astype(int), "edges": np.array(group[0]["reliability"]["edges"])}


def recorded_reliability(summaries: Sequence[dict]) -> go.Figure:
    """Reliability diagrams of the recorded runs, each head's seeds pooled."""
    panels = []
    for loss, group in _by_head(summaries).items():
        panels.append((HEAD_NAMES.get(loss, loss), pooled_reliability(group),
                       f"ECE {pm((s['ece'] for s in group), 4)}"))
    return reliability_figure(panels)


def latent_figure(run_dir: str | Path, classes: Sequence[str], ood_sets: Sequence[str] = ("fashion-mnist",),
                  title: str = "") -> go.Figure:
    """Test embeddings of one run projected on their first two principal components, coloured by
    class, with OOD embeddings (grey) and HALO's centroids (stars) projected on the same axes."""
    latents = np.load(Path(run_dir) / "latents.npz")
    test = latents["test"].astype(np.float64)
    mean, axes, variance = metrics.pca_basis(test, 2)

    def project(x):
        return (np.asarray(x, dtype=np.float64) - mean) @ axes.T
    fig = go.Figure()
    points, labels = project(test), latents["test_labels"]
    colors = qualitative.T10  # ten distinct colours, one per CIFAR-10 class
    for k, name in enumerate(classes):
        chosen = labels == k
        fig.add_scattergl(x=points[chosen, 0], y=points[chosen, 1], mode="markers", name=name,
                          marker=dict(size=3, color=colors[k % len(colors)], opacity=0.6))
    for name in ood_sets:
        if f"ood_{name}" in latents:
            p = project(latents[f"ood_{name}"])
            fig.add_scattergl(x=p[:, 0], y=p[:, 1], mode="markers", name=f"OOD: {name}",
                              marker=dict(size=3, color=ABSTAIN, opacity=0.35))
    if "centroids" in latents:
        c = project(latents["centroids"])
        fig.add_scatter(x=c[:, 0], y=c[:, 1], mode="markers", name="centroids",
                        marker=dict(symbol="star", size=14, color="black"))
        origin = project(np.zeros((1, test.shape[1])))
        fig.add_scatter(x=origin[:, 0], y=origin[:, 1], mode="markers", name="origin (abstain)",
                        marker=dict(symbol="x", size=12, color="black"))
    fig.update_layout(title_text=title or f"PCA of the test embeddings ({variance[0]:.0%} + {variance[1]:.0%} of the variance)",
                      xaxis_title="PC 1", yaxis_title="PC 2", height=460)
    fig.update_yaxes(scaleanchor="x")
    return fig


def embedding_geometry(run_dir: str | Path, classes: Sequence[str]) -> pd.DataFrame:
    """Where each set's embeddings lie (from latents.npz): median norm; for the test set the mean
    within-class spread relative to the class mean's length; with centroids (HALO), the median r^2 =
    ||x - c||^2 / D to the nearest centroid and which centroid is nearest most often."""
    latents = np.load(Path(run_dir) / "latents.npz")
    sets = {"test": latents["test"]} | {k[4:]: latents[k] for k in latents.files if k.startswith("ood_")}
    rows = []
    for name, x in sets.items():
        x = x.astype(np.float64)
        row = {"set": name, "median ‖x‖": np.median(np.linalg.norm(x, axis=1))}
        if name == "test":
            labels = latents["test_labels"]
            row["spread / class-mean length"] = np.mean([
                np.linalg.norm(x[labels == k] - x[labels == k].mean(0), axis=1).mean()
                / np.linalg.norm(x[labels == k].mean(0)) for k in np.unique(labels)])
        if "centroids" in latents.files:
            r2 = ((x[:, None] - latents["centroids"][None]) ** 2).sum(-1) / x.shape[1]
            nearest = np.bincount(r2.argmin(1), minlength=len(classes))
            row["median r² to nearest centroid"] = np.median(r2.min(1))
            row["nearest centroid, most often"] = f"{classes[nearest.argmax()]} ({nearest.max() / len(x):.0%})"
        rows.append(row)
    return pd.DataFrame(rows).set_index("set")


# --- provenance: the commands behind the results, and the chapters that read them -----------------------------------------
def relative_command(command: str, file: str) -> str:
    """A result's recorded command as it runs from the repository root: its `--out` (an output folder
    of the GPU machine) becomes where the result is committed, `results/<file>` or the run folder
    holding it, and its `--data` folder (the GPU machine's copy of the data) becomes $RBF_LITE_DATA."""
    args = shlex.split(command)
    for i in range(len(args) - 1):
        if args[i] == "--out":
            committed = Path("results") / file
            args[i + 1] = str(committed if Path(args[i + 1]).name == committed.name else committed.parent)
        elif args[i] == "--data":
            parts = Path(args[i + 1]).parts
            if "data" in parts:
                args[i + 1] = "/".join(("$RBF_LITE_DATA", *parts[parts.index("data") + 1:]))
    return " ".join(map(_shell_word, args))


# Options a CIFAR summary written before they existed ran without: its command needs them today.
CIFAR_LEGACY_OPTIONS = {"halo_variant": ("--halo-variant", "rbf_lite"), "holdout": ("--holdout", "0")}


def cifar_command(summary: dict, file: str) -> str:
    """A CIFAR run's `relative_command` without `--resume` (the summary of a resumed run records the
    last process's command), plus the options whose defaults changed after it ran (its config lacks
    them): the rbf_lite HALO and no held-out split."""
    command = relative_command(" ".join(shlex.quote(a) for a in shlex.split(summary["command"])
                                        if a != "--resume"), file)
    config = summary["config"]
    for key, (flag, value) in CIFAR_LEGACY_OPTIONS.items():
        if key not in config and not (key == "halo_variant" and config["loss"] != "halo"):
            command += f" {flag} {value}"
    return command


def first_of_each_head(summaries: Sequence[dict]) -> list[dict]:
    """The first run of each head, in order of appearance."""
    return [group[0] for group in _by_head(summaries).values()]


def _shell_word(arg: str) -> str:
    """`arg` quoted for the shell where needed, except $RBF_LITE_DATA, which the shell should expand."""
    return arg if arg.startswith("$RBF_LITE_DATA") else shlex.quote(arg)


def shell_lines(command: str, width: int = 72) -> str:
    """A shell command broken into lines of at most `width` characters (where one word allows),
    continued with a backslash, so that it prints within the page's column: an option stays beside
    its value unless the pair alone would be too long."""
    args = shlex.split(command)
    words, i = [], 0
    while i < len(args):
        takes_value = args[i].startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--")
        pair = " ".join(map(_shell_word, args[i:i + 1 + takes_value]))
        words += [pair] if len(pair) + 6 <= width else list(map(_shell_word, args[i:i + 1 + takes_value]))
        i += 1 + takes_value
    lines = [words[0]]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) + 2 > width:
            lines.append("    " + word)
        else:
            lines[-1] += " " + word
    return " \\\n".join(lines)


def _path_references(source: str) -> set[str]:
    """Results named by one chapter's code: each string constant, each path joined with `/` from
    constants (results / "bench" / "x.json" names "bench/x.json"), and the folder of each call of a
    FIXED_FOLDER_LOADERS function. f-strings are not resolved (their file names appear elsewhere)."""
    from IPython.core.inputtransformer2 import TransformerManager
    tree = ast.parse(TransformerManager().transform_cell(source))
    in_fstring = {id(c) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for c in ast.walk(node)}
    inner = {id(node.left) for node in ast.walk(tree)
             if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.left, ast.BinOp)}
    joined, references = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and id(node) not in inner:
            operands, chain = [], node
            while isinstance(chain, ast.BinOp) and isinstance(chain.op, ast.Div):
                operands.insert(0, chain.right)
                chain = chain.left
            run = []
            for operand in [chain, *operands, None]:
                if isinstance(operand, ast.Constant) and isinstance(operand.value, str):
                    run.append(operand.value)
                    joined.add(id(operand))
                elif run:
                    references.add("/".join(run))
                    run = []
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            if name in FIXED_FOLDER_LOADERS:
                references.add(FIXED_FOLDER_LOADERS[name])
    references |= {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                   and isinstance(node.value, str) and id(node) not in joined | in_fstring}
    return references


def _loads(reference: str, file: str, unique_names: dict[str, str]) -> bool:
    """Whether a path named in a chapter's code reads the result `file` (relative to results/): the
    file itself, a folder above it (whole path components: "cifar10" is not "cifar10-openset"), or
    a bare file name that no other result shares."""
    reference = reference.strip().removeprefix("./").removeprefix("results/").strip("/")
    if not reference:
        return False
    return reference == file or file.startswith(reference + "/") or unique_names.get(reference) == file


def chapters_loading(files: Iterable[str], book_dir: str | Path) -> dict[str, list[str]]:
    """For each result file (a path relative to results/), the chapters whose executed code reads it:
    the code cells of book/*.ipynb, those tagged skip-execution left out (the site does not run
    them, and their commands write results rather than read them)."""
    files = list(files)
    names = _grouped(files, lambda f: Path(f).name)
    unique_names = {name: group[0] for name, group in names.items() if len(group) == 1}
    found = {file: [] for file in files}
    notebooks = sorted(Path(book_dir).glob("*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no chapters (*.ipynb) in {book_dir}")
    for notebook in notebooks:
        cells = json.loads(notebook.read_text())["cells"]
        references = set()
        for cell in cells:
            if cell["cell_type"] == "code" and "skip-execution" not in cell.get("metadata", {}).get("tags", []):
                references |= _path_references("".join(cell["source"]))
        for file in files:
            if any(_loads(reference, file, unique_names) for reference in references):
                found[file].append(notebook.stem)
    return found


# --- the kernel: the targets beside the measurements ------------------------------------------------------------------
KERNEL_TARGETS = [  # (what, where, target ratio to SDPA): the parity targets the kernel work set itself
    ("forward", "N >= 4096", 1.10), ("forward + backward", "N >= 4096", 1.20),
    ("forward", "N = 1024", 1.30), ("forward + backward", "N = 1024", 1.30),
    ("forward + backward", "training shape B64 H4 N256 D64", 1.50),
    ("decode step", "batch 1-64, cache 1k-32k", 1.20),
]


def kernel_targets(attention_rows: pd.DataFrame, decode: dict, dtype: str = "bf16") -> pd.DataFrame:
    """Each parity target beside the measured range of rbf_lite's time / SDPA's time (both
    causalities), by do_bench and, where the benchmark recorded them, by calls back to back (host time
    included) and, for decoding, by replays of a CUDA graph (GPU work only); a target is met when
    every measurement of every kind meets it."""
    mine = attention_rows[(attention_rows.variant == "rbf_lite") & (attention_rows.dtype == dtype)]
    selections = {"N >= 4096": mine.n >= 4096, "N = 1024": mine.n == 1024,
                  "training shape B64 H4 N256 D64": (mine.b == 64) & (mine.h == 4) & (mine.n == 256)}

    def span(values):
        return f"{values.min():.2f} - {values.max():.2f}" if len(values) else "-"

    rows = []
    for what, where, target in KERNEL_TARGETS:
        loop, graph = np.array([]), np.array([])
        if what == "decode step":
            steps = [r for r in decode["rows"] if r["variant"] == "rbf_decode"]
            values = np.array([r["vs_sdpa"] for r in steps])
            loop = np.array([r["loop_vs_sdpa"] for r in steps if "loop_vs_sdpa" in r])
            graph = np.array([r["graph_vs_sdpa"] for r in steps if "graph_vs_sdpa" in r])
        else:
            column = "fwd_vs_sdpa" if what == "forward" else "fwdbwd_vs_sdpa"
            values = mine[selections[where]][column].to_numpy()
            loop_column = column.replace("_vs_sdpa", "_loop_vs_sdpa")
            if loop_column in mine:
                loop = mine[selections[where]][loop_column].dropna().to_numpy()
        every = np.concatenate([values, loop, graph])
        rows.append({"measure": what, "where": where, "target (x SDPA)": f"<= {target:.2f}",
                     "measured (x SDPA)": span(values), "back to back (x SDPA)": span(loop),
                     "CUDA graph (x SDPA)": span(graph), "met": bool(len(values)) and bool((every <= target).all())})
    return pd.DataFrame(rows).set_index(["measure", "where"])


def sweep_table(results: str | Path | None = None) -> pd.DataFrame:
    """The HALO-collapse sweep (results/cifar10-sweep/): one column per run, its settings and then
    its test accuracy after every epoch (as text), so that all epochs fit the page's width."""
    root = results_root(results) / SWEEP
    columns = {}
    for s in cifar_summaries(SWEEP, results):
        log = read_jsonl(root / s["run"] / "log.jsonl")
        accuracy = [r["test_accuracy"] for r in log if "test_accuracy" in r]
        gamma = s.get("gamma")
        columns[s["run"]] = {"head lr (x backbone)": number(s["config"].get("head_lr", 1.0)),
                             "learns γ": "yes" if s["config"]["learn_gamma"] else "no",
                             "final γ": "–" if gamma is None else f"{gamma:.3g}",
                             **{f"epoch {i + 1}": f"{a:.1%}" for i, a in enumerate(accuracy)}}
    return pd.DataFrame(columns).rename_axis("run")


def markdown(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (index first), numbers as `rbf_lite.viz.number` writes them."""
    frame = frame.reset_index()
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(number(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# --- everything at once -----------------------------------------------------------------------------------------------------
def write_all(results: str | Path | None, out: str | Path) -> list[Path]:
    """Regenerate every table (Markdown) and figure (HTML) of the results chapters into `out`."""
    from .bench import combined_rows, head_to_head, load_bench, memory_table, ratio_figure, ratio_table
    root, out = results_root(results), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def table(name, frame):
        (out / f"{name}.md").write_text(markdown(frame))
        written.append(out / f"{name}.md")

    def figure(name, fig):
        fig.write_html(out / f"{name}.html", include_plotlyjs="cdn")
        written.append(out / f"{name}.html")

    runs = tinystories_runs(root)
    if runs:
        table("tinystories_table", tinystories_table(runs))
        table("tinystories_comparison", tinystories_comparison(runs))
        table("tinystories_qk_norms", qk_norm_table(runs))
        figure("tinystories_val_loss", recorded_loss_figure(runs))
        figure("tinystories_qk_norms", qk_norm_trajectories(runs))
        figure("tinystories_attention", recorded_attention_maps(runs))
        (out / "tinystories_samples.md").write_text(
            "".join(f"**{v}**: {text}\n\n" for v, text in samples(runs).items()))
        written.append(out / "tinystories_samples.md")
    from . import seed_tinystories as seed
    seed_main = seed.seed_runs("tinystories-seed", root)
    if seed_main:
        seed_all = seed_main + seed.seed_runs("tinystories-scaling", root)
        table("tinystories_seed_paired", seed.paired_table(seed_main))
        table("tinystories_seed_scaling", seed.scaling_table(seed_all))
        table("tinystories_seed_width", seed.width_table(seed_all))
        figure("tinystories_seed_paired_curve", seed.paired_curve_figure(seed_main))
        figure("tinystories_seed_scaling", seed.scaling_figure(seed_all))
        for preset in seed.PRESET_TITLES:
            figure(f"tinystories_{preset}_qk_norms", qk_norm_trajectories(seed.norm_runs(seed_main, preset)))
    cifar10, openset = cifar_summaries("cifar10", root), cifar_summaries("cifar10-openset", root)
    if cifar10:
        table("cifar10_table", cifar_table(cifar10))
        table("cifar10_detection", detection_table(cifar10))
        table("cifar10_comparison", cifar_comparison(cifar10, openset, halo="halo_rbf_lite"))
        figure("cifar10_reliability", recorded_reliability(cifar10))
        for s in cifar10:
            if s["config"]["seed"] == 0:
                figure(f"cifar10_latents_{head_of(s)}",
                       latent_figure(root / "cifar10" / s["run"], s["dataset"]["classes"]))
    long_runs = cifar_summaries("cifar10-long", root)
    if long_runs:
        table("cifar10_long_comparison", seed_regime_comparison(long_runs))
        table("cifar10_long_detection", detection_table(long_runs))
        figure("cifar10_long_reliability", recorded_reliability(long_runs))
    recipe = cifar_summaries("cifar10-recipe", root)
    if recipe:
        table("cifar10_recipe", recipe_table(recipe))
    if openset:
        table("cifar10_openset_table", cifar_table(openset))
        table("cifar10_openset_detection", detection_table(openset))
    if (root / SWEEP).is_dir():
        table("cifar10_sweep", sweep_table(root))
    bench = root / "bench"
    bench_files = sorted(bench.glob("attention_*.json"))
    if bench_files:
        rows = combined_rows(*[load_bench(p) for p in bench_files])
        for causal in (True, False):
            tag = "causal" if causal else "noncausal"
            for metric in ("fwd", "fwdbwd"):
                table(f"kernel_ratios_{metric}_{tag}", ratio_table(rows, metric, causal=causal))
            figure(f"kernel_ratios_{tag}", ratio_figure(rows, causal=causal))
        table("kernel_memory", memory_table(rows))
        table("kernel_head_to_head", head_to_head(rows))
        if (bench / "decode_bf16.json").is_file():
            decode = json.loads((bench / "decode_bf16.json").read_text())
            table("kernel_targets", kernel_targets(rows, decode))
            table("kernel_decode", pd.DataFrame(decode["rows"]).pivot_table(
                index=["b", "cache"], columns="variant", values="ms"))
    for name in ("lm_step.json", "lm_step_bpe4096.json"):
        if (bench / name).is_file():
            table(name.replace(".json", ""), lm_step_table(bench / name)[0])
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rbf_lite.viz.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=None, help="the results folder (default: the checkout's results/)")
    parser.add_argument("--out", default="report", help="folder for the tables (.md) and figures (.html)")
    args = parser.parse_args(argv)
    for path in write_all(args.results, args.out):
        print(path)


if __name__ == "__main__":
    main()
