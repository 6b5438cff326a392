"""The results chapters' tables and figures, built from the committed results/ folder."""
import dataclasses
import json
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("plotly")
from rbf_lite import metrics  # noqa: E402
from rbf_lite.viz import report  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def summaries(folder):
    return [json.loads(p.read_text()) for p in sorted((RESULTS / folder).glob("*/summary.json"))]


def test_mean_std_and_markdown():
    assert report.mean_std([1.0, 3.0, None]) == (2.0, pytest.approx(2 ** 0.5), 2)
    assert report.pm([0.5, 0.7], 1, percent=True) == "60.0 ± 14.1%"
    text = report.markdown(report.pd.DataFrame({"a": [1.23456], "b": ["x"]}, index=["r"]))
    assert text.splitlines() == ["| index | a | b |", "|---|---|---|", "| r | 1.235 | x |"]


def test_tinystories_table_recomputes_the_summaries():
    runs = report.tinystories_runs(RESULTS)
    table = report.tinystories_table(runs)
    for variant, row in table.iterrows():
        attention, pos = variant.split("+")
        best = [s["best_val_loss"] for s in summaries("tinystories")
                if s["config"]["attention"] == attention and s["config"]["pos"] == pos]
        assert row["seeds"] == len(best) >= 1
        assert row["best val loss"].startswith(f"{np.mean(best):.3f} ± ")
    ranking = report.tinystories_comparison(runs).iloc[0, -1]
    assert all(variant in ranking for variant in table.index)


def test_qk_norms_come_from_the_last_evaluation():
    runs = report.tinystories_runs(RESULTS)
    group = [r for r in runs if r["variant"] == runs[0]["variant"]]
    last = [[json.loads(line) for line in (r["dir"] / "log.jsonl").read_text().splitlines()
             if "qk_norms" in line][-1]["qk_norms"] for r in group]
    expected = np.mean([[layer["k"] for layer in layers] for layers in last], axis=0)
    assert np.allclose(report.mean_final_qk_norms(group)["k"], expected)


def test_cifar_comparison_puts_our_means_beside_the_seeds_numbers():
    cifar10, openset = report.cifar_summaries("cifar10", RESULTS), report.cifar_summaries("cifar10-openset", RESULTS)
    table = report.cifar_comparison(cifar10, openset, halo="halo_rbf_lite")  # these runs predate "published"
    assert table.loc["accuracy", "seed: HALO"] == "96.53%"
    halo = [s["accuracy"] for s in cifar10 if s["config"]["loss"] == "halo"]
    assert table.loc["accuracy", "ours: HALO"].startswith(f"{100 * np.mean(halo):.2f} ± ")
    assert "held-out" in table.loc["CIFAR-100 AUROC", "our set"]


def test_pooled_reliability_adds_counts_and_weights_accuracy():
    group = [s for s in report.cifar_summaries("cifar10", RESULTS) if s["config"]["loss"] == "cce"]
    pooled = report.pooled_reliability(group)
    assert pooled["count"].sum() == sum(s["dataset"]["test_images"] for s in group)
    correct = sum(np.array(s["reliability"]["accuracy"]) * np.array(s["reliability"]["count"]) for s in group)
    assert np.allclose(pooled["accuracy"] * pooled["count"], correct)
    ece = np.sum(pooled["count"] / pooled["count"].sum() * np.abs(pooled["accuracy"] - pooled["confidence"]))
    assert ece == pytest.approx(np.mean([s["ece"] for s in group]), abs=5e-3)


def test_seed_regime_comparison_puts_each_heads_mean_beside_the_seeds():
    runs = report.cifar_summaries("cifar10-long", RESULTS)
    table = report.seed_regime_comparison(runs)
    assert table.loc["ECE", "seed: HALO"] == "0.0151" and table.loc["NLL", "seed: HALO"] == "-"
    for head in ("cce", "cce_ls", "halo"):
        group = [s for s in runs if s["head"] == head]
        assert len(group) == 3
        column = report.HEAD_NAMES[head]
        assert table.loc["ECE after temperature", column].startswith(
            f"{np.mean([s['ece_temperature'] for s in group]):.4f} ± ")
        score = report.MAIN_SCORE[head]
        assert table.loc["far-OOD FPR@95", column].startswith(
            f"{100 * np.mean([s['ood']['fashion-mnist'][score]['fpr95'] for s in group]):.2f} ± ")


