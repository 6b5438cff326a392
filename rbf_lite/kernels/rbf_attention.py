"""Fused scaled-RBF attention in Triton, FlashAttention-style: forward, backward, torch op.

Scores are s_ij = c (2 q_i.k_j - ||k_j||^2), the distance score -c||q_i - k_j||^2 without its
row-constant -c||q_i||^2, which softmax ignores. The kernels work in base 2: the scores are
multiplied by log2(e) in fp32 (after the dot product, so q and k are never rounded again), the
softmax uses exp2, and the saved log-sum-exp is in base 2 too.

Forward, per block of queries: load q once, stream key/value tiles through on-chip memory, keep
a running max and sum (online softmax), never form the N x M score matrix. Key norms ||k_j||^2 are
computed once per key by a small pre-pass, not once per tile (for short sequences, where the
pre-pass would cost a launch, the kernel computes them from its key tiles instead). With causal
masking the key loop is split in two stages: blocks entirely below the diagonal run without any
mask, and only the blocks that straddle the diagonal (or the ragged end of the sequence) pay for it.
On Hopper, long sequences read the inner loops' tiles through TMA tensor descriptors.

Backward, with P = softmax, dP = dO V^T, Delta_i = dO_i . O_i and dS = P (dP - Delta):
    dq_i = 2c sum_j dS_ij k_j
    dk_j = 2c (sum_i dS_ij q_i - k_j sum_i dS_ij)     (the second term comes from -||k_j||^2)
    dv_j = sum_i P_ij dO_i
One launch: each program computes dk, dv for one block of keys (looping over queries) and dq for
one block of queries (looping over keys), so nothing is accumulated atomically. For long sequences
at D <= 64, dq is instead added atomically from the key blocks' loop, which computes P and dS once
instead of twice (5 matrix products instead of 7); see _atomic_dq.

Without normalisation (normalize=False) the same kernels compute out_i = sum_j exp(-c||q_i - k_j||^2) v_j:
each weight is at most 1 and the row's offset is c||q_i||^2 instead of the log-sum-exp. Delta is
then 0, and dq_i gains the term -2c q_i sum_j dS_ij that softmax's zero-sum dS cancels.

Causal masking with N queries and M keys aligns the queries with the *last* N keys: query i sees
keys j <= i + (M - N), as when decoding against a KV cache.

First calls: Triton compiles a kernel at its first launch at each specialisation (integer arguments
such as the lengths by whether 16 divides them, or 1; pointers by alignment), the backward being the
larger kernel: 2-4 s on a GPU host's CPU for the tuned tiles. So a launch never waits for a tuned
kernel to compile. Where it is not compiled yet, the launch queues its compile for a background thread
and runs a stand-in meanwhile: the smallest tile with each loop in one masked stage (STAGED=False),
which compiles two to three times faster and runs slower; the tuned kernel takes over at the first
launch after its compile. A forward that records gradients, on a GPU, when its own kernel is about to
compile, queues (in this order) the backward's stand-in, the tuned forward and backward, both at a
length of the other class (divisible by 16 or not, in the same length bucket), which a later length
finds compiled, then the stand-ins for lengths across LONG_KEYS (another code path, with its pre-pass).
Triton's compiler releases the GIL for much of its work, so the compiles overlap with the calling
thread's (the forward's stand-in). A launch waits for a compile of its kernel under way when it cannot
take a stand-in, and raises its error. Two more of a cold first call's serial steps run beside others:
Triton's hash of its own compiler (_hash_triton_in_background) and each kernel's launcher build
(_build_launcher_alongside). None of this under the interpreter, nor in RBF_LITE_AUTOTUNE=full mode
(which times, so compiles, every candidate); no stand-ins in "0" mode nor when torch is asked for
deterministic algorithms (a stand-in sums in another order than the tuned kernel).
RBF_LITE_BACKGROUND_COMPILE="0" turns it all off ("1", the default, on): each kernel then compiles at
its first launch. finish_background_compiles() waits for what is queued: benchmarks call it before they
time anything.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import traceback
from concurrent.futures import Future

import torch
import triton
import triton.language as tl
try:
    from triton import knobs
except ImportError:  # Triton < 3.4: launches go through compiled[grid](...)
    knobs = None
from triton.runtime import driver
from triton.tools.tensor_descriptor import TensorDescriptor

from ..rbf import _capability
from . import tuning
from .tuning import KEY_FIELDS, Tuner, bucket, mode

LOG2E = 1.4426950408889634
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# Autotuning candidates, in one list per kernel, smallest tiles last.
# maxnreg caps the registers per thread so that more programs share an SM, each with its own barriers:
# at D = 64, (64, 128) tiles with 2 stages read through TMA fit 3 programs per SM at 128 registers
# (without spilling) instead of 2 at 182, a 1-4% faster forward; 8-warp tiles with 2 stages fit 2 per
# SM instead of 1 (at D = 128, (128, 64) with its masked stage first: 7-12% faster than the best tile
# before it, non-causal).
# MASKED_FIRST: whether a non-causal program visits its masked stage (the ragged end) before the whole
# key blocks; causal programs always do (see _masked_first). Faster for some tiles, slower for others.
TUNED_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "MASKED_FIRST": first}, num_warps=w, num_stages=s, maxnreg=r)
    for bm, bn, w, s, r, first in [
        (128, 64, 4, 3, None, False), (128, 64, 4, 4, None, False), (128, 64, 8, 3, None, False),
        (128, 128, 8, 3, None, False), (128, 128, 8, 2, None, False), (128, 128, 8, 2, 128, False),
        (128, 64, 8, 2, 128, True), (64, 128, 4, 3, None, False), (64, 128, 4, 2, 128, False),
        (128, 32, 4, 4, None, False), (64, 64, 4, 3, None, False), (64, 32, 4, 2, None, False)]
]
TUNED_BWD_CONFIGS = [
    triton.Config({"BLOCK_M1": m1, "BLOCK_N1": n1, "BLOCK_M2": m2, "BLOCK_N2": n2}, num_warps=w, num_stages=s)
    for m1, n1, m2, n2, w, s in [(32, 128, 128, 32, 4, 5), (32, 128, 128, 32, 4, 3), (32, 128, 128, 32, 8, 3),
                                 (64, 128, 128, 64, 8, 3), (64, 128, 128, 64, 8, 2), (64, 64, 64, 64, 4, 3),
                                 (64, 64, 64, 64, 4, 2), (32, 64, 64, 32, 4, 3), (32, 64, 64, 32, 4, 2)]
]
if INTERPRETING:
    # One small, lopsided configuration: fast on the CPU, and BLOCK_M != BLOCK_N exercises every
    # boundary case of the stage split.
    FWD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "MASKED_FIRST": False}, num_warps=4, num_stages=1)]
    BWD_CONFIGS = [triton.Config({"BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16},
                                 num_warps=4, num_stages=1)]
elif os.environ.get("RBF_LITE_AUTOTUNE") == "0":
    # No tuning (e.g. tests on a GPU): the smallest configuration, which fits every dtype and D.
    FWD_CONFIGS, BWD_CONFIGS = TUNED_FWD_CONFIGS[-1:], TUNED_BWD_CONFIGS[-1:]
else:
    FWD_CONFIGS, BWD_CONFIGS = TUNED_FWD_CONFIGS, TUNED_BWD_CONFIGS


def _fits_fwd(config: triton.Config, dtype: torch.dtype) -> bool:
    """fp32 tiles are twice as large: keep only the configurations that fit in shared memory."""
    return dtype != torch.float32 or config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] <= 64 * 64


def _fits_bwd(config: triton.Config, dtype: torch.dtype) -> bool:
    return dtype != torch.float32 or config.kwargs["BLOCK_N1"] <= 64


def _pick(configs: list[triton.Config], wanted: list[tuple]) -> list[triton.Config]:
    """The candidates whose (block sizes..., warps, stages) are `wanted`, in that order."""
    by_shape = {(*c.kwargs.values(), c.num_warps, c.num_stages): c for c in configs if not c.maxnreg}
    return [by_shape[w] for w in wanted if w in by_shape]


# For GPUs that the shipped table has not measured (see tuning.py): tiles common to FlashAttention-2
# style kernels on Ampere and Ada, larger first; a tile too large for the GPU's shared memory fails
# to compile and the next is tried. Not measured here: `python -m rbf_lite.tune` times them all.
def _heuristic_fwd(head_dim: int) -> list[triton.Config]:
    first = (128, 64, False, 8, 3) if head_dim > 64 else (128, 64, False, 4, 3)
    return _pick(TUNED_FWD_CONFIGS, [first, (64, 64, False, 4, 3), (64, 32, False, 4, 2)])


def _heuristic_bwd(head_dim: int) -> list[triton.Config]:
    first = [] if head_dim > 64 else [(32, 128, 128, 32, 4, 3), (64, 64, 64, 64, 4, 2)]
    return _pick(TUNED_BWD_CONFIGS, first + [(32, 64, 64, 32, 4, 3), (32, 64, 64, 32, 4, 2)])


class CompiledLauncher:
    """Launches a Triton kernel through its compiled form, without the JIT's per-call binding.

    `kernel[grid](*args)` binds and specialises every argument on each call: ~30 us per launch on
    the H100 host here, against ~10 us for the compiled kernel's own launcher, and the training
    shape and decoding are launch-bound. The compiled kernel is cached under everything Triton
    specialises on, more finely than Triton does (each integer's residue mod 16, or its value when
    it is 0, 1 or beyond int32; each pointer's residue mod 16 and dtype; the constexprs and compile
    options), so a cached kernel is only reused where the JIT would have chosen it too. The first
    call of each key goes through the JIT, which compiles; under the interpreter every call does.

    A kernel can also be compiled ahead of its launch, in a background thread (`ahead`); the launch
    waits for that compile and raises its error.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        params = [] if INTERPRETING else kernel.params
        self.constexpr_names = [p.name for p in params if p.is_constexpr]
        # The compiled launcher takes every argument in signature order: ours end with the constexprs.
        self.direct = not INTERPRETING and all(p.is_constexpr for p in params[len(params) - len(self.constexpr_names):])
        self.compiled: dict[tuple, object] = {}
        # Per specialisation class (_classes), its compile ahead, done or under way, or _DONE after a launch
        # through the JIT: what `ahead` need not compile again, and what a first launch waits for.
        self.classes: dict[tuple, Future] = {}
        if hasattr(os, "register_at_fork"):  # a forked child has no compiling threads: never wait for one there
            os.register_at_fork(after_in_child=self.classes.clear)

    @staticmethod
    def _specialisation(args) -> tuple:
        # Integers first: most arguments are strides and sizes, and this runs on every launch.
        return tuple([(a if a <= 1 or a >= 2 ** 31 else 16 + (a & 15)) if type(a) is int
                      else (a.data_ptr() & 15, a.dtype) if isinstance(a, torch.Tensor)
                      else (a.base.dtype, tuple(a.block_shape)) if isinstance(a, TensorDescriptor)
                      else type(a) for a in args])

    @staticmethod
    def _classes(args) -> tuple:
        """What the JIT compiles a kernel per: an integer's value when it is 0, 1 or beyond int32, else
        whether 16 divides it; a pointer's dtype and whether it is 16-byte aligned. Coarser than
        _specialisation, so that a compile ahead serves every length of its class."""
        return tuple([(a if a <= 1 or a >= 2 ** 31 else "D" if a % 16 == 0 else "i") if type(a) is int
                      else (a.data_ptr() % 16 == 0, a.dtype) if isinstance(a, torch.Tensor)
                      else (a.base.dtype, tuple(a.block_shape)) if isinstance(a, TensorDescriptor)
                      else type(a) for a in args])

    def _class_key(self, args: tuple, constexprs: dict, num_warps: int, num_stages: int, maxnreg: int | None,
                   device: int, values: tuple | None = None) -> tuple:
        """The key of self.classes: the compile options and what the JIT specialises the arguments by."""
        if values is None:
            values = tuple([constexprs[name] for name in self.constexpr_names])
        return values, num_warps, num_stages, maxnreg, device, self._classes(args)

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                 maxnreg: int | None = None, on_compile=None, defer: bool = False) -> bool:
        """Launch; False instead where `defer` allows it (and stand_ins_allowed()) and the kernel is not
        compiled yet: its compile then runs in the background (or already does), and the caller launches
        a stand-in. on_compile: called at the first launch of the kernel's class (see _classes) in this
        process, before it compiles, unless compiled ahead: to start compiling others alongside."""
        if not self.direct:
            self.kernel[grid](*args, **constexprs, **_options(num_warps, num_stages, maxnreg))
            return True
        values = tuple([constexprs[name] for name in self.constexpr_names])
        device = torch.cuda.current_device()
        key = (values, num_warps, num_stages, maxnreg, device, self._specialisation(args))
        compiled = self.compiled.get(key)
        if compiled is None:
            cls = self._class_key(args, constexprs, num_warps, num_stages, maxnreg, device, values)
            ahead = self.classes.get(cls)
            if ahead is None and on_compile is not None:
                on_compile()
                ahead = self.classes.get(cls)
            if defer and (ahead is None or not ahead.done()) and stand_ins_allowed():
                if ahead is None:
                    compile_in_background([self.ahead(grid, args, constexprs, num_warps, num_stages, maxnreg)])
                return False
            if ahead is not None and ahead.exception() is not None:  # (waits for a compile under way)
                del self.classes[cls]  # the next launch compiles again, through the JIT
                raise ahead.exception()
            options = constexprs | _options(num_warps, num_stages, maxnreg)
            if ahead is None:  # it compiles here (a compile ahead has built the launcher and loaded the kernel)
                _triton_hashed()
                _build_launcher_alongside(self.kernel, args, options)
            self.compiled[key] = self.kernel[grid](*args, **options)
            self.classes.setdefault(cls, _DONE)
            return True
        grid = tuple(grid) + (1,) * (3 - len(grid))
        if knobs is not None and not _has_hooks(knobs.runtime.launch_enter_hook) \
                and not _has_hooks(knobs.runtime.launch_exit_hook):
            # What compiled[grid](...) does, minus its per-call closure, launch metadata and empty hooks.
            compiled.run(*grid, torch._C._cuda_getCurrentRawStream(device), compiled.function,
                         compiled.packed_metadata, None, None, None, *args, *values)
        else:  # a profiler's launch hooks: let Triton call them
            compiled[grid](*args, *values)
        return True

    def compiled_for(self, grid: tuple, args: tuple, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                     maxnreg: int | None = None) -> bool:
        """Whether this launch's kernel is compiled (for its class: see _classes), without error; always
        under the interpreter, which compiles nothing."""
        if not self.direct:
            return True
        done = self.classes.get(self._class_key(args, constexprs, num_warps, num_stages, maxnreg,
                                                torch.cuda.current_device()))
        return done is not None and done.done() and done.exception() is None

    def ahead(self, grid: tuple, args: tuple, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
              maxnreg: int | None = None):
        """A job for `compile_in_background`, which fills the JIT's cache as this launch would (`warmup` with
        the same arguments and options, on the current device); the first launch of its class waits for
        it. None where the class is compiled or under way, or the JIT does every launch (the interpreter)."""
        if not self.direct:
            return None
        device = torch.cuda.current_device()
        cls = self._class_key(args, constexprs, num_warps, num_stages, maxnreg, device)
        if cls in self.classes:
            return None
        driver.active.get_current_target()  # Triton's driver, created once here rather than raced for
        options = constexprs | _options(num_warps, num_stages, maxnreg)
        return self.classes, cls, (self.kernel, device, grid, args, options)


