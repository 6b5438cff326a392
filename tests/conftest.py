"""Shared test set-up: without a GPU, run the real Triton kernels in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton decorates the kernels, hence here and not in a fixture.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def shared_data():
    """The real data beside the repository (../shared/data); skips the test when it is absent."""
    root = Path(os.environ.get("RBF_LITE_DATA", SHARED_DATA))
    if not root.exists():
        pytest.skip(f"real data not found at {root} (set RBF_LITE_DATA or place ../shared/data)")
    return root