def test_head_of_reads_legacy_summaries():
    assert report.head_of({"config": {"loss": "halo"}}) == "halo_rbf_lite"
    assert report.head_of({"config": {"loss": "cce", "label_smoothing": 0.1}}) == "cce_ls"
    assert report.head_of({"config": {"loss": "halo", "halo_variant": "published"}}) == "halo"
    assert report.head_of({"head": "cce", "config": {"loss": "cce"}}) == "cce"


def test_pca_basis_projects_like_pca():
    x = np.random.default_rng(0).normal(size=(50, 6)) * np.arange(1, 7)
    projected, ratio = metrics.pca(x, 2)
    mean, axes, ratio_again = metrics.pca_basis(x, 2)
    assert np.allclose((x - mean) @ axes.T, projected) and np.allclose(ratio, ratio_again)


def test_write_all_regenerates_every_table_and_figure(tmp_path):
    written = {p.name for p in report.write_all(RESULTS, tmp_path)}
    for name in ("tinystories_table.md", "tinystories_qk_norms.html", "tinystories_attention.html",
                 "cifar10_comparison.md", "cifar10_reliability.html", "cifar10_latents_halo_rbf_lite.html",
                 "cifar10_long_comparison.md", "cifar10_long_reliability.html", "cifar10_recipe.md",
                 "cifar10_openset_detection.md", "cifar10_sweep.md", "kernel_ratios_causal.html",
                 "kernel_ratios_fwdbwd_noncausal.md", "kernel_targets.md", "kernel_decode.md", "lm_step.md"):
        assert name in written
    assert "| sdpa+rope |" in (tmp_path / "tinystories_table.md").read_text()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        report.results_root(tmp_path / "missing")


def test_kernel_targets_compare_every_measurement():
    from rbf_lite.viz import bench
    rows = bench.combined_rows(bench.load_bench(RESULTS / "bench" / "attention_bf16.json"))
    decode = json.loads((RESULTS / "bench" / "decode_bf16.json").read_text())
    table = report.kernel_targets(rows, decode)
    mine = rows[(rows.variant == "rbf_lite") & (rows.n >= 4096)]
    low, high = table.loc[("forward", "N >= 4096"), "measured (x SDPA)"].split(" - ")
    assert float(low) == pytest.approx(mine.fwd_vs_sdpa.min(), abs=0.005)
    assert float(high) == pytest.approx(mine.fwd_vs_sdpa.max(), abs=0.005)
    both = pd.concat([mine.fwd_vs_sdpa, mine.fwd_loop_vs_sdpa])
    assert table.loc[("forward", "N >= 4096"), "met"] == bool((both <= 1.10).all())
    low, high = table.loc[("forward + backward", "N >= 4096"), "back to back (x SDPA)"].split(" - ")
    assert float(high) == pytest.approx(mine.fwdbwd_loop_vs_sdpa.max(), abs=0.005)
    steps = [r for r in decode["rows"] if r["variant"] == "rbf_decode"]
    low, high = table.loc[("decode step", "batch 1-64, cache 1k-32k"), "CUDA graph (x SDPA)"].split(" - ")
    assert float(high) == pytest.approx(max(r["graph_vs_sdpa"] for r in steps), abs=0.005)
    every = [r[key] for r in steps for key in ("vs_sdpa", "loop_vs_sdpa", "graph_vs_sdpa")]
    assert table.loc[("decode step", "batch 1-64, cache 1k-32k"), "met"] == (max(every) <= 1.20)


