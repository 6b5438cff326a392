"""The results chapters' tables and figures, built from the committed results/ folder."""
import json
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
    table = report.cifar_comparison(cifar10, openset)
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


def test_pca_basis_projects_like_pca():
    x = np.random.default_rng(0).normal(size=(50, 6)) * np.arange(1, 7)
    projected, ratio = metrics.pca(x, 2)
    mean, axes, ratio_again = metrics.pca_basis(x, 2)
    assert np.allclose((x - mean) @ axes.T, projected) and np.allclose(ratio, ratio_again)


def test_write_all_regenerates_every_table_and_figure(tmp_path):
    written = {p.name for p in report.write_all(RESULTS, tmp_path)}
    for name in ("tinystories_table.md", "tinystories_qk_norms.html", "tinystories_attention.html",
                 "cifar10_comparison.md", "cifar10_reliability.html", "cifar10_latents_halo.html",
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
