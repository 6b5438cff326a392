"""Where data comes from: the hub when online, local files when given a path or RBF_LITE_DATA.

`candidate_roots()` lists the local folders, so every loader looks in the same places and every
"not found" error can say where it looked and how to provide the data. `hub_unreachable()` tells
offline at once, so that loaders skip the hub instead of spending their retries on it.
"""
from __future__ import annotations

import functools
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path

ENV_VAR = "RBF_LITE_DATA"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")  # huggingface_hub's and datasets' switches
HUB_TIMEOUT_S = 3.0


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


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used now, or None when it answers.

    Offline when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set, or when the hub's endpoint
    ($HF_ENDPOINT, else huggingface.co) gives no answer within a few seconds; that probe runs once
    per process. Any answer, even an HTTP or TLS error, counts as reachable: the hub client decides.
    """
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"the Hugging Face hub is switched off ({var}={os.environ[var]})"
    return _probe(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.lru_cache(maxsize=None)
def _probe(url: str) -> str | None:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_TIMEOUT_S).close()
    except urllib.error.HTTPError:  # an answer, even if a refusal
        return None
    except urllib.error.URLError as error:
        if isinstance(error.reason, ssl.SSLError):  # an answer too: urllib may trust other certificates
            return None                              # than the hub client does
        return f"the Hugging Face hub is unreachable ({url}: {error.reason})"
    except ssl.SSLError:
        return None
    except OSError as error:  # a timeout, a reset connection
        return f"the Hugging Face hub is unreachable ({url}: {error or type(error).__name__})"
    return None
