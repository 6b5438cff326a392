"""What every training run shares: seeding, an environment record, a JSON-lines log, checkpoints.

A result is only worth keeping if it says where it came from, so `environment()` records device,
library versions, git commit and the exact command; `JsonlLog` appends one JSON object per line,
so a crashed run still leaves a readable log; checkpoints carry every RNG state so that a resumed
run continues exactly where the interrupted one stopped; `prepare_run_dir` keeps a new run from
silently writing over an old one.
"""
from __future__ import annotations

import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def progress(*args: Any, **kwargs: Any):
    """A tqdm progress bar, silenced when RBF_LITE_PROGRESS=0.

    The book's build sets it: chapters run small trainings, and a bar on stderr would fail the
    strict build. (tqdm's own TQDM_DISABLE cannot do this: an explicit disable= argument wins.)
    """
    from tqdm.auto import tqdm
    if os.environ.get("RBF_LITE_PROGRESS") == "0":
        kwargs["disable"] = True
    return tqdm(*args, **kwargs)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_commit() -> str | None:
    """The commit of the checkout this code runs from, or the RBF_LITE_COMMIT variable, or None."""
    if os.environ.get("RBF_LITE_COMMIT"):
        return os.environ["RBF_LITE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_name(device: torch.device | str | None = None) -> str:
    """A human-readable device name: the GPU's marketing name, or the CPU's architecture."""
    device = torch.device(device) if device is not None else None
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(device if device is not None else 0)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def command_line() -> str:
    """The command as typed: `python -m pkg.mod args` for modules run with -m, not the file path."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = ["-m", spec.name.removesuffix(".__main__")] if spec is not None and spec.name else sys.argv[:1]
    return " ".join(shlex.quote(a) for a in ["python", *program, *sys.argv[1:]])


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Device, versions, commit and command: the provenance stamped on every result file."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "command": command_line(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# A folder holding any of these holds a run; --overwrite also deletes what the trainers write beside
# them (cifar: latents.npz; lm: tokenizer.json, attention_maps.json), so no file of the old run survives.
RUN_FILES = ("summary.json", "log.jsonl", "checkpoint.pt")
RUN_OUTPUTS = (*RUN_FILES, "checkpoint.pt.tmp", "latents.npz", "tokenizer.json", "attention_maps.json")


def prepare_run_dir(out: str | Path, resume: bool, overwrite: bool) -> Path:
    """Create the run folder `out`; refuse one that already holds a run unless told what to do.

    `resume` keeps the old run's files (the trainer continues from its checkpoint); `overwrite`
    deletes them first. Without either, a folder with a run raises FileExistsError.
    """
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run in "
                         f"{out} or replace it, not both")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"the run folder {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    held = [name for name in RUN_FILES if (out / name).exists()]
    if overwrite:
        for name in RUN_OUTPUTS:
            (out / name).unlink(missing_ok=True)
    elif held and not resume:
        raise FileExistsError(f"{out} already holds a run ({', '.join(held)}): pass --resume to continue "
                              f"it or --overwrite to replace it, or choose another output folder")
    return out


class JsonlLog:
    """Append-only JSON-lines log; `resume=True` keeps earlier lines up to a given step."""

    def __init__(self, path: str | Path, resume_from_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is None:
            self.path.write_text("")
        elif self.path.exists():
            # Drop lines logged after the checkpoint we resume from: they will be logged again.
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_from_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, **record: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.generic, torch.Tensor)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


def rng_state() -> dict[str, Any]:
    """Every random-number state a training loop may draw from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`. The states must be CPU byte tensors: a checkpoint loaded with
    map_location="cuda" has moved them to the GPU, so they are brought back first."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: str | Path, **state: Any) -> None:
    """Write atomically (temp file + rename) so that a kill mid-write never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({**state, "rng": rng_state()}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint and restore the RNG states saved with it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location=map_location, weights_only=False)
    set_rng_state(state.pop("rng"))
    return state