_DONE = Future()
_DONE.set_result(None)


# Compiles waiting for the background thread, which runs them in turn (one thread: the first call's
# own compile, on the calling thread, competes with one compile at a time, not with a pile of them).
_QUEUE: list[tuple] = []
_QUEUE_LOCK = threading.Lock()
_THREADS: list[threading.Thread] = []  # the background thread while it runs (it ends when the queue is empty)


def compile_in_background(jobs: list) -> None:
    """Queue CompiledLauncher.ahead's jobs (None: nothing to compile) for the background thread, started
    if it is not running: Triton's compiler releases the GIL for much of its work, so this thread goes
    on meanwhile. Each job's class waits for it from now on, so that no launch waits for a compile that
    never runs."""
    jobs = [job for job in jobs if job is not None]
    if not jobs:
        return
    with _QUEUE_LOCK:
        for classes, cls, warmup in jobs:
            future = Future()
            if classes.setdefault(cls, future) is future:  # (not queued meanwhile by another job)
                _QUEUE.append((future, *warmup))
        if _QUEUE and not _THREADS:
            thread = threading.Thread(target=_compile_queue, name="rbf_lite-compile")
            _THREADS.append(thread)
            thread.start()


def _compile_queue() -> None:
    """The background thread: compile until the queue is empty. It leaves _THREADS under the lock when it
    finds nothing left, so that compile_in_background starts another rather than queue for this one."""
    while True:
        with _QUEUE_LOCK:
            if not _QUEUE:
                _THREADS.remove(threading.current_thread())
                return
            work = _QUEUE.pop(0)
        _compile(*work)
        del work  # (a failed compile's job must not stay referenced: see _compile)


