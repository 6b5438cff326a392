"""How a kernel configuration is chosen without timing: the disk cache, the shipped table, the heuristic;
and how kernels are compiled ahead of their launch, in the background."""
import contextlib
import gc
import json
import threading
import time
import types
import weakref

import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources, PTXASError

from rbf_lite import rbf_attention_reference
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

    def __call__(self, grid, args, constexprs, num_warps, num_stages, maxnreg, on_compile=None, defer=False):
        config = triton.Config({k: constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "MASKED_FIRST")},
                               num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)
        if config in self.too_large:
            raise OutOfResources(300_000, 232_448, "shared memory")
        self.launched.append(config)
        return True


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


# ----- compiling ahead, in the background ------------------------------------------------------------------

class FakeCompiled:
    """Stands for a Triton CompiledKernel: its `run` property builds the launcher and loads the binary,
    once (recorded in `loads`), raising `fail` there if given (as an OutOfResources would)."""

    def __init__(self, jit, kwargs, fail=None):
        self.jit, self.kwargs, self.fail, self.loaded = jit, kwargs, fail, False

    @property
    def run(self):
        if self.fail is not None:
            raise self.fail
        if not self.loaded:
            self.loaded = True
            self.jit.loads.append(self.kwargs)
        return lambda *args: None


class FakeJIT:
    """Stands for a Triton JITFunction: records its compiles ahead (warmup), the loads of what they
    compiled, and its launches through the JIT. A warmup waits for `gate` if given, and raises `fail`
    where fail_if(kwargs) says so; load_fail is raised by the compiled kernel's load instead."""

    params = []

    def __init__(self, gate=None, fail=None, fail_if=lambda kwargs: True, load_fail=None):
        self.gate, self.fail, self.fail_if, self.load_fail = gate, fail, fail_if, load_fail
        self.warmups, self.launches, self.loads, self.direct = [], [], [], []

    def warmup(self, *args, grid, **kwargs):
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail is not None and self.fail_if(kwargs):
            raise self.fail
        self.warmups.append((args, kwargs))
        return FakeCompiled(self, kwargs, self.load_fail)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs)) or FakeLaunched(self, kwargs)


class FakeLaunched(types.SimpleNamespace):
    """What a launch through a FakeJIT compiled: later launches of its specialisation call its `run`
    directly (recorded in the JIT's `direct`)."""

    def __init__(self, jit, kwargs):
        super().__init__(function=None, packed_metadata=None)
        self.run = lambda *args: jit.direct.append(kwargs)


