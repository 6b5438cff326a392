"""How a kernel configuration is chosen without timing: the disk cache, the shipped table, the heuristic."""
import json

import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources

from rbf_lite.kernels import rbf_attention as kernel
from rbf_lite.kernels import tuning

GPU = ("NVIDIA H200", "9.0")
CUDA0 = torch.device("cuda", 0)


def fields(qb=1024, kb=1024, d=64, causal=True, tma=False, dtype="torch.bfloat16", **extra):
    return {"query_bucket": str(qb), "key_bucket": str(kb), "head_dim": str(d), "causal": str(causal),
            "normalize": "True", "tma": str(tma), "dtype": dtype, **extra}


def key(qb=1024, kb=1024, d=64, causal=True, tma=False, dtype=torch.bfloat16):
    """A forward key as _tuning_key builds it, on a (pretend) GPU."""
    return (qb, kb, d, causal, True, tma, dtype, CUDA0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    cache = tuning.TuningCache(tmp_path)
    monkeypatch.setattr(tuning, "CACHE", cache)
    return cache


class FakeLauncher:
    """Records the configurations launched; those in `too_large` fail as Triton does on a small GPU."""

    def __init__(self, too_large=()):
        self.launched, self.too_large = [], set(too_large)

    def __call__(self, grid, args, constexprs, num_warps, num_stages, maxnreg):
        config = triton.Config({k: constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "MASKED_FIRST")},
                               num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)
        if config in self.too_large:
            raise OutOfResources(300_000, 232_448, "shared memory")
        self.launched.append(config)


def forward_tuner(launcher, monkeypatch, table_gpus=None):
    monkeypatch.setattr(tuning, "gpu", lambda index: GPU)
    monkeypatch.setattr(tuning, "table", lambda: {"gpus": table_gpus or {}})
    return tuning.Tuner("forward", launcher, kernel.TUNED_FWD_CONFIGS, kernel._fits_fwd, kernel._heuristic_fwd)


def launch(tuner, k, dtype=torch.bfloat16):
    tuner.launch(k, dtype, lambda meta: (1,), lambda meta: (), HEAD_DIM=k[2])


def entry(config, finalists=(), **key_fields):
    return {"key": fields(**key_fields), "config": tuning.config_dict(config),
            "finalists": [{"config": tuning.config_dict(c), "time": t} for c, t in finalists]}


# ----- the disk cache ------------------------------------------------------------------------------------

def test_cache_round_trip_and_keys(cache):
    config = kernel.TUNED_FWD_CONFIGS[3]
    cache.put(GPU[0], "forward", fields(), config, finalists=[])
    fresh = tuning.TuningCache(cache.folder)  # another process
    assert fresh.get(GPU[0], "forward", fields()) == config
    assert fresh.get(GPU[0], "backward", fields()) is None
    assert fresh.get(GPU[0], "forward", fields(kb=2048)) is None
    assert fresh.get(GPU[0], "forward", fields(causal=False)) is None
    assert fresh.get("NVIDIA A100-SXM4-80GB", "forward", fields()) is None


@pytest.mark.parametrize("change", ["torch", "triton", "kernel_source"])
def test_cache_is_invalidated_by_a_version_or_kernel_change(cache, monkeypatch, change):
    cache.put(GPU[0], "forward", fields(), kernel.TUNED_FWD_CONFIGS[0], finalists=[])
    if change == "torch":
        monkeypatch.setattr(torch, "__version__", torch.__version__ + ".changed")
    elif change == "triton":
        monkeypatch.setattr(triton, "__version__", triton.__version__ + ".changed")
    else:
        monkeypatch.setattr(tuning, "kernel_source_hash", lambda: "0" * 16)
    assert tuning.TuningCache(cache.folder).get(GPU[0], "forward", fields()) is None


def test_a_file_whose_header_differs_is_not_read(cache):
    header = tuning.TuningCache.header(GPU[0])
    cache.folder.mkdir(parents=True, exist_ok=True)
    stored = {tuning.TuningCache.entry_key("forward", fields()): {"config": tuning.config_dict(kernel.TUNED_FWD_CONFIGS[0])}}
    cache.path(header).write_text(json.dumps({"header": {**header, "gpu": "another"}, "entries": stored}))
    assert tuning.TuningCache(cache.folder).get(GPU[0], "forward", fields()) is None