def test_sweep_table_keeps_every_epoch_in_a_few_columns():
    table = report.sweep_table(RESULTS)
    runs = report.cifar_summaries("cifar10-sweep", RESULTS)
    assert list(table.columns) == [s["run"] for s in runs] and len(table.columns) <= 5
    log = [json.loads(line) for line in (RESULTS / "cifar10-sweep" / runs[0]["run"] / "log.jsonl").read_text().splitlines()]
    accuracy = [r["test_accuracy"] for r in log if "test_accuracy" in r]
    assert table.loc[f"epoch {len(accuracy)}", runs[0]["run"]] == f"{accuracy[-1]:.1%}"


def test_relative_command_points_at_the_committed_result():
    command = ("python -m rbf_lite.cifar --loss cce --data .gpu/data --ood '' "
               "--out /tmp/results/cifar10/cce-seed0")
    assert report.relative_command(command, "cifar10/cce-seed0/summary.json") == (
        "python -m rbf_lite.cifar --loss cce --data $RBF_LITE_DATA --ood '' --out results/cifar10/cce-seed0")
    bench = report.relative_command("python -m rbf_lite.bench --out /root/out/a.json", "bench/a.json")
    assert bench.endswith("--out results/bench/a.json")
    text = report.relative_command("python -m rbf_lite.lm --data .gpu/data/tinystories --steps 600", "x/summary.json")
    assert "--data $RBF_LITE_DATA/tinystories" in text


def test_shell_lines_fit_the_column_and_keep_options_whole():
    command = "python -m rbf_lite.lm " + " ".join(f"--option-{i} {i * 1000}" for i in range(20))
    text = report.shell_lines(command, width=60)
    lines = text.splitlines()
    assert len(lines) > 1 and all(len(line) <= 60 for line in lines)
    assert all(line.endswith(" \\") for line in lines[:-1])
    assert " ".join(line.rstrip(" \\").strip() for line in lines) == command
    assert all(line.split()[-2 if i < len(lines) - 1 else -1].isdigit() for i, line in enumerate(lines))
    long_value = "python -m rbf_lite.bench --variants " + ",".join(["sdpa_qknorm"] * 4) + " --rep-ms 150"
    lines = report.shell_lines(long_value, width=60).splitlines()
    assert all(len(line) <= 60 for line in lines) and lines[0].endswith("--variants \\")


