"""The causal kernels keep Hopper's matrix products asynchronous: checked by compiling, without a GPU.

ptxas serialises every wgmma of a kernel (each matrix product then waits for the previous one) when
it finds, between a product and the wait for it, another instruction writing the product's
accumulator (its advisory C7515). With the unmasked key loop first, the path that skips that loop did
so, and the causal kernels ran 1-15% slower (results/bench/NOTES.md, v10); they now run their masked
stage first (`_masked_first`). This compiles both for sm_90a on the CPU and reads ptxas's report.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _ptxas_report(direction: str, causal: bool) -> dict:
    try:
        from triton import knobs
        if not Path(knobs.nvidia.ptxas.path).exists():
            raise FileNotFoundError(knobs.nvidia.ptxas.path)
    except Exception as error:  # a Triton without its NVIDIA back end
        pytest.skip(f"Triton's ptxas is not available: {error}")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    script = Path(__file__).with_name("ptxas_report.py")
    run = subprocess.run([sys.executable, str(script), direction, str(int(causal))], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["wgmma"] > 0 and report["registers"], f"ptxas gave no report: {report}"
    return report


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_causal_kernels_are_not_serialised_by_ptxas(direction):
    report = _ptxas_report(direction, causal=True)
    assert not report["serialised"], (
        f"ptxas serialised every wgmma of the causal {direction} kernel (advisory C7515): {report}")