def _reset_queue_after_fork() -> None:
    """A forked child has no background thread (and maybe a lock held by one): start from nothing."""
    global _QUEUE_LOCK
    _QUEUE_LOCK = threading.Lock()
    _QUEUE.clear()
    _THREADS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_queue_after_fork)


_TRITON_KEY: list[threading.Thread] = []  # hashing Triton's compiler: started once per process


def _hash_triton_in_background() -> None:
    """Before its first compile in a process, Triton hashes its own compiler (triton_key, mostly the
    ~400 MB libtriton) for its cache keys: about 0.35 s. A thread started first does it while this one
    builds Triton's driver (a C module that a cold cache compiles); compiles wait for it (_triton_hashed)."""
    if _TRITON_KEY:
        return
    try:
        from triton.runtime.cache import triton_key
    except ImportError:  # another Triton: it hashes on the first compile, as before
        return
    thread = threading.Thread(target=triton_key, name="rbf_lite-triton-key", daemon=True)
    thread.start()
    _TRITON_KEY.append(thread)


def _triton_hashed() -> None:
    for thread in _TRITON_KEY:
        thread.join()


def finish_background_compiles() -> None:
    """Wait for the compiles under way in the background: for benchmarks, which should time nothing
    while a thread of this process competes for the CPU and the GIL."""
    for thread in list(_THREADS):
        thread.join()


def _compile(future: Future, kernel, device: int, grid: tuple, args: tuple, options: dict) -> None:
    """Compile as the launch would, then build the compiled kernel's launcher and load it on the GPU
    (a C module that Triton builds with the system's C compiler on a cold cache, then cuModuleLoad),
    so that the launch only launches; give the outcome to future. An exception keeps its traceback
    but not its frames' variables (the kernel's arguments: tensors), which a failed compile that no
    launch comes for would otherwise keep for good."""
    try:
        _triton_hashed()
        with torch.cuda.device(device):  # (a thread's current device is its own)
            launcher = _build_launcher_alongside(kernel, args, options)
            compiled = kernel.warmup(*args, grid=grid, **options)
            if launcher is not None:
                launcher.join()
            compiled.run  # (`run` builds the launcher, found in the cache now, and loads the kernel)
    except BaseException as e:
        del args
        traceback.clear_frames(e.__traceback__)
        future.set_exception(e)
    else:
        future.set_result(None)


_LAUNCHERS: dict[str, threading.Thread] = {}  # launcher source -> the thread that built it in this process


def _build_launcher_alongside(kernel, args: tuple, options: dict) -> threading.Thread | None:
    """Start building, in a thread, the launcher that Triton builds only after compiling the kernel, at
    its first launch: a C module, which a cold cache compiles with the system's C compiler (~0.4 s). Its
    source depends only on the kernel's signature, which the JIT's binder gives before compiling, so it
    can build while the kernel compiles, and the launch finds it in Triton's cache (or, if it is not
    there yet, builds it as before). Kernels of one signature (other tiles, the other length class)
    share a launcher: its thread is started once and returned again. None where the launcher needs the
    compile's metadata (tensor descriptors) or this Triton's JIT is laid out otherwise (the launch then
    builds it, as before)."""
    try:
        from triton.backends.nvidia import driver as nvidia
        from triton.runtime.build import compile_module_from_src
        *_, backend, binder = kernel.device_caches[torch.cuda.current_device()]
        bound, specialization, parsed = binder(*args, **options)
        _, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, specialization, parsed)
        if any(str(kind).startswith("tensordesc") for kind in signature.values()):
            return None
        source = kernel.ASTSource(kernel, signature, constexprs, attrs)
        code = nvidia.make_launcher(source.constants, source.signature, None)
        build = dict(src=code, name="__triton_launcher", library_dirs=nvidia.library_dirs(),
                     include_dirs=nvidia.include_dirs, libraries=nvidia.libraries)
    except Exception:  # noqa: BLE001 (only a head start: the launch builds what this could not)
        return None
    if code in _LAUNCHERS:
        return _LAUNCHERS[code]

    def run():
        with contextlib.suppress(Exception):  # a failure here is the launch's to build again and report
            compile_module_from_src(**build)
    thread = _LAUNCHERS[code] = threading.Thread(target=run, name="rbf_lite-launcher", daemon=True)
    thread.start()
    return thread


def _options(num_warps: int, num_stages: int, maxnreg: int | None) -> dict:
    """Compile options for the JIT; only its path builds them, not the cached launches."""
    return dict(num_warps=num_warps, num_stages=num_stages) | ({"maxnreg": maxnreg} if maxnreg else {})


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids on the host. `triton.cdiv` is a constexpr function in
    Triton 3.6 (about 5 us per host call under cProfile), called three times per forward+backward."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """`triton.next_power_of_2` on the host without its constexpr-function wrapper (Triton 3.6):
    0.07 us per call instead of 1.9 here, twice per decoding step."""
    return 1 << max(n - 1, 0).bit_length()


def _has_hooks(hook) -> bool:
    """Launch hooks are None or a function in older Triton, a (usually empty) HookChain in newer."""
    return bool(getattr(hook, "calls", hook))


@triton.jit
def _rowdot_kernel(x_ptr, y_ptr, out_ptr, sxb, sxh, sxn, sxd, syb, syh, syn, syd, H, N,
                   D: tl.constexpr, BLOCK: tl.constexpr):
    """out[b, h, n] = sum_d x[b, h, n, d] * y[b, h, n, d] in fp32: key norms and the backward's Delta."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    mask = rows[:, None] < N
    x = tl.load(x_ptr + b.to(tl.int64) * sxb + h * sxh + rows[:, None] * sxn + cols[None, :] * sxd, mask=mask, other=0.0)
    y = tl.load(y_ptr + b.to(tl.int64) * syb + h * syh + rows[:, None] * syn + cols[None, :] * syd, mask=mask, other=0.0)
    tl.store(out_ptr + bh.to(tl.int64) * N + rows, tl.sum(x.to(tl.float32) * y.to(tl.float32), axis=1), mask=rows < N)


ROWDOT = CompiledLauncher(_rowdot_kernel)


def rowdot(x: torch.Tensor, y: torch.Tensor, ahead: bool = False) -> torch.Tensor:
    """(B, H, N, D) x (B, H, N, D) -> (B, H, N) fp32 row-wise dot products, read through strides.
    ahead: return the job that compiles this launch's kernel (see CompiledLauncher.ahead) instead."""
    B, H, N, D = x.shape
    out = torch.empty((B, H, N), device=x.device, dtype=torch.float32)
    block = 64
    launch = ((cdiv(N, block), B * H), (x, y, out, *x.stride(), *y.stride(), H, N), {"D": D, "BLOCK": block})
    if ahead:
        return ROWDOT.ahead(*launch)
    ROWDOT(*launch)
    return out


