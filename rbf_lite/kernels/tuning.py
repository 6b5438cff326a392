"""Choosing a kernel's configuration (tile sizes, warps, pipeline stages) without timing on a first call.

Timing every candidate at a new shape compiles each one first: about a minute for the attention's
forward and backward. So by default nothing is timed. A key (length buckets, head dim, causality,
dtype, ...) takes, in this order:
  1. the tuning cache on disk: choices timed earlier on this GPU with the same torch, Triton and
     kernel source (`RBF_LITE_AUTOTUNE=full`, or `python -m rbf_lite.tune`);
  2. the table shipped with the package (`tuned_configs.json`, written by `python -m rbf_lite.tune
     --table` on the GPUs measured here): this GPU's entries, else those of a measured GPU of the same
     compute capability; the nearest length bucket of the same head dim, causality and code path;
  3. a heuristic: a short list of tiles per head dim, the first one that compiles within this GPU's
     shared memory.
Where the table knows that a configuration already compiled in this process is within `TOLERANCE`
of the best at that key, it reuses it: a new sequence length then costs no compile.

RBF_LITE_AUTOTUNE selects the mode: unset or "table" (the above), "full" (keys missing from the
cache are timed, then cached), "0" (the smallest configuration everywhere: tests).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import torch
import triton
from triton.runtime.errors import OutOfResources, PTXASError

TABLE_FILE = Path(__file__).with_name("tuned_configs.json")
FINALISTS = 3  # candidates the tuner times again, longer, before it chooses
TOLERANCE = 0.03  # a compiled configuration this close to the best is reused instead of compiling another
KEY_FIELDS = ("query_bucket", "key_bucket", "head_dim", "causal", "normalize", "tma", "dtype", "device",
              "atomic_dq")  # the backward's key adds the last
BUCKETS = ("query_bucket", "key_bucket")
MODES = ("table", "full", "0")
# Set by `python -m rbf_lite.tune`'s compile workers to (worker, workers): each new key only compiles
# (and launches once) every workers-th candidate from the worker-th on, filling Triton's cache so that
# the timing process compiles nothing.
COMPILE_SHARE: tuple[int, int] | None = None
RETIME = False  # set by `python -m rbf_lite.tune`: time keys again even where the cache has them


def mode() -> str:
    value = os.environ.get("RBF_LITE_AUTOTUNE", "table") or "table"
    if value not in MODES:
        raise ValueError(f"RBF_LITE_AUTOTUNE must be one of {MODES}, got {value!r}")
    return value


def config_dict(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages,
            **({"maxnreg": config.maxnreg} if config.maxnreg else {})}


def config_from_dict(d: dict) -> triton.Config:
    d = dict(d)
    warps, stages, maxnreg = d.pop("num_warps"), d.pop("num_stages"), d.pop("maxnreg", None)
    return triton.Config(d, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


def portable_key(key: tuple) -> dict[str, str]:
    """The key as strings, without the process-local device index: what the cache and table store."""
    fields = dict(zip(KEY_FIELDS, map(str, key)))
    fields.pop("device")
    return fields


def _family(fields: dict[str, str]) -> tuple:
    """Everything but the lengths: keys of one family compile the same kernels for a configuration."""
    return tuple(sorted((k, v) for k, v in fields.items() if k not in BUCKETS))


def bucket(n: int) -> int:
    """A length's power-of-two bucket (at least 16), so growing caches don't change the key each step."""
    return 1 << max(4, (max(n, 1) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def gpu(index: int) -> tuple[str, str]:
    """(name, compute capability) of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


# ----- the tuning cache on disk ---------------------------------------------------------------------------

def kernel_source_hash() -> str:
    """The attention kernels' source: any edit to them (or to their candidate lists) starts a new cache."""
    return hashlib.sha256(Path(__file__).with_name("rbf_attention.py").read_bytes()).hexdigest()[:16]


