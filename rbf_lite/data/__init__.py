"""Where data comes from: the hub when online, local files when given a path or RBF_LITE_DATA.

`data_root()` resolves the local folder once, so every loader looks in the same place and every
"not found" error can say where it looked and how to provide the data.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "RBF_LITE_DATA"


class DataNotFoundError(FileNotFoundError):
    """Raised when data is neither at the given path, under RBF_LITE_DATA, nor reachable online."""


def candidate_roots(path: str | Path | None = None) -> list[Path]:
    """Folders searched for local data, in order: the explicit path, $RBF_LITE_DATA, ../shared/data."""
    roots = []
    if path is not None:
        roots.append(Path(path).expanduser())
    if os.environ.get(ENV_VAR):
        roots.append(Path(os.environ[ENV_VAR]).expanduser())
    repo = Path(__file__).resolve().parents[2]
    roots += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    seen, unique = set(), []
    for r in roots:
        if r not in seen:
            seen.add(r)
            unique.append(r)
    return unique


def find_local(relative: str | Path, path: str | Path | None = None) -> Path | None:
    """First existing `root/relative` (or `path` itself, if it already points at the thing)."""
    if path is not None and Path(path).expanduser().exists() and Path(path).name == Path(relative).name:
        return Path(path).expanduser()
    for root in candidate_roots(path):
        if (root / relative).exists():
            return root / relative
    return None


def not_found(what: str, relative: str | Path, path: str | Path | None, how: str) -> DataNotFoundError:
    """A DataNotFoundError that lists every place searched and how to provide the data."""
    looked = "\n  ".join(str(r / relative) for r in candidate_roots(path))
    return DataNotFoundError(
        f"{what} not found. Looked in:\n  {looked}\n"
        f"Provide it with a path argument or set {ENV_VAR} to a folder that holds {relative}; {how}")


def cache_dir(name: str) -> Path:
    """Where decoded/tokenised caches go: $RBF_LITE_CACHE, else ~/.cache/rbf_lite/<name>."""
    base = Path(os.environ.get("RBF_LITE_CACHE", Path.home() / ".cache" / "rbf_lite"))
    d = base / name
    d.mkdir(parents=True, exist_ok=True)
    return d