@triton.jit
def _rows(src, b, h, start, n_rows, stride_n, stride_d,
          BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):
    """Rows [start, start + BLOCK) of one head's (N, D) matrix, rows from n_rows on read as 0.

    TMA: `src` is a (B, H, N, D) tensor descriptor; the copy engine fetches the tile and zero-fills
    past the end itself, with no address arithmetic or mask on the threads. The inner loops load
    through it; tiles loaded once per program use pointers. Otherwise `src` points at the head's
    first row, and MASKED loads check the bound.
    """
    if TMA:
        tile = src.load([b, h, start, 0]).reshape(BLOCK, HEAD_DIM)
    else:
        rows = start + tl.arange(0, BLOCK)
        ptrs = src + rows[:, None] * stride_n + tl.arange(0, HEAD_DIM)[None, :] * stride_d
        if MASKED:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _key_stages(start_m, N_K, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Split the keys a query block visits: [0, lo) needs no mask, [lo, hi) does.

    Unmasked blocks are whole (inside N_K) and, when causal, entirely visible to every row of the
    block (keys j <= start_m + offset); the masked stage holds the diagonal and the ragged end.
    """
    full_blocks_end = (N_K // BLOCK_N) * BLOCK_N
    if CAUSAL:
        lo = tl.minimum(tl.maximum((start_m + causal_offset + 1) // BLOCK_N * BLOCK_N, 0), full_blocks_end)
        hi = tl.minimum(start_m + BLOCK_M + causal_offset, N_K)
    else:
        lo = full_blocks_end
        hi = N_K
    return lo, hi


@triton.jit
def _masked_first(lo, hi, masked_lo, masked_hi, MASKED_FIRST: tl.constexpr):
    """The range of the next loop stage: [lo, hi), or with MASKED_FIRST the masked [masked_lo, masked_hi).

    Causal kernels run their masked stage first. With the unmasked loop first, ptxas (Triton 3.6,
    sm_90a) serialised every wgmma of the kernel (advisory C7515: on the path that skips that loop the
    accumulator registers are written while a product may be in flight), each matrix product waiting
    for the previous one; in that order the causal forward+backward at D = 128 took 13-15% longer and
    the causal forward 1-9%. Non-causal kernels measured no faster in the other order on most tiles
    (D = 64 slower), so there it is the forward configuration's choice (MASKED_FIRST).
    """
    if MASKED_FIRST:
        return masked_lo, masked_hi
    return lo, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_src, v_src, kn_base, store_norms, b, h, stride_kn, stride_kd, stride_vn,
               stride_vd, offs_m, lo, hi, causal_offset, N_K, qk_scale, kn_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               DOT_PRECISION: tl.constexpr, NORMALIZED: tl.constexpr, TMA: tl.constexpr, INLINE_NORMS: tl.constexpr):
    """Accumulate over key blocks [lo, hi); MASKED blocks check bounds and causality.

    NORMALIZED: online softmax (running max m_i and sum l_i). Otherwise m_i is the row's own
    c||q_i||^2 (base 2), s - m_i is the true score -c||q_i - k_j||^2 <= 0, and its exp is summed as is.
    Key norms are read from kn_base, or with INLINE_NORMS computed from each key tile (and written
    to kn_base where store_norms is true).
    """
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_bounds = cols < N_K
        k_tile = _rows(k_src, b, h, start_n, N_K, stride_kn, stride_kd, BLOCK_N, HEAD_DIM, MASKED, TMA)
        if INLINE_NORMS:
            kn = tl.sum(k_tile.to(tl.float32) * k_tile.to(tl.float32), 1)
            if store_norms:
                tl.store(kn_base + cols, kn, mask=in_bounds)
        elif MASKED:
            kn = tl.load(kn_base + cols, mask=in_bounds, other=0.0)
        else:
            kn = tl.load(kn_base + cols)
        s = tl.dot(q, tl.trans(k_tile), input_precision=DOT_PRECISION) * qk_scale - kn[None, :] * kn_scale
        if MASKED:
            visible = in_bounds[None, :]
            if CAUSAL:
                visible = visible & (offs_m[:, None] + causal_offset >= cols[None, :])
            s = tl.where(visible, s, float("-inf"))
        v = _rows(v_src, b, h, start_n, N_K, stride_vn, stride_vd, BLOCK_N, HEAD_DIM, MASKED, TMA)
        if NORMALIZED:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no visible key yet (possible in a decode chunk) keeps m = -inf:
            # subtract 0 instead, so that its exp2(-inf) terms are 0 and not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new
        else:
            p = tl.exp2(s - m_i[:, None])
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(q, k, v, kn, out, lse,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                H, N_Q, N_K, qk_scale, kn_scale,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                NORMALIZED: tl.constexpr, TMA: tl.constexpr, INLINE_NORMS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED_FIRST: tl.constexpr, STAGED: tl.constexpr):
    """k and v are (B, H, N, D) tensor descriptors under TMA, pointers otherwise.

    INLINE_NORMS (short sequences, where a separate pre-pass costs a launch): every program computes
    the norms of the keys it visits, and the last query block, which visits them all, writes kn.
    STAGED: the key loop in an unmasked and a masked stage; otherwise one masked loop, which compiles
    faster (the stand-in, see the module docstring).
    """
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    if CAUSAL:
        # The last query blocks have the most keys to visit: start them first so that the short
        # ones fill the tail of the schedule instead of leaving a few long ones running alone.
        pid_m = tl.num_programs(0) - 1 - pid_m
    b, h = bh // H, bh % H
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if TMA:
        k_src, v_src = k, v
    else:
        k_src, v_src = k + b64 * skb + h64 * skh, v + b64 * svb + h64 * svh
    q_tile = _rows(q + b64 * sqb + h64 * sqh, b, h, start_m, N_Q, sqn, sqd, BLOCK_M, HEAD_DIM, True, False)
    kn_base = kn + bh.to(tl.int64) * N_K

    if NORMALIZED:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    else:
        m_i = tl.sum(q_tile.to(tl.float32) * q_tile.to(tl.float32), 1) * kn_scale
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    causal_offset = N_K - N_Q
    lo, hi = _key_stages(start_m, N_K, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    store_norms = start_m + BLOCK_M >= N_Q
    # Causal rows visit their masked stage (the diagonal) first, others where the configuration
    # says so: see _masked_first.
    if STAGED:
        masked_first: tl.constexpr = CAUSAL or MASKED_FIRST
        first_lo, first_hi = _masked_first(0, lo, lo, hi, masked_first)
        second_lo, second_hi = _masked_first(lo, hi, 0, lo, masked_first)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_tile, k_src, v_src, kn_base, store_norms, b, h, skn, skd, svn,
                                   svd, offs_m, first_lo, first_hi, causal_offset, N_K, qk_scale, kn_scale, BLOCK_N,
                                   HEAD_DIM, masked_first, CAUSAL, DOT_PRECISION, NORMALIZED, TMA, INLINE_NORMS)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_tile, k_src, v_src, kn_base, store_norms, b, h, skn, skd, svn,
                                   svd, offs_m, second_lo, second_hi, causal_offset, N_K, qk_scale, kn_scale, BLOCK_N,
                                   HEAD_DIM, not masked_first, CAUSAL, DOT_PRECISION, NORMALIZED, TMA, INLINE_NORMS)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_tile, k_src, v_src, kn_base, store_norms, b, h, skn, skd, svn,
                                   svd, offs_m, 0, hi, causal_offset, N_K, qk_scale, kn_scale, BLOCK_N, HEAD_DIM,
                                   True, CAUSAL, DOT_PRECISION, NORMALIZED, TMA, INLINE_NORMS)
    if NORMALIZED:
        acc = acc / l_i[:, None]
        m_i = m_i + tl.log2(l_i)
    # What the backward subtracts from a base-2 score to get log2 P: the log-sum-exp, or c||q_i||^2.
    row_ok = offs_m < N_Q
    tl.store(lse + bh.to(tl.int64) * N_Q + offs_m, m_i, mask=row_ok)
    tl.store(out + b64 * sob + h64 * soh + offs_m[:, None] * son + tl.arange(0, HEAD_DIM)[None, :] * sod,
             acc.to(out.dtype.element_ty), mask=row_ok[:, None])


DELTA_ZERO, DELTA_LOAD, DELTA_INLINE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _delta(do_tile, o_base, delta_base, b, h, start, n_rows, son, sod,
           BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, DELTA: tl.constexpr):
    """Delta_i = dO_i . O_i for rows [start, start + BLOCK): 0 without softmax (DELTA_ZERO), read
    from the pre-pass's buffer (DELTA_LOAD), or computed here from the output tile (DELTA_INLINE,
    short sequences, where the pre-pass costs a launch)."""
    rows = start + tl.arange(0, BLOCK)
    if DELTA == DELTA_ZERO:
        delta_i = tl.zeros([BLOCK], dtype=tl.float32)
    elif DELTA == DELTA_LOAD:
        if MASKED:
            delta_i = tl.load(delta_base + rows, mask=rows < n_rows, other=0.0)
        else:
            delta_i = tl.load(delta_base + rows)
    else:
        o_tile = _rows(o_base, b, h, start, n_rows, son, sod, BLOCK, HEAD_DIM, MASKED, False)
        delta_i = tl.sum(do_tile.to(tl.float32) * o_tile.to(tl.float32), 1)
    return delta_i


@triton.jit
def _bwd_dkdv_inner(dk, dv, dsum, k_tile, v_tile, kn, q_src, do_src, o_base, lse_base, delta_base, dq_base, b, h,
                    sqn, sqd, sdon, sdod, son, sod, sgn, sgd, offs_n, lo, hi, causal_offset, N_Q, qk_scale, kn_scale,
                    two_c, BLOCK_M1: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                    DELTA: tl.constexpr):
    """Accumulate dk (before its key-norm correction), dv and sum_i dS_ij over query blocks [lo, hi).

    ATOMIC_DQ: also add these keys' share of dq, 2c dS K, into the fp32 buffer at dq_base.
    """
    offs_m = tl.arange(0, BLOCK_M1)
    for start_m in range(lo, hi, BLOCK_M1):
        rows = start_m + offs_m
        row_ok = rows < N_Q
        q_tile = _rows(q_src, b, h, start_m, N_Q, sqn, sqd, BLOCK_M1, HEAD_DIM, MASKED, TMA)
        do_tile = _rows(do_src, b, h, start_m, N_Q, sdon, sdod, BLOCK_M1, HEAD_DIM, MASKED, TMA)
        if MASKED:
            lse_i = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        else:
            lse_i = tl.load(lse_base + rows)
        delta_i = _delta(do_tile, o_base, delta_base, b, h, start_m, N_Q, son, sod, BLOCK_M1, HEAD_DIM, MASKED, DELTA)
        # Transposed scores: rows are keys, columns are queries.
        st = tl.dot(k_tile, tl.trans(q_tile), input_precision=DOT_PRECISION) * qk_scale - kn[:, None] * kn_scale
        pt = tl.exp2(st - lse_i[None, :])
        if MASKED:
            visible = row_ok[None, :]
            if CAUSAL:
                visible = visible & (rows[None, :] + causal_offset >= offs_n[:, None])
            pt = tl.where(visible, pt, 0.0)
        dv = tl.dot(pt.to(do_tile.dtype), do_tile, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v_tile, tl.trans(do_tile), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta_i[None, :])
        dsum += tl.sum(dst, 1)
        dst_low = dst.to(q_tile.dtype)
        dk = tl.dot(dst_low, q_tile, dk, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq_part = tl.dot(tl.trans(dst_low), k_tile, input_precision=DOT_PRECISION) * two_c
            dq_ptrs = dq_base + rows[:, None] * sgn + tl.arange(0, HEAD_DIM)[None, :] * sgd
            if MASKED:
                tl.atomic_add(dq_ptrs, dq_part, mask=row_ok[:, None], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq_part, sem="relaxed")
    return dk, dv, dsum


@triton.jit
def _bwd_dq_inner(dq, dsum, q_tile, do_tile, lse_i, delta_i, k_src, v_src, kn_base, b, h, skn, skd, svn, svd,
                  offs_m, lo, hi, causal_offset, N_K, qk_scale, kn_scale,
                  BLOCK_N2: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                  CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, NORMALIZED: tl.constexpr, TMA: tl.constexpr):
    """Accumulate sum_j dS_ij k_j over key blocks [lo, hi), and sum_j dS_ij when it is not 0.

    Under softmax sum_j dS_ij = 0, so the -c||q_i||^2 part of the score has no gradient; without
    normalisation it has, and dq_i gets the extra term -2c q_i sum_j dS_ij (added by the caller).
    """
    offs_n = tl.arange(0, BLOCK_N2)
    for start_n in range(lo, hi, BLOCK_N2):
        cols = start_n + offs_n
        k_tile = _rows(k_src, b, h, start_n, N_K, skn, skd, BLOCK_N2, HEAD_DIM, MASKED, TMA)
        v_tile = _rows(v_src, b, h, start_n, N_K, svn, svd, BLOCK_N2, HEAD_DIM, MASKED, TMA)
        if MASKED:
            in_bounds = cols < N_K
            kn = tl.load(kn_base + cols, mask=in_bounds, other=0.0)
        else:
            kn = tl.load(kn_base + cols)
        s = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION) * qk_scale - kn[None, :] * kn_scale
        p = tl.exp2(s - lse_i[:, None])
        if MASKED:
            visible = in_bounds[None, :]
            if CAUSAL:
                visible = visible & (offs_m[:, None] + causal_offset >= cols[None, :])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PRECISION)
        ds = p * (dp - delta_i[:, None])
        if not NORMALIZED:
            dsum += tl.sum(ds, 1)
        dq = tl.dot(ds.to(k_tile.dtype), k_tile, dq, input_precision=DOT_PRECISION)
    return dq, dsum


@triton.jit
def _bwd_kernel(q, k, v, kn, out, do, lse, delta, dq, dk, dv, q_loop, k_loop, v_loop, do_loop,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                sdob, sdoh, sdon, sdod, sgb, sgh, sgn, sgd, sgkb, sgkh, sgkn, sgkd,
                H, N_Q, N_K, qk_scale, kn_scale, two_c,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, NORMALIZED: tl.constexpr,
                TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr, DELTA: tl.constexpr, BLOCK_M1: tl.constexpr,
                BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, STAGED: tl.constexpr):
    """dq is written with strides (sgb..sgd); dk and dv share strides (sgkb..sgkd).

    The inner loops read q, do (part 1) and k, v (part 2) through *_loop: under TMA these are
    tensor descriptors with the loop's block size, otherwise the same pointers as q, k, v and do.
    ATOMIC_DQ: part 1 adds each key block's share of dq into dq, a zeroed fp32 buffer, and part 2
    does not run: dS and P are computed once instead of twice (5 matrix products instead of 7).
    STAGED: each loop in masked and unmasked stages; otherwise one masked loop each (see _fwd_kernel).
    """
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    q_base, k_base = q + b64 * sqb + h64 * sqh, k + b64 * skb + h64 * skh
    v_base, do_base = v + b64 * svb + h64 * svh, do + b64 * sdob + h64 * sdoh
    if TMA:
        q_src, k_src, v_src, do_src = q_loop, k_loop, v_loop, do_loop
    else:
        q_src, k_src, v_src, do_src = q_base, k_base, v_base, do_base
    dq_base = dq + b64 * sgb + h64 * sgh
    o_base = out + b64 * sob + h64 * soh
    kn_base = kn + bh.to(tl.int64) * N_K
    lse_base = lse + bh.to(tl.int64) * N_Q
    delta_base = delta + bh.to(tl.int64) * N_Q
    causal_offset = N_K - N_Q

    # Part 1: dk, dv for keys [start_n, start_n + BLOCK_N1).
    start_n = pid * BLOCK_N1
    if start_n < N_K:
        offs_n = start_n + tl.arange(0, BLOCK_N1)
        k_tile = _rows(k_base, b, h, start_n, N_K, skn, skd, BLOCK_N1, HEAD_DIM, True, False)
        v_tile = _rows(v_base, b, h, start_n, N_K, svn, svd, BLOCK_N1, HEAD_DIM, True, False)
        # Padding keys get an infinite norm: their scores are -inf and their P is exactly 0.
        kn_tile = tl.load(kn_base + offs_n, mask=offs_n < N_K, other=float("inf"))
        dk_acc = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
        dv_acc = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
        dsum = tl.zeros([BLOCK_N1], dtype=tl.float32)
        full_rows_end = (N_Q // BLOCK_M1) * BLOCK_M1
        if CAUSAL:
            # Row i sees key j when i + offset >= j. Rows from `first` on see some of these keys;
            # query blocks starting at or after `all_visible` see all of them.
            first = tl.maximum(start_n - causal_offset, 0) // BLOCK_M1 * BLOCK_M1
            all_visible = (tl.maximum(start_n + BLOCK_N1 - 1 - causal_offset, 0) + BLOCK_M1 - 1) // BLOCK_M1 * BLOCK_M1
        else:
            first = 0
            all_visible = 0
        # Stages: masked blocks across the diagonal, unmasked full blocks, the masked ragged tail; causal
        # without atomic dq runs the tail before the unmasked blocks (see _masked_first).
        if STAGED:
            diag_end = tl.maximum(tl.minimum(all_visible, full_rows_end), first)
            tail_start = tl.maximum(full_rows_end, diag_end)
            TAIL_FIRST: tl.constexpr = CAUSAL and not ATOMIC_DQ
            second_lo, second_hi = _masked_first(diag_end, full_rows_end, tail_start, N_Q, TAIL_FIRST)
            third_lo, third_hi = _masked_first(tail_start, N_Q, diag_end, full_rows_end, TAIL_FIRST)
            dk_acc, dv_acc, dsum = _bwd_dkdv_inner(dk_acc, dv_acc, dsum, k_tile, v_tile, kn_tile, q_src, do_src,
                                                   o_base, lse_base, delta_base, dq_base, b, h, sqn, sqd, sdon,
                                                   sdod, son, sod, sgn, sgd, offs_n, first, diag_end, causal_offset,
                                                   N_Q, qk_scale, kn_scale, two_c, BLOCK_M1, HEAD_DIM, True, CAUSAL,
                                                   DOT_PRECISION, TMA, ATOMIC_DQ, DELTA)
            dk_acc, dv_acc, dsum = _bwd_dkdv_inner(dk_acc, dv_acc, dsum, k_tile, v_tile, kn_tile, q_src, do_src,
                                                   o_base, lse_base, delta_base, dq_base, b, h, sqn, sqd, sdon,
                                                   sdod, son, sod, sgn, sgd, offs_n, second_lo, second_hi,
                                                   causal_offset, N_Q, qk_scale, kn_scale, two_c, BLOCK_M1, HEAD_DIM,
                                                   TAIL_FIRST, CAUSAL, DOT_PRECISION, TMA, ATOMIC_DQ, DELTA)
            dk_acc, dv_acc, dsum = _bwd_dkdv_inner(dk_acc, dv_acc, dsum, k_tile, v_tile, kn_tile, q_src, do_src,
                                                   o_base, lse_base, delta_base, dq_base, b, h, sqn, sqd, sdon,
                                                   sdod, son, sod, sgn, sgd, offs_n, third_lo, third_hi,
                                                   causal_offset, N_Q, qk_scale, kn_scale, two_c, BLOCK_M1, HEAD_DIM,
                                                   not TAIL_FIRST, CAUSAL, DOT_PRECISION, TMA, ATOMIC_DQ, DELTA)
        else:
            dk_acc, dv_acc, dsum = _bwd_dkdv_inner(dk_acc, dv_acc, dsum, k_tile, v_tile, kn_tile, q_src, do_src,
                                                   o_base, lse_base, delta_base, dq_base, b, h, sqn, sqd, sdon,
                                                   sdod, son, sod, sgn, sgd, offs_n, first, N_Q, causal_offset,
                                                   N_Q, qk_scale, kn_scale, two_c, BLOCK_M1, HEAD_DIM, True, CAUSAL,
                                                   DOT_PRECISION, TMA, ATOMIC_DQ, DELTA)
        # The key-norm term of dk: d(-||k_j||^2)/dk_j = -2 k_j, weighted by sum_i dS_ij.
        dk_tile = two_c * (dk_acc - k_tile.to(tl.float32) * dsum[:, None])
        key_block = b64 * sgkb + h64 * sgkh + offs_n[:, None] * sgkn + tl.arange(0, HEAD_DIM)[None, :] * sgkd
        tl.store(dv + key_block, dv_acc.to(dv.dtype.element_ty), mask=(offs_n < N_K)[:, None])
        tl.store(dk + key_block, dk_tile.to(dk.dtype.element_ty), mask=(offs_n < N_K)[:, None])

    # Part 2: dq for queries [start_m, start_m + BLOCK_M2).
    start_m = pid * BLOCK_M2
    if not ATOMIC_DQ and start_m < N_Q:
        offs_m = start_m + tl.arange(0, BLOCK_M2)
        row_ok = offs_m < N_Q
        q_tile = _rows(q_base, b, h, start_m, N_Q, sqn, sqd, BLOCK_M2, HEAD_DIM, True, False)
        do_tile = _rows(do_base, b, h, start_m, N_Q, sdon, sdod, BLOCK_M2, HEAD_DIM, True, False)
        lse_i = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        delta_i = _delta(do_tile, o_base, delta_base, b, h, start_m, N_Q, son, sod, BLOCK_M2, HEAD_DIM, True, DELTA)
        dq_acc = tl.zeros([BLOCK_M2, HEAD_DIM], dtype=tl.float32)
        dsum = tl.zeros([BLOCK_M2], dtype=tl.float32)
        lo, hi = _key_stages(start_m, N_K, causal_offset, BLOCK_M2, BLOCK_N2, CAUSAL)
        if STAGED:
            first_lo, first_hi = _masked_first(0, lo, lo, hi, CAUSAL)
            second_lo, second_hi = _masked_first(lo, hi, 0, lo, CAUSAL)
            dq_acc, dsum = _bwd_dq_inner(dq_acc, dsum, q_tile, do_tile, lse_i, delta_i, k_src, v_src, kn_base, b, h,
                                         skn, skd, svn, svd, offs_m, first_lo, first_hi, causal_offset, N_K, qk_scale,
                                         kn_scale, BLOCK_N2, HEAD_DIM, CAUSAL, CAUSAL, DOT_PRECISION, NORMALIZED, TMA)
            dq_acc, dsum = _bwd_dq_inner(dq_acc, dsum, q_tile, do_tile, lse_i, delta_i, k_src, v_src, kn_base, b, h,
                                         skn, skd, svn, svd, offs_m, second_lo, second_hi, causal_offset, N_K,
                                         qk_scale, kn_scale, BLOCK_N2, HEAD_DIM, not CAUSAL, CAUSAL, DOT_PRECISION,
                                         NORMALIZED, TMA)
        else:
            dq_acc, dsum = _bwd_dq_inner(dq_acc, dsum, q_tile, do_tile, lse_i, delta_i, k_src, v_src, kn_base, b, h,
                                         skn, skd, svn, svd, offs_m, 0, hi, causal_offset, N_K, qk_scale, kn_scale,
                                         BLOCK_N2, HEAD_DIM, True, CAUSAL, DOT_PRECISION, NORMALIZED, TMA)
        if not NORMALIZED:
            dq_acc -= q_tile.to(tl.float32) * dsum[:, None]
        dq_ptrs = dq_base + offs_m[:, None] * sgn + tl.arange(0, HEAD_DIM)[None, :] * sgd
        tl.store(dq_ptrs, (two_c * dq_acc).to(dq.dtype.element_ty), mask=row_ok[:, None])


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products ("ieee"), not TF32: that is what asking for fp32 means."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Stand-ins, launched while a kernel's tuned configuration compiles in the background (see the module
# docstring): the smallest tile, which fits every dtype and head dim, with each loop in one masked stage
# (STAGED=False) instead of two or three. On the 2-core CPU here (sm_90 builds) the backward compiles in
# 0.7 s instead of 2.3 s (B2 H8 N2048 D64 causal, the table's tile), the forward in 0.4 s. They read
# through pointers, never TMA descriptors (TMA=False overrides the launch's choice): the launcher of a
# kernel that takes descriptors can only be built after its compile (see _build_launcher_alongside).
STAND_IN_FWD, STAND_IN_BWD = (triton.Config(c.kwargs | {"STAGED": False, "TMA": False}, num_warps=c.num_warps,
                                            num_stages=c.num_stages) for c in (FWD_CONFIGS[-1], BWD_CONFIGS[-1]))
FWD_TUNER = Tuner("forward", CompiledLauncher(_fwd_kernel), FWD_CONFIGS, _fits_fwd, _heuristic_fwd, STAND_IN_FWD)
BWD_TUNER = Tuner("backward", CompiledLauncher(_bwd_kernel), BWD_CONFIGS, _fits_bwd, _heuristic_bwd, STAND_IN_BWD)


_SAME_DEVICE = contextlib.nullcontext()


def _device_of(t: torch.Tensor):
    """Launch on the tensor's GPU, whatever the current device is (multi-GPU processes). Switching
    costs microseconds each way: only when the tensor is elsewhere."""
    if not t.is_cuda or t.device.index == torch.cuda.current_device():
        return _SAME_DEVICE
    return torch.cuda.device(t.device)


# Long sequences (LONG_KEYS keys or more) take the path built for GPU-bound work: key norms and Delta
# in pre-pass launches, and two choices made per call, each "auto" (by the H100 measurements in
# results/bench/NOTES.md, v7, v10, v12), "1" (wherever possible: tests, the interpreter included) or
# "0" (never):
# - TMA (Hopper and newer) for the inner loops' tiles. (v7 measured the D = 64 forward 6% slower with
#   it; v10's 2-stage tile capped at 128 registers, which spills without TMA, made it 1-4% faster than
#   the best tile without.) Building descriptors costs host time.
# - dq by atomic adds (see _atomic_dq), at D <= 64 (6% faster forward+backward there; 10% slower at
#   D = 128, where the extra (BLOCK_M1, D) fp32 tile costs registers).
# Shorter sequences are launch-bound: one launch per direction, no descriptors (v12: time per call,
# host included, 0.5-0.8x the long path's at 1024 keys and 0.5-1.0x at 2048, forward and forward+backward).
TMA = os.environ.get("RBF_LITE_TMA", "auto")
ATOMIC_DQ = os.environ.get("RBF_LITE_ATOMIC_DQ", "auto")
LONG_KEYS = 4096


def _use_tma(auto: bool, *tensors: torch.Tensor) -> bool:
    """Whether the kernels read these (B, H, N, D) tensors through TMA descriptors: in "auto" mode
    when `auto` says so; and always only if TMA can address them: unit stride along D, every other
    stride and the base on 16 bytes (no zero strides), a GPU with TMA."""
    if TMA == "0" or (TMA == "auto" and (INTERPRETING or not auto)):
        return False
    first = tensors[0]
    if first.is_cuda:
        if _capability(first.device.index)[0] < 9:
            return False
    elif not INTERPRETING:
        return False
    return all(t.stride(3) == 1 and t.data_ptr() % 16 == 0
               and all(st > 0 and st * t.element_size() % 16 == 0 for st in t.stride()[:3]) for t in tensors)


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A descriptor for (1, 1, rows, D) tiles of a (B, H, N, D) tensor."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[3]])


def _tuning_key(n_q, n_k, q, causal, normalize, tma):
    """In the order of tuning.KEY_FIELDS (the backward's key adds atomic_dq)."""
    return (bucket(n_q), bucket(n_k), q.shape[3], causal, normalize, tma, q.dtype, q.device)


def _forward(q, k, v, causal: bool, scale: float, normalize: bool, backward: bool = False, ahead=None,
             stand_in: bool = False):
    """Output; per row the base-2 log-sum-exp (or c||q_i||^2 without normalisation); ||k_j||^2.

    backward: a backward follows (autograd), which a first launch compiles meanwhile (_compile_ahead).
    ahead: lengths (N, M) at which to compile the kernel, not launch it: returns the job for
    compile_in_background. The outputs are then meta tensors (the same dtypes and strides, aligned)
    and the key norms' pre-pass does not run. One function and one call for both, so that a compile
    ahead specialises the kernel as its launch will. stand_in: compile ahead the stand-in (see Tuner.ahead).
    """
    B, H, N, D = q.shape
    M = k.shape[2]
    device = q.device
    if ahead is not None:
        (N, M), device = ahead, "meta"
    out = torch.empty((B, H, N, D), device=device, dtype=q.dtype)
    lse = torch.empty((B, H, N), device=device, dtype=torch.float32)
    tma = _use_tma(M >= LONG_KEYS, k, v)
    # Launch-bound: the kernel computes (and writes) the key norms itself. Not together with TMA, a
    # combination "auto" never makes and that crashed ptxas (Triton 3.6, D = 128) when forced.
    inline_norms = M < LONG_KEYS and not tma
    strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride())
    with _device_of(q):
        kn = torch.empty((B, H, M), device=device, dtype=torch.float32) if inline_norms or ahead is not None \
            else rowdot(k, k)

        def args(meta):
            tiles = meta.get("TMA", tma)  # (a stand-in's meta says False)
            keys = (_descriptor(k, meta["BLOCK_N"]), _descriptor(v, meta["BLOCK_N"])) if tiles else (k, v)
            return (q, *keys, kn, out, lse, *strides, H, N, M, 2.0 * scale * LOG2E, scale * LOG2E)

        job = (FWD_TUNER.launch if ahead is None else functools.partial(FWD_TUNER.ahead, stand_in=stand_in))(
            _tuning_key(N, M, q, causal, normalize, tma), q.dtype, lambda meta: (cdiv(N, meta["BLOCK_M"]), B * H),
            args, on_compile=(lambda: _compile_ahead(q, k, v, out, lse, kn, causal, scale, normalize)) if backward
            else None, HEAD_DIM=D, CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype), NORMALIZED=normalize,
            TMA=tma, INLINE_NORMS=inline_norms, STAGED=True)
    return (out, lse, kn) if ahead is None else job