@pytest.fixture
def fake_gpu(monkeypatch):
    """CompiledLauncher's direct path on the CPU: device 0, no CUDA calls, no Triton driver."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    no_driver = types.SimpleNamespace(active=types.SimpleNamespace(get_current_target=lambda: None))
    monkeypatch.setattr(kernel, "driver", no_driver)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 0, raising=False)


def direct_launcher(jit, constexpr_names=("BLOCK",)):
    launcher = kernel.CompiledLauncher(jit)
    launcher.direct, launcher.constexpr_names = True, list(constexpr_names)
    return launcher


def test_a_launch_waits_for_its_compile_ahead_then_takes_it_from_the_jit(fake_gpu):
    """The compile ahead gets the very arguments and options of the launch (so Triton keys both alike);
    a launch of the same class (here other lengths, still divisible by 16) waits for it."""
    gate = threading.Event()
    jit = FakeJIT(gate=gate)
    launcher = direct_launcher(jit)
    x = torch.empty(4, 16)
    kernel.compile_in_background([launcher.ahead((1,), (x, 1024, 7), {"BLOCK": 32}, 4, 3, None)])
    assert launcher.ahead((1,), (x, 2048, 7), {"BLOCK": 32}, 4, 3, None) is None, "the same class is under way"
    other_class = launcher.ahead((1,), (x, 1000, 7), {"BLOCK": 32}, 4, 3, None)
    assert other_class is not None
    launch = threading.Thread(target=launcher, args=((1,), (x, 1008, 5), {"BLOCK": 32}, 4, 3, None))
    launch.start()
    time.sleep(0.2)
    assert jit.launches == [], "the launch must wait for the compile of its class"
    gate.set()
    launch.join(10)
    options = {"BLOCK": 32, "num_warps": 4, "num_stages": 3}
    assert jit.warmups == [((x, 1024, 7), options)]
    assert jit.loads == [options], "the thread builds the launcher and loads the kernel, not the launch"
    assert jit.launches == [((x, 1008, 5), options)]
    kernel.finish_background_compiles()


def test_a_kernel_that_compiles_ahead_but_cannot_load_fails_its_launch(fake_gpu):
    """Loading can fail where compiling did not (more shared memory than this GPU has): the launch
    raises that error, as a launch through the JIT would, so that the tuner can try the next tile."""
    jit = FakeJIT(load_fail=OutOfResources(300_000, 232_448, "shared memory"))
    launcher = direct_launcher(jit)
    x = torch.empty(4, 16)
    kernel.compile_in_background([launcher.ahead((1,), (x, 64), {"BLOCK": 32})])
    kernel.finish_background_compiles()
    with pytest.raises(OutOfResources):
        launcher((1,), (x, 64), {"BLOCK": 32})
    assert jit.launches == []


def test_an_error_compiling_ahead_is_raised_by_the_launch_that_needs_it(fake_gpu):
    """Not swallowed: the launch raises it, and the next launch compiles again. The failed compile keeps
    no tensor alive (its traceback's frames are cleared)."""
    jit = FakeJIT(fail=ValueError("no such tile"))
    launcher = direct_launcher(jit)
    x = torch.empty(4, 16)
    alive = weakref.ref(x)
    kernel.compile_in_background([launcher.ahead((1,), (x, 64), {"BLOCK": 32})])
    kernel.finish_background_compiles()
    del x
    gc.collect()
    assert alive() is None, "a failed compile ahead should not keep its arguments"
    y = torch.empty(4, 16)
    with pytest.raises(ValueError, match="no such tile"):
        launcher((1,), (y, 32), {"BLOCK": 32})
    assert jit.launches == []
    launcher((1,), (y, 32), {"BLOCK": 32})
    assert len(jit.launches) == 1


def test_a_tile_that_fails_to_compile_ahead_falls_back_as_at_launch(fake_gpu, cache, monkeypatch):
    """ptxas refusing the heuristic's first tile in the background: the launch raises its error where
    the tuner catches it, and the next tile is launched instead."""
    first, second = kernel._heuristic_fwd(128)[:2]
    jit = FakeJIT(fail=PTXASError("too many registers"),
                  fail_if=lambda kwargs: kwargs["BLOCK_M"] == first.kwargs["BLOCK_M"]
                  and kwargs["BLOCK_N"] == first.kwargs["BLOCK_N"] and kwargs["num_warps"] == first.num_warps)
    launcher = direct_launcher(jit, ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "MASKED_FIRST"))
    tuner = forward_tuner(launcher, monkeypatch)
    grid, args = (lambda meta: (1,)), (lambda meta: (torch.empty(8),))
    kernel.compile_in_background([tuner.ahead(key(d=128), torch.bfloat16, grid, args, HEAD_DIM=128)])
    tuner.launch(key(d=128), torch.bfloat16, grid, args, HEAD_DIM=128)
    assert [kwargs["BLOCK_M"] for _, kwargs in jit.launches] == [second.kwargs["BLOCK_M"]]
    assert tuner.chosen[key(d=128)] == second


STAND_IN = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "MASKED_FIRST": False, "STAGED": False}, num_warps=4,
                         num_stages=2)


def stand_in_tuner(jit, monkeypatch, table_config=None):
    """A forward tuner with a stand-in, launching through a FakeJIT; the table (if given) picks table_config."""
    launcher = direct_launcher(jit, ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "MASKED_FIRST", "STAGED"))
    tuner = forward_tuner(launcher, monkeypatch,
                          table_config and {GPU[0]: {"capability": "9.0", "forward": [entry(table_config)]}})
    tuner.stand_in = STAND_IN
    return tuner


def tiles(jit) -> tuple[list, list]:
    """(BLOCK_M, STAGED) of each launch a FakeJIT recorded: through the JIT (compiling), then direct."""
    return ([(kw["BLOCK_M"], kw["STAGED"]) for _, kw in jit.launches],
            [(kw["BLOCK_M"], kw["STAGED"]) for kw in jit.direct])


