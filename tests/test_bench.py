"""The attention benchmark's resume logic (the timing itself needs a GPU and is not a test)."""
import pytest

from rbf_lite.bench.attention import measured_group, resumed

STAMP = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "commit": "abc123",
         "command": "python -m rbf_lite.bench --out a.json"}


def row(variant, n, causal=True):
    return {"variant": variant, "b": 4, "h": 8, "n": n, "d": 64, "dtype": "bf16", "causal": causal, "fwd_ms": 1.0}


def test_a_shape_counts_as_measured_only_with_every_variant():
    rows = [row("sdpa", 1024), row("rbf_lite", 1024), row("sdpa", 4096)]
    assert measured_group(rows, 4, 8, 1024, 64, "bf16", True, ["sdpa", "rbf_lite"])
    assert not measured_group(rows, 4, 8, 4096, 64, "bf16", True, ["sdpa", "rbf_lite"])
    assert not measured_group(rows, 4, 8, 1024, 64, "bf16", False, ["sdpa", "rbf_lite"])
    assert not measured_group(rows, 4, 8, 1024, 64, "fp16", True, ["sdpa"])


def test_resume_keeps_the_rows_and_records_both_commands():
    previous = {**STAMP, "rows": [row("sdpa", 1024)], "accuracy": [{"dtype": "bf16"}],
                "tuned": {"forward": [{"key": {"n": 1}, "config": {}}]}}
    now = {**STAMP, "command": "python -m rbf_lite.bench --out a.json --resume", "time": "later"}
    result = resumed(previous, now, ["bf16"])
    assert result["rows"] == previous["rows"] and result["tuned"] == previous["tuned"]
    assert result["command"] == STAMP["command"] and result["resumed_by"] == [now["command"]]
    assert result["time"] == "later"
    again = resumed(result, {**now, "command": "third"}, ["bf16"])
    assert again["resumed_by"] == [now["command"], "third"]


def test_resume_refuses_another_commit_or_missing_accuracy():
    previous = {**STAMP, "rows": [], "accuracy": [{"dtype": "bf16"}]}
    with pytest.raises(SystemExit, match="commit: 'abc123' in the file, 'def456' now"):
        resumed(previous, {**STAMP, "commit": "def456"}, ["bf16"])
    with pytest.raises(SystemExit, match="accuracy rows for"):
        resumed(previous, STAMP, ["bf16", "fp16"])