def _atomic_dq(n_keys: int, head_dim: int, normalize: bool) -> bool:
    """Accumulate dq with atomic adds from the key blocks' loop (one pass over the scores) instead of
    a second loop over keys per query block. Not for short sequences (it adds a zero-fill and a cast
    to a launch-bound backward), nor without normalisation, nor when torch is asked for
    deterministic algorithms (the adds land in any order)."""
    if not normalize or torch.are_deterministic_algorithms_enabled():
        return False
    return ATOMIC_DQ == "1" or (ATOMIC_DQ == "auto" and n_keys >= LONG_KEYS and head_dim <= 64)


def _backward(dout, q, k, v, out, lse, kn, causal: bool, scale: float, normalize: bool, ahead=None,
              stand_in: bool = False):
    """(dq, dk, dv). The kernel's scores and lse are in base 2, so P = exp2(s2 - lse2) is the true
    softmax, and dS = P (dP - Delta) is the gradient with respect to the natural-unit score.

    ahead, stand_in: as in _forward. dout is then the forward's output, standing in for a gradient laid out
    like it (as autograd passes it to most models; another layout compiles when the backward
    launches), and lse stands in for Delta's buffer (also fp32).
    """
    B, H, N, D = q.shape
    M = k.shape[2]
    device = q.device
    if ahead is not None:
        (N, M), device = ahead, "meta"
    atomic = _atomic_dq(M, D, normalize)
    dq = torch.zeros((B, H, N, D), device=device, dtype=torch.float32) if atomic else \
        torch.empty((B, H, N, D), device=device, dtype=q.dtype)
    dk = torch.empty((B, H, M, D), device=device, dtype=k.dtype)
    dv = torch.empty_like(dk)
    tma = _use_tma(max(N, M) >= LONG_KEYS, q, k, v, dout)
    strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *dq.stride(), *dk.stride())
    # Delta_i = dO_i . O_i comes from the softmax's normalisation (without it, it is 0): a pre-pass
    # for long sequences, computed in the kernel where a launch costs more than the repeated work.
    long = max(N, M) >= LONG_KEYS or tma  # (with TMA: see inline_norms in _forward)
    delta_mode = (DELTA_ZERO if not normalize else DELTA_LOAD if long else DELTA_INLINE).value
    with _device_of(q):
        # (lse: a placeholder, never read; or, ahead, a stand-in)
        delta = rowdot(out, dout) if delta_mode == DELTA_LOAD.value and ahead is None else lse

        def args(meta):
            if meta.get("TMA", tma):  # (a stand-in's meta says False) the loops' tiles: queries in blocks of
                # BLOCK_M1 (part 1), keys of BLOCK_N2 (part 2)
                loops = (_descriptor(q, meta["BLOCK_M1"]), _descriptor(k, meta["BLOCK_N2"]),
                         _descriptor(v, meta["BLOCK_N2"]), _descriptor(dout, meta["BLOCK_M1"]))
            else:
                loops = (q, k, v, dout)
            return (q, k, v, kn, out, dout, lse, delta, dq, dk, dv, *loops, *strides,
                    H, N, M, 2.0 * scale * LOG2E, scale * LOG2E, 2.0 * scale)

        def grid(meta):
            blocks = cdiv(M, meta["BLOCK_N1"])
            return (blocks if atomic else max(blocks, cdiv(N, meta["BLOCK_M2"])), B * H)

        job = (BWD_TUNER.launch if ahead is None else functools.partial(BWD_TUNER.ahead, stand_in=stand_in))(
            _tuning_key(N, M, q, causal, normalize, tma) + (atomic,), q.dtype, grid, args,
            reset=dq.zero_ if atomic else None, HEAD_DIM=D, CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype),
            NORMALIZED=normalize, TMA=tma, ATOMIC_DQ=atomic, DELTA=delta_mode, STAGED=True)
    if ahead is not None:
        return job
    if atomic:
        del delta  # freed before the low-precision copy of dq is made: the peak stays at SDPA's
        dq = dq.to(q.dtype)
    return dq, dk, dv