def test_a_launch_runs_the_stand_in_until_its_kernel_has_compiled_in_the_background(fake_gpu, cache, monkeypatch):
    """The first launch queues the chosen tile's compile and runs the stand-in; so do launches while that
    compile runs (the stand-in then compiled, launched directly); the first launch after it takes over,
    building nothing (the compile ahead built its launcher). on_compile runs once, at the first launch."""
    chosen = kernel.TUNED_FWD_CONFIGS[5]
    gate = threading.Event()
    jit = FakeJIT(gate=gate)
    tuner = stand_in_tuner(jit, monkeypatch, chosen)
    grid, args = (lambda meta: (1,)), (lambda meta: (torch.empty(8), 1024))
    builds, first_launches = [], []
    monkeypatch.setattr(kernel, "_build_launcher_alongside", lambda jit, args, options: builds.append(options["STAGED"]))
    run = lambda: tuner.launch(key(), torch.bfloat16, grid, args, HEAD_DIM=64, STAGED=True,  # noqa: E731
                               on_compile=lambda: first_launches.append(1))
    run()
    run()
    assert tiles(jit) == ([(16, False)], [(16, False)])
    assert jit.warmups == [] and tuner.chosen[key()] == chosen and tuner.choices()[0]["source"] == "table"
    gate.set()
    kernel.finish_background_compiles()
    assert [(kw["BLOCK_M"], kw["STAGED"]) for _, kw in jit.warmups] == [(chosen.kwargs["BLOCK_M"], True)]
    run()
    run()
    tuned = (chosen.kwargs["BLOCK_M"], True)
    assert tiles(jit) == ([(16, False), tuned], [(16, False), tuned])
    assert sorted(builds) == [False, True] and first_launches == [1]


def test_a_tile_that_fails_to_compile_after_its_stand_in_ran_gives_way_to_the_next(fake_gpu, cache, monkeypatch):
    """The chosen tile's compile in the background fails (ptxas): the next launch raises nothing, plans
    again without that tile, and runs the stand-in while the next tile compiles."""
    chosen = kernel.TUNED_FWD_CONFIGS[5]
    jit = FakeJIT(fail=PTXASError("too many registers"),
                  fail_if=lambda kwargs: kwargs["BLOCK_N"] == chosen.kwargs["BLOCK_N"] and kwargs["STAGED"]
                  and kwargs["num_warps"] == chosen.num_warps and kwargs["num_stages"] == chosen.num_stages)
    tuner = stand_in_tuner(jit, monkeypatch, chosen)
    grid, args = (lambda meta: (1,)), (lambda meta: (torch.empty(8), 1024))
    for _ in range(3):
        tuner.launch(key(), torch.bfloat16, grid, args, HEAD_DIM=64, STAGED=True)
        kernel.finish_background_compiles()
    following = kernel._heuristic_fwd(64)[0]
    assert tuner.chosen[key()] == following and tuner.failed[key()] == {chosen}
    assert tiles(jit) == ([(16, False), (following.kwargs["BLOCK_M"], True)], [(16, False)])


@pytest.mark.parametrize("setting", ["RBF_LITE_BACKGROUND_COMPILE=0", "RBF_LITE_AUTOTUNE=0", "deterministic",
                                     "compile worker"])
def test_no_stand_in_where_it_is_not_allowed(setting, fake_gpu, cache, monkeypatch):
    """Off with background compiles, in the fixed-configuration mode, in the tuner's compile workers, and
    under torch's deterministic algorithms (a stand-in sums in another order): the launch compiles its own
    kernel and runs it."""
    assert kernel.stand_ins_allowed()
    if setting == "deterministic":
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    elif setting == "compile worker":
        monkeypatch.setattr(tuning, "COMPILE_SHARE", (0, 2))
    else:
        monkeypatch.setenv(*setting.split("="))
    assert not kernel.stand_ins_allowed()
    chosen = kernel.TUNED_FWD_CONFIGS[5]
    jit = FakeJIT()
    tuner = stand_in_tuner(jit, monkeypatch, chosen)
    tuner.launcher(((1,)), (torch.empty(8), 1024), {"HEAD_DIM": 64, "STAGED": True} | chosen.kwargs, chosen.num_warps,
                   chosen.num_stages, defer=True)
    assert tiles(jit) == ([(chosen.kwargs["BLOCK_M"], True)], []) and jit.warmups == []