@pytest.mark.parametrize("content", ["{not json", '{"header": 1}', '[]', '{"header": HEADER, "entries": {"k": 3}}'])
def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(cache, content):
    header = tuning.TuningCache.header(GPU[0])
    cache.folder.mkdir(parents=True, exist_ok=True)
    path = cache.path(header)
    path.write_text(content.replace("HEADER", json.dumps(header)))
    with pytest.warns(RuntimeWarning, match="ignoring the unreadable tuning cache"):
        assert tuning.TuningCache(cache.folder).get(GPU[0], "forward", fields()) is None
    config = kernel.TUNED_FWD_CONFIGS[1]
    with pytest.warns(RuntimeWarning):
        tuning.TuningCache(cache.folder).put(GPU[0], "forward", fields(), config, finalists=[])
    assert tuning.TuningCache(cache.folder).get(GPU[0], "forward", fields()) == config


def test_mode_names_a_bad_value(monkeypatch):
    monkeypatch.setenv("RBF_LITE_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="RBF_LITE_AUTOTUNE must be one of"):
        tuning.mode()


# ----- the table -----------------------------------------------------------------------------------------

def test_nearest_entry_keeps_the_code_path_and_takes_the_nearest_buckets():
    a, b, c, d = kernel.TUNED_FWD_CONFIGS[:4]
    entries = [entry(a, qb=1024, kb=1024), entry(b, qb=16384, kb=16384, tma=True),
               entry(c, qb=4096, kb=4096, tma=True), entry(d, qb=1024, kb=1024, causal=False)]
    pick = lambda **f: tuning.config_from_dict(tuning.nearest_entry(entries, fields(**f))["config"])  # noqa: E731
    assert pick(qb=4096, kb=2048, tma=True) == c
    assert pick(qb=8192, kb=8192, tma=True) == b          # an octave from 4096 and from 16384: the longer
    assert pick(qb=32768, kb=32768, tma=True) == b
    assert pick(qb=256, kb=256) == a                      # the short path, causal
    assert pick(qb=256, kb=256, causal=False) == d
    assert pick(d=16) == a and pick(d=128) == a           # the nearest head dim when one is not measured
    assert pick(dtype="torch.float16") == a               # a 2-byte dtype stands in for another
    assert tuning.nearest_entry(entries, fields(tma=True, causal=False)) is None


def test_table_entries_fall_back_to_a_gpu_of_the_same_capability(monkeypatch):
    monkeypatch.setattr(tuning, "table", lambda: {"gpus": {"NVIDIA H100 80GB HBM3": {
        "capability": "9.0", "forward": ["h100"], "backward": []}}})
    assert tuning.table_entries("NVIDIA H200", "9.0", "forward") == ["h100"]
    assert tuning.table_entries("NVIDIA A100-SXM4-80GB", "8.0", "forward") == []


def test_the_shipped_table_names_only_candidate_configurations():
    """Every configuration in tuned_configs.json must still be a candidate (a renamed block size or a
    removed tile would otherwise launch something the tuner never measured)."""
    table = json.loads(tuning.TABLE_FILE.read_text())
    assert table["gpus"], "the table should hold at least one measured GPU"
    candidates = {"forward": kernel.TUNED_FWD_CONFIGS, "backward": kernel.TUNED_BWD_CONFIGS}
    for name, measured in table["gpus"].items():
        assert measured["capability"].count(".") == 1, name
        for direction, configs in candidates.items():
            assert measured[direction], f"{name} has no {direction} entries"
            for e in measured[direction]:
                assert set(e["key"]) >= set(tuning.KEY_FIELDS) - {"device", "atomic_dq"}, e["key"]
                assert tuning.config_from_dict(e["config"]) in configs, (name, direction, e["config"])
                for f in e["finalists"]:
                    assert tuning.config_from_dict(f["config"]) in configs and f["time"] >= 1.0


# ----- the tuner's choice --------------------------------------------------------------------------------

def test_default_mode_takes_the_table_and_times_nothing(cache, monkeypatch):
    chosen = kernel.TUNED_FWD_CONFIGS[5]
    launcher = FakeLauncher()
    tuner = forward_tuner(launcher, monkeypatch, {"NVIDIA H100 80GB HBM3": {
        "capability": "9.0", "forward": [entry(chosen)], "backward": []}})
    monkeypatch.setattr(tuner, "_choose", lambda *a: pytest.fail("the default mode must not time candidates"))
    launch(tuner, key(qb=2048, kb=2048))
    launch(tuner, key(qb=2048, kb=2048))
    assert launcher.launched == [chosen, chosen]
    assert tuner.choices()[0]["source"] == "table"


def test_the_cache_comes_before_the_table(cache, monkeypatch):
    table_choice, cached = kernel.TUNED_FWD_CONFIGS[5], kernel.TUNED_FWD_CONFIGS[2]
    cache.put(GPU[0], "forward", tuning.portable_key(key()), cached, finalists=[])
    tuner = forward_tuner(FakeLauncher(), monkeypatch, {GPU[0]: {"capability": "9.0", "forward": [entry(table_choice)]}})
    launch(tuner, key())
    assert tuner.chosen[key()] == cached and tuner.choices()[0]["source"] == "cache"


def test_without_a_table_the_heuristic_takes_the_first_tile_that_compiles(cache, monkeypatch):
    first, second = kernel._heuristic_fwd(128)[:2]
    launcher = FakeLauncher(too_large=[first])
    tuner = forward_tuner(launcher, monkeypatch)
    launch(tuner, key(d=128))
    assert launcher.launched == [second]
    assert tuner.chosen[key(d=128)] == second and tuner.choices()[0]["source"] == "heuristic"


def test_fp32_never_gets_a_tile_too_large_for_it(cache, monkeypatch):
    big = next(c for c in kernel.TUNED_FWD_CONFIGS if not kernel._fits_fwd(c, torch.float32))
    launcher = FakeLauncher()
    tuner = forward_tuner(launcher, monkeypatch, {GPU[0]: {"capability": "9.0", "forward": [entry(big)]}})
    launch(tuner, key(dtype=torch.float32), dtype=torch.float32)
    assert kernel._fits_fwd(launcher.launched[0], torch.float32)


def test_a_new_length_reuses_a_compiled_configuration_within_tolerance(cache, monkeypatch):
    """Bucket 1024's best is a; at 4096 the best is b, but a is within TOLERANCE there and already
    compiled: a new length costs no compile. Beyond the tolerance, the best is compiled."""
    a, b, c = kernel.TUNED_FWD_CONFIGS[:3]
    table = {GPU[0]: {"capability": "9.0", "forward": [
        entry(a, qb=1024, kb=1024),
        entry(b, [(b, 1.0), (a, 1 + tuning.TOLERANCE / 2)], qb=4096, kb=4096),
        entry(c, [(c, 1.0), (a, 1 + 2 * tuning.TOLERANCE)], qb=16384, kb=16384)]}}
    launcher = FakeLauncher()
    tuner = forward_tuner(launcher, monkeypatch, table)
    for n in (1024, 4096, 16384):
        launch(tuner, key(qb=n, kb=n))
    assert launcher.launched == [a, a, c]


def test_full_mode_times_once_and_caches(cache, monkeypatch):
    monkeypatch.setenv("RBF_LITE_AUTOTUNE", "full")
    best = kernel.TUNED_FWD_CONFIGS[4]
    timed = []
    tuner = forward_tuner(FakeLauncher(), monkeypatch)
    monkeypatch.setattr(tuner, "_choose", lambda *a: timed.append(1) or (best, [{"config": tuning.config_dict(best), "time": 1.0}]))
    launch(tuner, key())
    assert timed == [1] and tuner.chosen[key()] == best
    other = forward_tuner(FakeLauncher(), monkeypatch)  # a later process
    monkeypatch.setattr(other, "_choose", lambda *a: pytest.fail("a cached key must not be timed again"))
    launch(other, key())
    assert other.chosen[key()] == best


def test_tune_cli_rejects_malformed_shapes():
    from rbf_lite.tune import parse_shapes
    assert parse_shapes("2,8,1024,64;1,4,300,128") == [(2, 8, 1024, 64), (1, 4, 300, 128)]
    for bad in ("2,8,1024", "a,b,c,d", ";"):
        with pytest.raises(SystemExit, match="--shapes takes"):
            parse_shapes(bad)