def _other_class(n: int) -> int | None:
    """A length in n's bucket that Triton specialises the other way: divisible by 16 if n is not, and
    the reverse. None for 1, which Triton makes a constant."""
    if n == 1:
        return None
    return n - 1 if n % 16 == 0 else n + 16 - n % 16


def _across(n: int) -> tuple[int, int]:
    """Two lengths on the other side of LONG_KEYS from n (other kernels: pre-passes, TMA, atomic dq), one
    divisible by 16 and one not."""
    base = LONG_KEYS if n < LONG_KEYS else LONG_KEYS - 16
    return base, base + 1


def background_compiles() -> str:
    """RBF_LITE_BACKGROUND_COMPILE (see the module docstring): "1" (unset) or "0"."""
    value = os.environ.get("RBF_LITE_BACKGROUND_COMPILE", "1") or "1"
    if value not in ("1", "0"):
        raise ValueError(f"RBF_LITE_BACKGROUND_COMPILE must be 1 or 0, got {value!r}")
    return value


def stand_ins_allowed() -> bool:
    """Whether a launch whose kernel is not compiled yet may run the stand-in (see the module docstring):
    with background compiles on; not in the tuner's "0" mode (one fixed configuration) nor in
    `python -m rbf_lite.tune`'s compile workers; not when torch is asked for deterministic algorithms,
    since the stand-in sums in another order than the kernel that takes over."""
    return background_compiles() == "1" and mode() != "0" and tuning.COMPILE_SHARE is None \
        and not torch.are_deterministic_algorithms_enabled()