def test_the_stand_in_compiles_ahead_only_where_it_will_run(fake_gpu, cache, monkeypatch):
    chosen = kernel.TUNED_FWD_CONFIGS[5]
    jit = FakeJIT()
    tuner = stand_in_tuner(jit, monkeypatch, chosen)
    grid, args = (lambda meta: (1,)), (lambda meta: (torch.empty(8), 1024))
    ahead = lambda: tuner.ahead(key(), torch.bfloat16, grid, args, stand_in=True, HEAD_DIM=64, STAGED=True)  # noqa: E731
    job = ahead()
    assert job is not None and job[1][0] == (64, 16, 16, False, False), "the stand-in's constexprs"
    kernel.compile_in_background([tuner.ahead(key(), torch.bfloat16, grid, args, HEAD_DIM=64, STAGED=True)])
    kernel.finish_background_compiles()
    assert ahead() is None, "the chosen tile is compiled: no stand-in will run"


def test_background_compiles_run_in_turn_on_one_thread(fake_gpu):
    """Jobs queued by several calls run in the order queued, on one thread at a time, each class once; a
    job queued after the thread has finished starts another."""
    order, running, most = [], [], []

    class Recording(FakeJIT):
        def warmup(self, *args, grid, **kwargs):
            running.append(1)
            most.append(len(running))
            order.append((kwargs["BLOCK"], threading.current_thread().name))
            try:
                return super().warmup(*args, grid=grid, **kwargs)
            finally:
                running.pop()
    gate = threading.Event()
    launcher = direct_launcher(Recording(gate=gate))
    x = torch.empty(4, 16)
    kernel.compile_in_background([launcher.ahead((1,), (x, 64), {"BLOCK": 16}), launcher.ahead((1,), (x, 64), {"BLOCK": 32})])
    kernel.compile_in_background([launcher.ahead((1,), (x, 64), {"BLOCK": 64})])
    time.sleep(0.1)
    gate.set()
    kernel.finish_background_compiles()
    kernel.compile_in_background([launcher.ahead((1,), (x, 64), {"BLOCK": 128})] * 2)  # one class, once
    kernel.finish_background_compiles()
    assert [block for block, _ in order] == [16, 32, 64, 128] and max(most) == 1
    assert {thread for _, thread in order} == {"rbf_lite-compile"}


def test_the_tuner_compiles_ahead_the_configuration_it_will_launch(cache, monkeypatch):
    """The first candidate of the plan (here the table's), or the one already chosen; nothing while
    every candidate is timed ("full" mode) or compiled by the tuner's workers."""
    chosen = kernel.TUNED_FWD_CONFIGS[5]
    launcher = FakeLauncher()
    launcher.ahead = lambda grid, args, constexprs, *options: (constexprs["BLOCK_M"], *options)
    tuner = forward_tuner(launcher, monkeypatch, {GPU[0]: {"capability": "9.0", "forward": [entry(chosen)]}})
    expected = (chosen.kwargs["BLOCK_M"], chosen.num_warps, chosen.num_stages, chosen.maxnreg)
    ahead = lambda: tuner.ahead(key(), torch.bfloat16, lambda meta: (1,), lambda meta: (), HEAD_DIM=64)  # noqa: E731
    assert ahead() == expected
    launch(tuner, key())
    assert ahead() == expected and launcher.launched == [chosen]
    monkeypatch.setattr(tuning, "COMPILE_SHARE", (0, 2))
    assert ahead() is None
    monkeypatch.setattr(tuning, "COMPILE_SHARE", None)
    monkeypatch.setenv("RBF_LITE_AUTOTUNE", "full")
    assert ahead() is None


def test_background_compiles_setting(monkeypatch):
    monkeypatch.delenv("RBF_LITE_BACKGROUND_COMPILE", raising=False)
    assert kernel.background_compiles() == "1"
    for value in ("0", "1"):
        monkeypatch.setenv("RBF_LITE_BACKGROUND_COMPILE", value)
        assert kernel.background_compiles() == value
    monkeypatch.setenv("RBF_LITE_BACKGROUND_COMPILE", "yes")
    with pytest.raises(ValueError, match="RBF_LITE_BACKGROUND_COMPILE must be"):
        kernel.background_compiles()


