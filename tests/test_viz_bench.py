"""The kernel chapter's cost table and notes are computed from the benchmark files, never typed in."""
import pandas as pd
import pytest

from rbf_lite.viz import bench


def test_short_command_cuts_machine_paths_to_file_names():
    command = "python -m rbf_lite.bench --out /root/out/attention_bf16.json --log=/tmp/x/run.log --rep-ms 150"
    assert bench.short_command(command) == \
        "python -m rbf_lite.bench --out attention_bf16.json --log=run.log --rep-ms 150"
    assert bench.short_command("python -m rbf_lite.bench --out results/a.json") == \
        "python -m rbf_lite.bench --out results/a.json"


def rows(ratios):
    """Benchmark rows: SDPA at 1.0, rbf_lite at ratios[(n, causal)] (forward, forward+backward)."""
    out = []
    for (n, causal), (fwd, both) in ratios.items():
        for variant, f, b, mem in (("sdpa", 1.0, 1.0, 100.0), ("rbf_lite", fwd, both, 110.0)):
            out.append({"variant": variant, "b": 2, "h": 4, "n": n, "d": 64, "dtype": "bf16", "causal": causal,
                        "fwd_ms": f, "fwdbwd_ms": b, "fwd_vs_sdpa": f, "fwdbwd_vs_sdpa": b, "peak_mib": mem,
                        "shape": f"B2 H4 N{n} D64"})
    return pd.DataFrame(out)


RATIOS = {(1024, True): (1.5, 2.5), (1024, False): (1.4, 2.4), (8192, True): (1.21, 1.31), (8192, False): (1.11, 1.41)}


def test_cost_table_reads_the_ratios_from_the_rows():
    table = bench.cost_table(rows(RATIOS))
    assert list(table.index) == ["B2\u00a0H4\u00a0N1024\u00a0D64", "B2\u00a0H4\u00a0N8192\u00a0D64"]
    row = table.iloc[1]
    assert (row["forward, causal"], row["forward, non-causal"], row["fwd+bwd, causal"], row["fwd+bwd, non-causal"]) == \
        (1.21, 1.11, 1.31, 1.41)
    assert row["peak memory"] == pytest.approx(1.1)


def test_cost_notes_give_the_long_sequence_ranges_of_the_data():
    decode = {"rows": [{"variant": "rbf_decode", "b": 1, "cache": 1024, "vs_sdpa": 1.3, "loop_vs_sdpa": 1.6,
                        "graph_vs_sdpa": 1.02}]}
    accuracy = [{"dtype": "bf16", "rbf_lite_rel_err": 1.9e-3, "sdpa_rel_err": 2.0e-3}]
    notes = bench.cost_notes(rows(RATIOS), accuracy, decode, min_n=4096, others=())
    assert "forward 1.11-1.21x SDPA's time, forward+backward 1.31-1.41x" in notes
    assert "up to 1.6x (batch 1, 1,024 keys)" in notes