def _compile_ahead(q, k, v, out, lse, kn, causal, scale, normalize):
    """At a forward's first launch at a new specialisation, before it compiles: compile in the background
    what will follow (_ahead_jobs). See the module docstring."""
    if background_compiles() == "1" and not INTERPRETING and q.is_cuda:
        _hash_triton_in_background()
        compile_in_background(_ahead_jobs(q, k, v, out, lse, kn, causal, scale, normalize))


def _ahead_jobs(q, k, v, out, lse, kn, causal, scale, normalize) -> list:
    """In the order needed: the backward's stand-in, which the backward will launch unless the tuned
    backward is compiled by then; the tuned forward and backward, which take over from the stand-ins; the
    tuned forward and backward at lengths of the other class (_other_class), which a later length in that
    class finds compiled; then the stand-ins for lengths across LONG_KEYS (_across: the keys, and the
    queries with them when there are as many), and, onto the long path, its pre-pass kernel, so that a
    later length on that side runs at once."""
    def forward(lengths, stand_in=False):
        return _forward(q, k, v, causal, scale, normalize, ahead=lengths, stand_in=stand_in)

    def backward(lengths, stand_in=False):  # (the output stands in for its gradient: see _backward)
        return _backward(out, q, k, v, out, lse, kn, causal, scale, normalize, ahead=lengths, stand_in=stand_in)

    lengths = n, m = q.shape[2], k.shape[2]
    stand_ins = stand_ins_allowed()
    jobs = [backward(lengths, stand_in=True)] if stand_ins else []
    jobs += [forward(lengths), backward(lengths)]
    other = tuple(map(_other_class, lengths))
    if None not in other:
        jobs += [forward(other), backward(other)]
    for crossed in ([(m2 if n == m else n, m2) for m2 in _across(m)] if stand_ins else []):
        jobs += [forward(crossed, stand_in=True), backward(crossed, stand_in=True)]
        if max(crossed) >= LONG_KEYS:  # the long path's pre-passes: key norms, and Delta (rows of the output)
            rows = (torch.empty((*k.shape[:2], length, k.shape[3]), device="meta", dtype=k.dtype)
                    for length in sorted(set(crossed)))
            jobs += [rowdot(x, x, ahead=True) for x in rows]
    return jobs