TUNED_AHEAD = ["fwd (48, 48)", "bwd (48, 48)", "fwd (47, 47)", "bwd (47, 47)"]


@pytest.mark.parametrize("setting, interpreting, cuda, expected", [
    ("1", False, True, ["bwd (48, 48) stand-in", *TUNED_AHEAD, "fwd (4096, 4096) stand-in",
                        "bwd (4096, 4096) stand-in", "rowdot 4096", "fwd (4097, 4097) stand-in",
                        "bwd (4097, 4097) stand-in", "rowdot 4097"]),
    ("deterministic", False, True, TUNED_AHEAD),  # no stand-ins
    ("0", False, True, []),
    ("1", True, True, []),      # the interpreter: every launch goes through the JIT, nothing to compile ahead
    ("1", False, False, []),    # not on a GPU
])
def test_what_a_forward_compiles_ahead(setting, interpreting, cuda, expected, monkeypatch):
    jobs = []
    if setting == "deterministic":
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        setting = "1"
    monkeypatch.setenv("RBF_LITE_BACKGROUND_COMPILE", setting)
    monkeypatch.setattr(kernel, "INTERPRETING", interpreting)
    monkeypatch.setattr(kernel, "compile_in_background", lambda js: jobs.extend(js))
    monkeypatch.setattr(kernel, "_forward", lambda *a, ahead, stand_in=False: f"fwd {ahead}" + " stand-in" * stand_in)
    monkeypatch.setattr(kernel, "_backward", lambda *a, ahead, stand_in=False: f"bwd {ahead}" + " stand-in" * stand_in)
    monkeypatch.setattr(kernel, "rowdot", lambda x, y, ahead: f"rowdot {x.shape[2]}")
    q = types.SimpleNamespace(is_cuda=cuda, shape=(1, 2, 48, 16), dtype=torch.bfloat16)
    kernel._compile_ahead(q, q, q, None, None, None, True, 0.25, True)
    assert jobs == expected


def test_only_a_forward_that_autograd_will_differentiate_compiles_ahead(device, monkeypatch):
    passed = []
    launch_forward = kernel.FWD_TUNER.launch
    monkeypatch.setattr(kernel.FWD_TUNER, "launch",
                        lambda *a, on_compile=None, **kw: passed.append(on_compile) or launch_forward(*a, **kw))
    q, k, v = (torch.randn(1, 1, 16, 16, device=device, requires_grad=True) for _ in range(3))
    kernel.rbf_attention_op(q, k, v, True, 0.25)
    with torch.no_grad():
        kernel.rbf_attention_op(q, k, v, True, 0.25)
    kernel.rbf_attention_op(q.detach(), k.detach(), v.detach(), True, 0.25)
    assert callable(passed[0]) and passed[1:] == [None, None]


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 47, 48, 1000, 1024, 1025, 4095, 4096, 16383, 16384, 100_000])
def test_the_other_length_class_stays_in_the_bucket(n):
    other = kernel._other_class(n)
    if n == 1:
        assert other is None  # Triton makes 1 a constant: no class to pair with
        return
    assert tuning.bucket(other) == tuning.bucket(n) and other != 1
    assert (other % 16 == 0) != (n % 16 == 0)