class TuningCache:
    """Choices timed on this machine, one JSON file per (GPU, torch, Triton, kernel source).

    The file name hashes those four, and the file repeats them: a file whose header differs is
    another environment's and is never read. A file that cannot be read is ignored with a warning
    (and replaced at the next write). Writes merge with what is on disk and replace the file
    atomically, so concurrent processes lose nothing but a race's last entry.
    """

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self.loaded: dict[str, dict] = {}

    def _folder(self) -> Path:
        if self.folder is None:
            self.folder = Path(os.environ.get("RBF_LITE_CACHE", Path.home() / ".cache" / "rbf_lite")) / "tuning"
        return self.folder

    @staticmethod
    def header(gpu_name: str) -> dict[str, str]:
        return {"gpu": gpu_name, "torch": torch.__version__, "triton": triton.__version__,
                "kernel_source": kernel_source_hash()}

    def path(self, header: dict[str, str]) -> Path:
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:16]
        return self._folder() / f"tuning-{digest}.json"

    def _read(self, header: dict[str, str]) -> dict:
        path = self.path(header)
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            if not isinstance(data.get("header"), dict) or not isinstance(data.get("entries"), dict):
                raise ValueError("not a tuning cache")
            if data["header"] != header:
                return {}
            entries = data["entries"]
            for entry in entries.values():
                config_from_dict(entry["config"])
            return entries
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            warnings.warn(f"rbf_lite: ignoring the unreadable tuning cache {path} ({type(e).__name__}: {e}); "
                          "it will be rewritten", RuntimeWarning, stacklevel=2)
            return {}

    def entries(self, gpu_name: str) -> dict:
        if gpu_name not in self.loaded:
            self.loaded[gpu_name] = self._read(self.header(gpu_name))
        return self.loaded[gpu_name]

    @staticmethod
    def entry_key(direction: str, fields: dict[str, str]) -> str:
        return json.dumps([direction, fields], sort_keys=True)

    def get(self, gpu_name: str, direction: str, fields: dict[str, str]) -> triton.Config | None:
        entry = self.entries(gpu_name).get(self.entry_key(direction, fields))
        return None if entry is None else config_from_dict(entry["config"])

    def put(self, gpu_name: str, direction: str, fields: dict[str, str], config: triton.Config,
            finalists: list[dict]) -> None:
        header = self.header(gpu_name)
        entries = {**self._read(header), **self.entries(gpu_name)}
        entries[self.entry_key(direction, fields)] = {"config": config_dict(config), "finalists": finalists}
        self.loaded[gpu_name] = entries
        path = self.path(header)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump({"header": header, "entries": entries}, f, indent=1)
        os.replace(f.name, path)


CACHE = TuningCache()


# ----- the shipped table ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def table() -> dict:
    return json.loads(TABLE_FILE.read_text()) if TABLE_FILE.exists() else {"gpus": {}}


def table_entries(gpu_name: str, capability: str, direction: str) -> list[dict]:
    """This GPU's measured entries, else those of the first measured GPU of the same capability."""
    gpus = table()["gpus"]
    if gpu_name in gpus:
        return gpus[gpu_name][direction]
    for measured in gpus.values():
        if measured["capability"] == capability:
            return measured[direction]
    return []


def _log2_distance(a: str, b: str) -> float:
    return abs(math.log2(int(a)) - math.log2(int(b)))


def nearest_entry(entries: list[dict], fields: dict[str, str]) -> dict | None:
    """The table entry closest to `fields`: the same causality, code path (tma, atomic_dq) and
    normalisation where measured; then the nearest head dim, the same dtype before another of its
    size, and the nearest length buckets (in octaves; between two, the longer, where tiles matter most)."""
    def same(entry, name):
        return entry["key"].get(name) == fields.get(name)

    pool = [e for e in entries if same(e, "causal") and same(e, "tma") and same(e, "atomic_dq")]
    pool = [e for e in pool if same(e, "normalize")] or pool
    if not pool:
        return None
    size = torch.finfo(getattr(torch, fields["dtype"].removeprefix("torch."))).bits
    pool = [e for e in pool if torch.finfo(getattr(torch, e["key"]["dtype"].removeprefix("torch."))).bits == size] or pool
    return min(pool, key=lambda e: (_log2_distance(e["key"]["head_dim"], fields["head_dim"]),
                                    not same(e, "dtype"),
                                    sum(_log2_distance(e["key"][b], fields[b]) for b in BUCKETS),
                                    -sum(int(e["key"][b]) for b in BUCKETS)))  # a tie: the longer


# ----- the tuner -----------------------------------------------------------------------------------------