@torch.library.custom_op("rbf_lite::rbf_attention_fwd", mutates_args=())
def rbf_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                      normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: the output, plus for the backward each row's base-2 offset and ||k_j||^2."""
    return _forward(q, k, v, causal, scale, normalize)


@rbf_attention_fwd.register_fake
def _(q, k, v, causal, scale, normalize):
    B, H, N, D = q.shape
    return (q.new_empty((B, H, N, D)), q.new_empty((B, H, N), dtype=torch.float32),
            q.new_empty((B, H, k.shape[2]), dtype=torch.float32))


@torch.library.custom_op("rbf_lite::rbf_attention_bwd", mutates_args=())
def rbf_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, kn: torch.Tensor, causal: bool, scale: float,
                      normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: (dq, dk, dv) from the forward's output, row offsets and key norms."""
    return _backward(dout, q, k, v, out, lse, kn, causal, scale, normalize)


@rbf_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, kn, causal, scale, normalize):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, normalize = inputs
    out, lse, kn = output
    ctx.save_for_backward(q, k, v, out, lse, kn)
    ctx.causal, ctx.scale, ctx.normalize = causal, scale, normalize


def _backward_rule(ctx, dout, _dlse, _dkn):
    q, k, v, out, lse, kn = ctx.saved_tensors
    dq, dk, dv = rbf_attention_bwd(dout, q, k, v, out, lse, kn, ctx.causal, ctx.scale, ctx.normalize)
    return dq, dk, dv, None, None, None


rbf_attention_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


class _EagerRBFAttention(torch.autograd.Function):
    """The same kernels for eager mode, without the custom op's dispatch (tens of us per call)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, normalize):
        out, lse, kn = _forward(q, k, v, causal, scale, normalize, backward=True)
        ctx.save_for_backward(q, k, v, out, lse, kn)
        ctx.causal, ctx.scale, ctx.normalize = causal, scale, normalize
        return out

    @staticmethod
    def backward(ctx, dout):
        return (*_backward(dout, *ctx.saved_tensors, ctx.causal, ctx.scale, ctx.normalize), None, None, None)


def rbf_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                     normalize: bool = True) -> torch.Tensor:
    """The fused attention; inputs are assumed validated by `rbf_lite.rbf_attention`.

    Under torch.compile the custom op is traced as one node; in eager mode an autograd.Function
    runs the same forward and backward with less overhead per call, and a call that records no
    gradient (inference, generation) skips autograd altogether.
    """
    if torch.compiler.is_compiling():
        return rbf_attention_fwd(q, k, v, causal, scale, normalize)[0]
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return _forward(q, k, v, causal, scale, normalize)[0]
    return _EagerRBFAttention.apply(q, k, v, causal, scale, normalize)