def jit_specialisation(args) -> list:
    """What Triton's JIT keys a launch's arguments on (its own code, run on the CPU)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    return [native_specialize_impl(CUDABackend, a, False, True, True) for a in args]


def launched(tuner, monkeypatch, stand_ins=None) -> list:
    """Each launch of `tuner`: (key, grid, arguments, constexprs) at the configuration it ran; and in
    `stand_ins`, if given, (key, grid, arguments, constexprs) that its stand-in would have launched."""
    seen, launch_ = [], tuner.launch

    def record(key, dtype, grid, args, reset=None, on_compile=None, **constexprs):
        launch_(key, dtype, grid, args, reset=reset, on_compile=on_compile, **constexprs)
        meta = tuner.chosen[key].kwargs
        seen.append((key, grid(meta), jit_specialisation(args(meta)), constexprs))
        if stand_ins is not None:
            meta = tuner.stand_in.kwargs
            stand_ins.append((key, grid(meta), jit_specialisation(args(meta)), constexprs))
    monkeypatch.setattr(tuner, "launch", record)
    return seen


def ahead_of(tuner, monkeypatch) -> list:
    """Each compile ahead asked of `tuner`, as `launched` records launches (nothing compiles)."""
    seen = []

    def record(key, dtype, grid, args, reset=None, on_compile=None, stand_in=False, **constexprs):
        config = tuner.stand_in if stand_in else tuner.chosen.get(key) or tuner._plan(key, dtype)[0][0]
        meta = config.kwargs  # (what Tuner.ahead takes)
        seen.append((key, grid(meta), jit_specialisation(args(meta)), constexprs, stand_in))
    monkeypatch.setattr(tuner, "ahead", record)
    return seen


@pytest.mark.parametrize("tma, atomic, normalize, long", [
    ("0", "0", True, False), ("0", "0", False, False), ("0", "0", True, True), ("1", "0", True, False),
    ("1", "1", True, False), ("0", "1", True, True)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths, later", [((48, 48), (33, 33)), ((17, 50), (32, 48))])
def test_the_kernels_compiled_ahead_are_the_kernels_launched(lengths, later, causal, tma, atomic, normalize, long,
                                                             device, monkeypatch):
    """What a forward compiles ahead, specialised by Triton's own code, is what the forward and backward
    launch (and, for the backward's stand-in, its key and constexprs), and at the other length class what a later length of that class launches (forward and
    backward): the same tuning key, constexprs and argument specialisations (and grid, at the same
    lengths). Both sides run _forward and _backward; this catches what the ahead path does
    differently (the gradient, the buffers, the lengths, the pre-passes)."""
    monkeypatch.setattr(kernel, "TMA", tma)
    monkeypatch.setattr(kernel, "ATOMIC_DQ", atomic)
    monkeypatch.setattr(kernel, "LONG_KEYS", 16 if long else 10 ** 9)
    fwd_launches, bwd_launches = launched(kernel.FWD_TUNER, monkeypatch), launched(kernel.BWD_TUNER, monkeypatch)
    fwd_ahead, bwd_ahead = ahead_of(kernel.FWD_TUNER, monkeypatch), ahead_of(kernel.BWD_TUNER, monkeypatch)

    def forward_backward(n, m):
        q = torch.randn(1, 2, n, 16, device=device, dtype=torch.float16)  # (not fp32: atomic dq's buffer is fp32)
        k, v = (torch.randn(1, 2, m, 16, device=device, dtype=torch.float16) for _ in range(2))
        out, lse, kn = kernel._forward(q, k, v, causal, 0.25, normalize)
        kernel._backward(torch.randn_like(out), q, k, v, out, lse, kn, causal, 0.25, normalize)
        return q, k, v, out, lse, kn

    inputs = forward_backward(*lengths)
    assert not any(kernel._ahead_jobs(*inputs, causal, 0.25, normalize))  # (all recorded, none to run)
    forward_backward(*later)
    assert [kernel._other_class(n) for n in lengths] != list(later)  # another length of the same class
    assert [a[4] for a in bwd_ahead] == [True, False, False, True, True]
    assert [a[4] for a in fwd_ahead] == [False, False, True, True]
    assert bwd_ahead[1][:4] == bwd_launches[0] and fwd_ahead[0][:4] == fwd_launches[0]
    stand_in = bwd_ahead[0]  # the backward's stand-in: the same key and constexprs, its own tile
    assert (stand_in[0], stand_in[3]) == (bwd_launches[0][0], bwd_launches[0][3])
    for ahead, launch_ in ((fwd_ahead[1], fwd_launches[1]), (bwd_ahead[2], bwd_launches[1])):
        assert (ahead[0], ahead[2], ahead[3]) == (launch_[0], launch_[2], launch_[3])


@pytest.mark.parametrize("lengths, crossed", [((48, 48), [(64, 64), (65, 65)]), ((17, 50), [(17, 64), (17, 65)]),
                                              ((80, 80), [(48, 48), (49, 49)]), ((33, 96), [(33, 48), (33, 49)])])
def test_the_stand_ins_compiled_ahead_across_the_long_path_are_the_stand_ins_a_crossing_launches(
        lengths, crossed, device, monkeypatch):
    """A first call on one side of LONG_KEYS compiles ahead the stand-ins for lengths on the other side
    (other kernels: pre-passes, atomic dq); each is the stand-in that a call at that length would launch:
    the same key, constexprs, grid and argument specialisations. Onto the long path, so is its pre-pass."""
    monkeypatch.setattr(kernel, "LONG_KEYS", 64)
    fwd_stand_ins, bwd_stand_ins = [], []
    launched(kernel.FWD_TUNER, monkeypatch, fwd_stand_ins), launched(kernel.BWD_TUNER, monkeypatch, bwd_stand_ins)
    fwd_ahead, bwd_ahead = ahead_of(kernel.FWD_TUNER, monkeypatch), ahead_of(kernel.BWD_TUNER, monkeypatch)
    rowdots = {"ahead": [], "launched": []}  # the long path's pre-pass kernel: (grid, arguments, constexprs)

    class RecordingRowdot:
        def __call__(self, grid, args, constexprs):
            rowdots["launched"].append((grid, jit_specialisation(args), constexprs))
            rowdot_launcher(grid, args, constexprs)

        def ahead(self, grid, args, constexprs):
            rowdots["ahead"].append((grid, jit_specialisation(args), constexprs))
    rowdot_launcher = kernel.ROWDOT
    monkeypatch.setattr(kernel, "ROWDOT", RecordingRowdot())

    def forward_backward(n, m):
        q = torch.randn(1, 2, n, 16, device=device, dtype=torch.float16)
        k, v = (torch.randn(1, 2, m, 16, device=device, dtype=torch.float16) for _ in range(2))
        out, lse, kn = kernel._forward(q, k, v, False, 0.25, True)
        kernel._backward(torch.randn_like(out), q, k, v, out, lse, kn, False, 0.25, True)
        return q, k, v, out, lse, kn

    inputs = forward_backward(*lengths)
    rowdots["launched"].clear()
    kernel._ahead_jobs(*inputs, False, 0.25, True)
    for lengths2 in crossed:  # (the keys across 64, one length of each class; the queries with them if as many)
        forward_backward(*lengths2)
    assert [a[4] for a in fwd_ahead[-2:]] == [True, True] and [a[4] for a in bwd_ahead[-2:]] == [True, True]
    for ahead, launch_ in [*zip(fwd_ahead[-2:], fwd_stand_ins[1:]), *zip(bwd_ahead[-2:], bwd_stand_ins[1:])]:
        assert ahead[:4] == launch_
    # Onto the long path: its pre-passes (key norms, Delta) launch kernels of the classes compiled ahead.
    classes = lambda records: {repr((spec, sorted(c.items()))) for _, spec, c in records}  # noqa: E731
    assert classes(rowdots["launched"]) == classes(rowdots["ahead"]) and (rowdots["ahead"] == []) == (lengths[1] >= 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles for and launches on a GPU")
def test_on_a_gpu_launches_find_their_kernels_compiled_ahead(monkeypatch):
    """A first forward+backward runs the stand-ins, the backward's compiled in the background only, never
    at its launch; the next call runs the tuned kernels, compiled meanwhile; then a length of the other
    class compiles nothing at all. Fresh launchers and JIT caches
    (Triton's disk cache may hold the kernels: loading them counts as a compile here too)."""
    from collections import defaultdict
    from triton import knobs
    for name in ("FWD_TUNER", "BWD_TUNER"):
        old = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, tuning.Tuner(old.direction, kernel.CompiledLauncher(old.launcher.kernel),
                                                       old.configs, old.fits, old.heuristic, old.stand_in))
        monkeypatch.setattr(old.launcher.kernel, "device_caches", defaultdict(old.launcher.kernel.create_binder))
    monkeypatch.setenv("RBF_LITE_BACKGROUND_COMPILE", "1")
    monkeypatch.setattr(kernel, "_LAUNCHERS", {})  # launchers built by earlier tests in this process
    compiles = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook",
                        lambda **kw: compiles.append((kw["fn"].name, threading.current_thread().name)))
    import triton.backends.nvidia.driver as nvidia
    import triton.runtime.build as build
    launchers = []  # (thread, launcher source) of every launcher build asked for, built ahead or at a load

    def recording(original):
        def compile_module_from_src(src, name, *args, **kwargs):
            if name == "__triton_launcher":
                launchers.append((threading.current_thread().name, src))
            return original(src, name, *args, **kwargs)
        return compile_module_from_src
    monkeypatch.setattr(build, "compile_module_from_src", recording(build.compile_module_from_src))
    monkeypatch.setattr(nvidia, "compile_module_from_src", recording(nvidia.compile_module_from_src))

    def first_call(n):
        q, k, v = (torch.randn(2, 3, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        out = kernel.rbf_attention_op(q, k, v, True, 0.125)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        kernel.finish_background_compiles()
        want = rbf_attention_reference(q.detach().float(), k.detach().float(), v.detach().float(), True, 0.125)
        torch.testing.assert_close(out.float(), want, atol=4e-2, rtol=4e-2)

    def staged(tuner) -> list:
        """STAGED of each kernel launched through the JIT so far: False for a stand-in, True for a tuned one."""
        index = tuner.launcher.constexpr_names.index("STAGED")
        return sorted(key[0][index] for key in tuner.launcher.compiled)

    first_call(96)
    # The forward's stand-in on this thread; the backward's stand-in, the tuned kernels at this length
    # and at one of the other class, then the stand-ins and the pre-pass at two lengths across LONG_KEYS,
    # in the background.
    assert [name for name, thread in compiles if thread == "MainThread"] == ["_fwd_kernel"]
    assert [name for name, thread in compiles if thread != "MainThread"] == [
        "_bwd_kernel", "_fwd_kernel", "_bwd_kernel", "_fwd_kernel", "_bwd_kernel"] + [
        "_fwd_kernel", "_bwd_kernel", "_rowdot_kernel"] * 2
    assert staged(kernel.FWD_TUNER) == staged(kernel.BWD_TUNER) == [False], "the first call ran the stand-ins"
    # Each kernel's launcher was built alongside its compile, from the very source its load then asked for.
    ahead = {src for thread, src in launchers if thread == "rbf_lite-launcher"}
    loaded = [src for thread, src in launchers if thread != "rbf_lite-launcher"]
    assert len(loaded) == len(compiles) and set(loaded) == ahead
    compiles.clear()
    first_call(96)
    assert staged(kernel.FWD_TUNER) == staged(kernel.BWD_TUNER) == [False, True], "the tuned kernels took over"
    first_call(90)
    assert staged(kernel.FWD_TUNER) == staged(kernel.BWD_TUNER) == [False, True, True]
    assert compiles == []


def test_compiles_wait_for_the_hash_of_triton_started_in_the_background(fake_gpu, monkeypatch):
    """Triton hashes its compiler before its first compile; started in a thread, that hash runs while the
    driver is built, and every compile (ahead or at a launch) starts after it, never hashing twice."""
    import triton.runtime.cache
    gate, hashes = threading.Event(), []

    def slow_triton_key():
        assert gate.wait(10)
        hashes.append(1)
    monkeypatch.setattr(triton.runtime.cache, "triton_key", slow_triton_key)
    monkeypatch.setattr(kernel, "_TRITON_KEY", [])
    kernel._hash_triton_in_background()
    kernel._hash_triton_in_background()  # once per process
    assert len(kernel._TRITON_KEY) == 1
    jit = FakeJIT()
    launcher = direct_launcher(jit)
    x = torch.empty(4, 16)
    kernel.compile_in_background([launcher.ahead((1,), (x, 64), {"BLOCK": 32})])
    launch = threading.Thread(target=launcher, args=((1,), (x, 33), {"BLOCK": 32}))
    launch.start()
    time.sleep(0.2)
    assert jit.warmups == [] and jit.launches == [], "nothing compiles before Triton is hashed"
    gate.set()
    launch.join(10)
    kernel.finish_background_compiles()
    assert hashes == [1] and len(jit.warmups) == 1 and len(jit.launches) == 1