class Tuner:
    """Chooses a kernel's configuration once per key (see the module docstring), then launches directly.

    `triton.autotune` rebuilds its key from every argument on each call: at the launch-bound
    training shape that was ~30 us per launch. Here the caller computes the key from what matters
    (length buckets, head dim, causality, dtype, device), and a known choice costs one dict lookup.
    """

    def __init__(self, direction: str, launcher, configs, fits, heuristic, stand_in: triton.Config | None = None):
        """configs: every candidate (timed in "full" mode); heuristic(head_dim): candidates in order of
        preference for GPUs the table has not measured; stand_in: a configuration that compiles fast,
        launched in place of one that is still compiling in the background (see CompiledLauncher)."""
        self.direction, self.launcher, self.configs, self.fits = direction, launcher, configs, fits
        self.heuristic, self.stand_in = heuristic, stand_in
        self.chosen: dict[tuple, triton.Config] = {}
        self.sources: dict[tuple, str] = {}
        self.compiled: dict[tuple, set] = {}  # family -> configurations launched (or compiling for a launch) here
        self.failed: dict[tuple, set] = {}  # key -> chosen configurations whose compile in the background failed

    def launch(self, key: tuple, dtype: torch.dtype, grid, args, reset=None, on_compile=None, **constexprs) -> None:
        """grid and args are functions of the configuration's block sizes (TMA descriptors depend on them).
        A kernel that accumulates into its outputs passes `reset`, which clears them after tuning.
        on_compile: see CompiledLauncher.__call__."""
        config = self.chosen.get(key)
        if config is not None:
            try:
                self._run(config, grid, args, constexprs, on_compile)
                return
            except (OutOfResources, PTXASError):  # compiled in the background, after a stand-in ran for it
                self.failed.setdefault(key, set()).add(self.chosen.pop(key))
                self.compiled.get(_family(portable_key(key)), set()).discard(config)
        fields = portable_key(key)
        candidates = self._candidates(key, dtype)
        if len(candidates) > 1:
            if COMPILE_SHARE is not None:
                self._compile_share(key, fields, candidates, grid, args, constexprs)
                return
            gpu_name = gpu(key[KEY_FIELDS.index("device")].index)[0]
            if mode() == "full" and (RETIME or CACHE.get(gpu_name, self.direction, fields) is None):
                best, finalists = self._choose(candidates, grid, args, constexprs)
                CACHE.put(gpu_name, self.direction, fields, best, finalists)
                if reset is not None:
                    reset()
        ordered, source = self._plan(key, dtype)
        ordered = [c for c in ordered if c not in self.failed.get(key, ())] or ordered[-1:]
        self._first_launch(key, fields, ordered, source, grid, args, constexprs, on_compile)

    def _candidates(self, key: tuple, dtype: torch.dtype) -> list[triton.Config]:
        """The configurations to choose from; only one where there is no choice to make: in mode "0"
        (the smallest) or off a GPU."""
        candidates = [c for c in self.configs if self.fits(c, dtype)] or self.configs[-1:]
        if mode() == "0":
            return candidates[-1:]
        return candidates if key[KEY_FIELDS.index("device")].type == "cuda" else candidates[:1]

    def _plan(self, key: tuple, dtype: torch.dtype) -> tuple[list[triton.Config], str]:
        """The configurations a first launch at `key` tries in turn, and where the first comes from: the
        cache (after timing, in "full" mode), else the table, else the heuristic."""
        candidates = self._candidates(key, dtype)
        if len(candidates) == 1:
            return candidates, "only"
        fields = portable_key(key)
        gpu_name, capability = gpu(key[KEY_FIELDS.index("device")].index)
        cached = CACHE.get(gpu_name, self.direction, fields)
        if cached is not None:
            return [cached], "cache"
        entry = nearest_entry(table_entries(gpu_name, capability, self.direction), fields)
        ordered = []
        if entry is not None:
            compiled = self.compiled.get(_family(fields), ())
            ordered = [config_from_dict(f["config"]) for f in entry.get("finalists", [])
                       if f["time"] <= 1 + TOLERANCE and config_from_dict(f["config"]) in compiled]
            ordered.append(config_from_dict(entry["config"]))
        ordered = [c for c in ordered if self.fits(c, dtype)]
        source = "table" if ordered else "heuristic"
        ordered += [c for c in self.heuristic(int(fields["head_dim"])) if self.fits(c, dtype)] + candidates[-1:]
        return ordered, source

    def ahead(self, key: tuple, dtype: torch.dtype, grid, args, reset=None, on_compile=None, stand_in=False,
              **constexprs):
        """A compile, for a background thread, of the configuration that `launch` tries first at `key` (see
        CompiledLauncher.ahead), or None. It takes launch's arguments (reset and on_compile unused), so that
        a caller passes both the same. stand_in: the stand-in's compile instead, or None where that
        configuration is compiled (no stand-in will run for it). None in "full" mode, where a new key is
        timed (compiling every candidate), and in `python -m rbf_lite.tune`'s compile workers, which compile
        them all themselves."""
        if mode() == "full" or COMPILE_SHARE is not None:
            return None
        config = self.chosen.get(key)
        if config is None:
            config = self._plan(key, dtype)[0][0]
        if stand_in:
            if self.stand_in is None or self.launcher.compiled_for(*self._launch_args(config, grid, args, constexprs)):
                return None
            config = self.stand_in
        return self.launcher.ahead(*self._launch_args(config, grid, args, constexprs))

    def _first_launch(self, key, fields, ordered, source, grid, args, constexprs, on_compile=None) -> None:
        """Launch the first configuration of `ordered` that compiles on this GPU, and keep it for `key`."""
        for i, config in enumerate(ordered):
            try:
                self._run(config, grid, args, constexprs, on_compile)
            except (OutOfResources, PTXASError):
                if i == len(ordered) - 1:
                    raise
                continue
            self.chosen[key], self.sources[key] = config, source if i == 0 else "heuristic"
            self.compiled.setdefault(_family(fields), set()).add(config)
            return

    def _compile_share(self, key, fields, candidates, grid, args, constexprs) -> None:
        worker, workers = COMPILE_SHARE
        for config in candidates[worker::workers]:
            try:
                self._run(config, grid, args, constexprs, defer=False)
            except (OutOfResources, PTXASError):
                continue
        self._first_launch(key, fields, candidates[-1:], "only", grid, args, constexprs)

    def choices(self) -> list[dict]:
        """What was chosen so far and where from (cache, table, heuristic): the benchmark records it."""
        return [{"key": portable_key(key), "config": config_dict(config), "source": self.sources.get(key, "timed")}
                for key, config in self.chosen.items()]

    @staticmethod
    def _launch_args(config, grid, args, constexprs) -> tuple:
        """The launcher's arguments for `config`: its block sizes override the caller's constexprs."""
        meta = config.kwargs
        return grid(meta), args(meta), constexprs | meta, config.num_warps, config.num_stages, config.maxnreg

    def _run(self, config, grid, args, constexprs, on_compile=None, defer=True):
        """Launch `config`; or, if it is not compiled yet and `defer`, its stand-in while it compiles in the
        background (for the next launches)."""
        meta = config.kwargs  # (not _launch_args: this runs on every launch)
        if not self.launcher(grid(meta), args(meta), constexprs | meta, config.num_warps, config.num_stages,
                             config.maxnreg, on_compile=on_compile, defer=defer and self.stand_in is not None):
            self.launcher(*self._launch_args(self.stand_in, grid, args, constexprs))

    def _choose(self, candidates, grid, args, constexprs) -> tuple[triton.Config, list[dict]]:
        """Time every candidate: the fastest, and the finalists' times relative to it."""
        from triton.testing import do_bench
        too_large = set()

        def best_times(configs, rep_ms):
            """Each config's best time over its runs here (re-running writes the outputs again, or
            adds to what launch() resets); configs too large for this GPU are dropped."""
            times = {}
            for config in configs:
                if config in too_large:
                    continue
                try:
                    t = do_bench(lambda: self._run(config, grid, args, constexprs, defer=False), warmup=5, rep=rep_ms)
                except (OutOfResources, PTXASError):
                    too_large.add(config)
                    continue
                times[config] = min(t, times.get(config, t))
            return times

        # Two short rounds, the second in reverse order (clock ramp-up favours late candidates, a
        # noisy neighbour any), then the fastest few again, longer: in one benchmark run the short
        # rounds alone chose a D = 128 forward tile that an A/B measured 7% slower than the best.
        quick = best_times(candidates + candidates[::-1], 25)
        if not quick:
            raise RuntimeError("no kernel configuration fits this GPU's shared memory")
        finalists = sorted(quick, key=quick.get)[:FINALISTS]
        final = best_times(finalists + finalists[::-1], 100)
        best = min(final, key=final.get)
        ranked = sorted(final, key=final.get)
        return best, [{"config": config_dict(c), "time": round(final[c] / final[best], 4)} for c in ranked]