def _chapter(folder, name, *cells):
    """A chapter notebook of code cells, each (source, tags)."""
    folder.mkdir(exist_ok=True)
    notebook = {"cells": [{"cell_type": "code", "metadata": {"tags": tags}, "source": source, "outputs": []}
                          for source, tags in cells] + [{"cell_type": "markdown", "metadata": {},
                                                         "source": "cce and cifar10-sweep in the text"}],
                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (folder / f"{name}.ipynb").write_text(json.dumps(notebook))


def test_chapters_loading_matches_whole_paths_not_substrings(tmp_path):
    files = ["cifar10/cce-seed0/summary.json", "cifar10-openset/cce-seed0/summary.json",
             "cifar10-sweep/cce/summary.json", "bench/attention_bf16.json", "bench/lm_step.json",
             "multi-gpu/rehearsal/summary.json"]
    book = tmp_path / "book"
    _chapter(book, "halo", ('runs = report.cifar_summaries("cifar10")\nlabel = "cce"', []),
             ('!ls results', []))
    _chapter(book, "kernel", ('bench = {n: load(f"bench/{n}") for n in ("attention_bf16.json",)}', []))
    _chapter(book, "sweep", ("report.sweep_table()", []))
    _chapter(book, "scaling", ('path = results / "multi-gpu" / "rehearsal"\nother = results / "bench"', []))
    _chapter(book, "skipped", ('run("--out", "results/cifar10-openset/cce-seed0")', ["skip-execution"]))
    found = report.chapters_loading(files, book)
    assert found == {"cifar10/cce-seed0/summary.json": ["halo"],
                     "cifar10-openset/cce-seed0/summary.json": [],
                     "cifar10-sweep/cce/summary.json": ["sweep"],
                     "bench/attention_bf16.json": ["kernel", "scaling"],
                     "bench/lm_step.json": ["scaling"],
                     "multi-gpu/rehearsal/summary.json": ["scaling"]}
    with pytest.raises(FileNotFoundError, match="no chapters"):
        report.chapters_loading(files, tmp_path / "empty")


def test_chapters_loading_finds_what_the_books_chapters_read():
    from rbf_lite.viz import training
    table = training.provenance_table(RESULTS)
    found = report.chapters_loading(table.index, RESULTS.parent / "book")
    assert found["bench/cifar_epoch.json"] and "halo_cifar" in found["bench/cifar_epoch.json"]
    assert found["cifar10-sweep/cce/summary.json"] == ["halo_cifar"]
    unread = [file for file, chapters in found.items() if not chapters]
    assert not unread, f"committed results no chapter reads: {unread}"


def _title_room(fig, width=700, char_px=8.5):
    """For each pair of neighbouring subplot titles at `width` px, the gap left between their texts
    (negative: they overlap), estimating each character of the 16 px title font at `char_px`."""
    margin = fig.layout.margin
    plot = width - (80 if margin.l is None else margin.l) - (80 if margin.r is None else margin.r)
    titles = sorted((a.x, len(a.text)) for a in fig.layout.annotations if a.yref == "paper" and a.y >= 0.99)
    return [(x2 - x1) * plot - (n1 + n2) / 2 * char_px for (x1, n1), (x2, n2) in zip(titles, titles[1:])]


def test_reliability_notes_sit_inside_their_own_panels():
    from rbf_lite.viz import halo
    cifar10 = report.cifar_summaries("cifar10", RESULTS)
    fig = report.recorded_reliability(cifar10)
    notes = [a for a in fig.layout.annotations if a.text.startswith("ECE")]
    assert [a.xref for a in notes] == ["x domain", "x2 domain"] and all(a.xanchor == "left" for a in notes)
    for loss, note in zip(("cce", "halo"), notes):
        assert note.text == f"ECE {report.pm((s['ece'] for s in cifar10 if s['config']['loss'] == loss), 4)}"
    assert min(_title_room(fig)) > 0
    for figure in (halo.soap_bubble_figure(), halo.draw_confidence(2.0)):
        assert min(_title_room(figure)) > 0


def test_tiny_run_tables_show_each_head_and_score():
    from rbf_lite.viz import halo
    rng = np.random.default_rng(0)
    runs = []
    for loss, abstains in (("cce", False), ("halo", True)):
        probs = rng.dirichlet(np.ones(3 + abstains), size=20)
        labels = rng.integers(0, 3, size=20)
        runs.append({"loss": loss, "abstains": abstains, "probs": probs, "labels": labels, "train_images": 2000,
                     "train_loss": [1.0, 0.9], "seconds": 12.3,
                     "metrics": metrics.classification(probs, labels, abstains),
                     "detection": {"mnist": {s: {"auroc": 0.5, "fpr95": 0.9, "aupr": 0.4}
                                             for s in metrics.ood_scores(probs, abstains)}}})
    table = halo.tiny_run_table(runs)
    assert list(table.columns) == ["linear head", "HALO"]
    assert table.loc["abstain rate", "linear head"] == "–" and table.loc["training", "HALO"] == "2,000 images x 2 epochs"
    assert table.loc["accuracy", "HALO"] == f"{runs[1]['metrics']['accuracy']:.1%}"
    scores = halo.detection_table(runs)
    assert list(scores["score"]) == ["MSP", "max-known", "1 − p(abstain)"]
    panels = halo.tiny_run_panels(runs)
    assert [note for _, _, note in panels] == [f"ECE {r['metrics']['ece']:.3f}" for r in runs]


def _write_run(root, preset, arm, seed, val, d_model=256, cap=None):
    run = root / preset / f"{arm}-seed{seed}-{d_model}-{cap}"
    run.mkdir(parents=True)
    config = {"preset": preset, "attention": arm, "seed": seed, "d_model": d_model, "train_tokens": cap,
              "pos": "learned"}
    summary = {"config": config, "data": {"train_tokens": cap or 1000}, "val_loss": val[-1], "steps_done": 20}
    (run / "summary.json").write_text(json.dumps(summary))
    records = [{"step": s, "train_loss": v + 0.5} for s, v in zip((10, 20), val)]
    records += [{"step": s, "val_loss": v, "qk_norms": [{"q": 1.0, "k": 1.0}]} for s, v in zip((10, 20), val)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_seed_runs_pair_the_arms_by_seed_and_report_rbf_minus_sdpa(tmp_path):
    from rbf_lite.viz import seed_tinystories as seed
    root = tmp_path / "tinystories-seed"
    for k, gap in enumerate((-0.05, -0.06, -0.04)):
        _write_run(root, "seed-headline", "sdpa", k, [4.0, 3.0 + k])
        _write_run(root, "seed-headline", "rbf", k, [4.0, 3.0 + k + gap])
    _write_run(root, "seed-headline", "sdpa", 7, [4.0, 1.0])  # no RBF twin: left out of the pairs
    _write_run(root, "seed-headline", "rbf", 0, [4.0, 2.0], cap=500)  # another data size: its own group
    runs = seed.seed_runs("tinystories-seed", tmp_path)
    assert len(runs) == 8
    matched = seed.pairs(runs)[("seed-headline", None, 256)]
    assert [(a["seed"], a["arm"], b["arm"]) for a, b in matched] == [(k, "sdpa", "rbf") for k in range(3)]
    row = seed.paired_rows(runs)[0]
    assert row["seeds"] == 3 and row["val"]["mean"] == pytest.approx(-0.05)
    assert row["val"]["low"] < -0.05 < row["val"]["high"]
    assert row["train"]["mean"] == pytest.approx(-0.025), "the mean of the last five logged training losses"
    table = seed.paired_table(runs)
    assert list(table["preset"]) == ["seed-headline"] and table["RBF − SDPA, val [95%]"][0].startswith("-0.0500")
    fig = seed.paired_curve_figure(runs)
    assert list(fig.data[1].y) == pytest.approx([0.0, -0.05])


def test_the_committed_seed_runs_are_complete_pairs():
    from rbf_lite.viz import seed_tinystories as seed
    runs = seed.seed_runs("tinystories-seed", RESULTS)
    rows = seed.paired_rows(runs)
    assert {r["preset"] for r in rows} == {"seed-headline", "seed-susie"}
    assert all(r["seeds"] >= 5 and len(r["val"]) == 5 for r in rows)
    for run in runs:
        assert run["summary"]["preset"]["overrides"] == {} and len(run["log"]["val_step"]) >= 20
        assert run["summary"]["config"]["layout"] == "stories" and run["summary"]["completed"]


def test_cifar_commands_repeat_the_recorded_runs():
    """Parsed back, a committed run's command gives exactly its recorded configuration."""
    from rbf_lite import cifar
    for experiment in ("cifar10", "cifar10-long"):
        for run in report.cifar_summaries(experiment):
            command = report.cifar_command(run, f"{experiment}/{run['run']}/summary.json")
            args = shlex.split(command.replace("$RBF_LITE_DATA", "data"))[3:]
            parsed = dataclasses.asdict(cifar.parse_args(args))
            ignored = {"out", "data", "resume", "overwrite", "device", "compile"}
            if run["config"]["loss"] == "cce":
                ignored.add("halo_variant")  # a linear head has no HALO variant
            recorded = {**{"halo_variant": "rbf_lite", "holdout": 0, "cutout": 0}, **run["config"]}
            assert {k: v for k, v in parsed.items() if k not in ignored} == \
                   {k: v for k, v in recorded.items() if k not in ignored}, command


def test_recipe_table_refuses_runs_of_different_lengths():
    runs = report.cifar_summaries("cifar10-recipe", RESULTS)
    table = report.recipe_table(runs)
    assert len(table) == len(runs) and table["accuracy"].max() == max(s["accuracy"] for s in runs)
    longer = {**runs[0], "config": {**runs[0]["config"], "epochs": 200}}
    with pytest.raises(ValueError, match="differ in epochs"):
        report.recipe_table([longer, *runs[1:]])
