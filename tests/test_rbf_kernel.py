"""The fused Triton kernels against a float64 reference: outputs and all three gradients.

On a CPU-only machine these run the real kernels in Triton's interpreter (see conftest.py). Inputs
are fresh random draws each run; every comparison is a relative Frobenius error with a tolerance
stated per dtype:
- fp32: the kernel multiplies in true fp32 ("ieee" dot): 2e-5.
- fp16: P and dS are rounded to fp16 before their matmuls, as in FlashAttention: 1e-2.
- bf16: 8 bits of mantissa instead of 11: 4e-2 (GPU only, see test_bfloat16_on_gpu).
The float64 reference receives the same (already rounded) inputs, so the error measures the
kernel, not the input rounding. Where the exact gradient is zero (dq and dk with a single visible
key: the softmax is constant 1), a relative error is meaningless and the test bounds the absolute
error by ZERO_GRAD_ATOL instead.
"""
import math

import pytest
import torch

from rbf_lite import rbf_attention, rbf_attention_reference, rbf_decode, triton_available

TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}
ZERO_GRAD_ATOL = 1e-4
needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton can run neither on a GPU nor interpreted")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite values in the kernel's result"
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_against_float64(q, k, v, causal, scale=None, tol=None, normalize=True):
    """Run kernel forward + backward and the float64 reference; assert every relative error < tol."""
    tol = TOL[q.dtype] if tol is None else tol
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = rbf_attention(q, k, v, causal=causal, scale=scale, backend="triton", normalize=normalize)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = rbf_attention_reference(q64, k64, v64, causal=causal, scale=scale, normalize=normalize)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert got.shape == want.shape, name
        if want.norm() < 1e-9 * want.numel() ** 0.5:
            assert got.abs().max() < ZERO_GRAD_ATOL, f"{name} should be zero, got max |{name}| = {got.abs().max():.2e}"
            continue
        err = rel_err(got, want)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e} ({q.dtype}, N={q.shape[2]}, causal={causal})"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("n", [1, 17, 100, 257])
def test_matches_float64_reference(n, head_dim, causal, dtype, device):
    q, k, v = (torch.randn(2, 2, n, head_dim, device=device, dtype=dtype) for _ in range(3))
    check_against_float64(q, k, v, causal)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("n", [1, 17, 100])
def test_unnormalized_matches_float64_reference(n, head_dim, causal, dtype, device):
    """sum_j exp(-c||q_i - k_j||^2) v_j, no softmax. Inputs are scaled by 0.3 so that typical
    weights exp(-c||q - k||^2) stay well inside fp16's normal range (above 6e-5); with unit-variance
    inputs at D=128 they would be ~1e-6, and fp16 P would carry few significant bits."""
    q, k, v = (0.3 * torch.randn(2, 2, n, head_dim, device=device, dtype=dtype) for _ in range(3))
    check_against_float64(q, k, v, causal, normalize=False)


def test_unnormalized_weights_are_bounded_by_one():
    """Each weight is exp(-distance) <= 1, equal to 1 for a key on the query; rows need not sum to 1.
    In float64: in float32 a far key's weight (c||q - k||^2 ~ 100 here) can underflow to 0, and the
    expanded form's rounding puts the weight of the key on the query at 1 - 2e-6 (both seen in 1% of draws)."""
    q = torch.randn(1, 1, 6, 16, dtype=torch.float64)
    k = torch.cat([q[:, :, :1], 3 * torch.randn(1, 1, 5, 16, dtype=torch.float64)], dim=2)  # key 0 sits on query 0
    _, w = rbf_attention_reference(q, k, k, causal=False, return_weights=True, normalize=False)
    assert (w <= 1).all() and (w > 0).all()
    torch.testing.assert_close(w[0, 0, 0, 0], torch.tensor(1.0, dtype=torch.float64))
    assert not torch.allclose(w.sum(-1), torch.ones(6, dtype=torch.float64))


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
def test_strided_views_of_one_projection(causal, device):
    """q, k, v sliced out of one (B, N, 3, H, D) projection, as a fused qkv Linear produces them."""
    B, N, H, D = 2, 45, 3, 32
    qkv = torch.randn(B, N, 3, H, D, device=device)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    check_against_float64(q, k, v, causal)


@needs_triton
def test_non_unit_last_stride(device):
    """A head dimension that is not the fastest-moving axis must still be read correctly."""
    q, k, v = (torch.randn(1, 2, 32, 33, device=device).transpose(-1, -2) for _ in range(3))
    assert q.stride(-1) != 1
    check_against_float64(q, k, v, causal=True)


@needs_triton
@pytest.mark.parametrize("long", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_q, n_k", [(1, 1), (33, 33), (20, 90)])
def test_short_and_long_sequence_paths(n_q, n_k, causal, normalize, long, device, monkeypatch):
    """Short sequences compute key norms and Delta inside the kernels (a pre-pass would cost a launch),
    long ones in pre-passes; the threshold is lowered here so that small inputs take the long path.
    The forward's key norms, saved for the backward, are checked directly too."""
    from rbf_lite.kernels import rbf_attention as kernel
    monkeypatch.setattr(kernel, "LONG_KEYS", 16 if long else 10 ** 9)
    q = 0.5 * torch.randn(2, 3, n_q, 32, device=device)
    k, v = (0.5 * torch.randn(2, 3, n_k, 32, device=device) for _ in range(2))
    check_against_float64(q, k, v, causal, normalize=normalize)
    _, _, key_norms = kernel._forward(q, k, v, causal, 0.2, normalize)
    torch.testing.assert_close(key_norms, k.square().sum(-1), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("tma", ["0", "1"])
@pytest.mark.parametrize("masked_first", [False, True])
@pytest.mark.parametrize("n_q, n_k", [(17, 17), (40, 71), (48, 64)])
def test_forward_stage_order(n_q, n_k, masked_first, tma, device, monkeypatch):
    """A non-causal forward may visit the ragged end of the keys before the whole blocks (a tuning
    choice, MASKED_FIRST): either order computes the same attention, including with no ragged end."""
    from triton import Config
    from rbf_lite.kernels import rbf_attention as kernel
    config = Config({"BLOCK_M": 32, "BLOCK_N": 16, "MASKED_FIRST": masked_first}, num_warps=4, num_stages=1)
    monkeypatch.setattr(kernel, "FWD_TUNER", kernel.Tuner("forward", kernel.CompiledLauncher(kernel._fwd_kernel), [config],
                                                             kernel._fits_fwd, kernel._heuristic_fwd))
    monkeypatch.setattr(kernel, "TMA", tma)
    q = torch.randn(2, 2, n_q, 32, device=device)
    k, v = (torch.randn(2, 2, n_k, 32, device=device) for _ in range(2))
    check_against_float64(q, k, v, causal=False)
    assert kernel.FWD_TUNER.chosen, "the forward should have run with the forced configuration"


@needs_triton
@pytest.mark.parametrize("path", ["short", "long", "long, atomic dq"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_q, n_k", [(1, 1), (17, 17), (100, 100), (40, 71), (5, 90)])
def test_stand_in_kernels_match_float64_reference(n_q, n_k, causal, normalize, path, device, monkeypatch,
                                                  tma_descriptors):
    """The stand-ins, which run while the tuned kernels compile (each loop in one masked stage: STAGED
    False), compute the same attention and gradients on every code path; they read through pointers even
    where TMA is asked for (here everywhere), building no descriptor."""
    from rbf_lite.kernels import rbf_attention as kernel
    for name, stand_in, fits, heuristic in (("FWD_TUNER", kernel.STAND_IN_FWD, kernel._fits_fwd, kernel._heuristic_fwd),
                                            ("BWD_TUNER", kernel.STAND_IN_BWD, kernel._fits_bwd, kernel._heuristic_bwd)):
        assert stand_in.kwargs["STAGED"] is False and stand_in.kwargs["TMA"] is False
        old = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, kernel.Tuner(old.direction, old.launcher, [stand_in], fits, heuristic))
    monkeypatch.setattr(kernel, "LONG_KEYS", 16 if path != "short" else 10 ** 9)
    monkeypatch.setattr(kernel, "ATOMIC_DQ", "1" if "atomic" in path else "0")
    q = 0.5 * torch.randn(2, 3, n_q, 32, device=device)
    k, v = (0.5 * torch.randn(2, 3, n_k, 32, device=device) for _ in range(2))
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # heads interleaved in memory: a strided view
    check_against_float64(q, k, v, causal, normalize=normalize)
    assert kernel.FWD_TUNER.chosen and kernel.BWD_TUNER.chosen, "the stand-ins should have run"
    assert tma_descriptors == []


@pytest.fixture
def tma_descriptors(monkeypatch):
    """Force the TMA path (the interpreter runs it too) and record each descriptor's tile rows."""
    from rbf_lite.kernels import rbf_attention as kernel
    monkeypatch.setattr(kernel, "TMA", "1")
    rows = []
    make = kernel._descriptor
    monkeypatch.setattr(kernel, "_descriptor", lambda t, n: rows.append(n) or make(t, n))
    return rows


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("n_q, n_k", [(1, 1), (17, 17), (100, 100), (40, 71)])
def test_tma_path_matches_float64_reference(n_q, n_k, head_dim, causal, dtype, device, tma_descriptors):
    """The inner loops' tiles come through tensor descriptors, which zero-fill past each head's end."""
    q = torch.randn(2, 2, n_q, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(2, 2, n_k, head_dim, device=device, dtype=dtype) for _ in range(2))
    check_against_float64(q, k, v, causal)
    assert len(tma_descriptors) == 6, "forward (k, v) and backward (q, k, v, dout) should each use TMA"


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
def test_tma_path_reads_heads_interleaved_in_memory(causal, device, tma_descriptors):
    """(B, N, H, D) activations viewed as (B, H, N, D): a descriptor takes any 16-byte strides."""
    q, k, v = (torch.randn(2, 45, 3, 32, device=device).transpose(1, 2) for _ in range(3))
    check_against_float64(q, k, v, causal)
    assert tma_descriptors, "these strides suit TMA: the descriptors should have been used"


@needs_triton
def test_tma_path_falls_back_to_pointers(device, tma_descriptors):
    """Layouts TMA can't address (D not the unit-stride axis, strides off 16 bytes) use pointers."""
    q, k, v = (torch.randn(1, 2, 32, 33, device=device).transpose(-1, -2) for _ in range(3))
    check_against_float64(q, k, v, causal=True)
    q, k, v = (torch.randn(1, 2, 20, 17, device=device)[..., :16] for _ in range(3))  # rows 68 bytes apart
    check_against_float64(q, k, v, causal=False)
    assert tma_descriptors == []


@needs_triton
@pytest.mark.parametrize("tma", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_q, n_k", [(1, 1), (17, 17), (100, 100), (40, 71)])
def test_atomic_dq_matches_float64_reference(n_q, n_k, causal, dtype, tma, device, monkeypatch):
    """dq accumulated by atomic adds from the key blocks' loop (long sequences) instead of its own loop."""
    from rbf_lite.kernels import rbf_attention as kernel
    monkeypatch.setattr(kernel, "ATOMIC_DQ", "1")
    monkeypatch.setattr(kernel, "TMA", tma)
    assert kernel._atomic_dq(n_k, 32, normalize=True)
    q = torch.randn(2, 2, n_q, 32, device=device, dtype=dtype)
    k, v = (torch.randn(2, 2, n_k, 32, device=device, dtype=dtype) for _ in range(2))
    check_against_float64(q, k, v, causal)


def test_atomic_dq_only_where_it_pays(monkeypatch):
    """Short sequences keep the single launch; D = 128 (slower with it), the non-softmax variant and
    deterministic mode keep the second loop (atomic adds land in any order)."""
    from rbf_lite.kernels import rbf_attention as kernel
    monkeypatch.setattr(kernel, "ATOMIC_DQ", "auto")
    long = kernel.LONG_KEYS
    assert kernel._atomic_dq(long, 64, normalize=True)
    assert not kernel._atomic_dq(long - 1, 64, normalize=True)
    assert not kernel._atomic_dq(long, 128, normalize=True)
    assert not kernel._atomic_dq(long, 64, normalize=False)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not kernel._atomic_dq(long, 64, normalize=True)


def test_tuner_times_the_fastest_again_before_choosing(monkeypatch):
    """Two short rounds keep each candidate's best time (one too large is dropped); the fastest
    FINALISTS are timed again, longer, and that decides; the finalists' times are kept relative to it."""
    import triton.testing
    from triton.runtime.errors import OutOfResources
    from rbf_lite.kernels import rbf_attention as kernel, tuning
    configs = kernel.TUNED_FWD_CONFIGS[:4]
    monkeypatch.setattr(tuning, "FINALISTS", 2)
    tuner = tuning.Tuner("forward", None, configs, lambda config, dtype: True, kernel._heuristic_fwd)
    timed = []
    monkeypatch.setattr(tuner, "_run", lambda config, grid, args, constexprs, defer: timed.append(config))
    # Short rounds: 0, 1, 2 (too large), 3, then reversed: 3, 1, 0 (2 is not retried); best times
    # 0: 2.5, 1: 2.0, 3: 4.0. Final rounds over 1 and 0: 1, 0, then 0, 1; best 1: 1.8, 0: 1.5.
    script = iter([(5.0, 25), (2.0, 25), (None, 25), (4.0, 25), (4.5, 25), (2.2, 25), (2.5, 25),
                   (1.8, 100), (1.6, 100), (1.5, 100), (1.9, 100)])

    def fake_do_bench(fn, warmup, rep):
        fn()
        t, expected_rep = next(script)
        assert rep == expected_rep
        if t is None:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return t

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    best, finalists = tuner._choose(configs, None, None, {})
    assert best is configs[0]
    c0, c1, c2, c3 = configs
    assert timed == [c0, c1, c2, c3, c3, c1, c0, c1, c0, c0, c1]
    assert [f["time"] for f in finalists] == [1.0, 1.2]
    assert finalists[1]["config"] == tuning.config_dict(c1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning times configurations on a GPU")
def test_atomic_dq_survives_autotuning(monkeypatch, tmp_path):
    """Tuning runs the kernel once per candidate; the atomically summed dq must be cleared after it."""
    from rbf_lite.kernels import rbf_attention as kernel
    tuner = kernel.Tuner("backward", kernel.CompiledLauncher(kernel._bwd_kernel), kernel.TUNED_BWD_CONFIGS[-2:],
                         kernel._fits_bwd, kernel._heuristic_bwd)
    monkeypatch.setattr(kernel, "BWD_TUNER", tuner)
    monkeypatch.setattr(kernel, "ATOMIC_DQ", "1")
    monkeypatch.setenv("RBF_LITE_AUTOTUNE", "full")
    monkeypatch.setenv("RBF_LITE_CACHE", str(tmp_path))
    q, k, v = (torch.randn(1, 2, 200, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    check_against_float64(q, k, v, causal=True)
    assert tuner.chosen, "the backward should have been tuned in this test"


def rounding_scales(q, k, v, dout, causal):
    """The size each result's error reaches when every P_ij carries a relative error of 1.

    The sums behind dq and dk cancel (sum_j dS_ij = 0), and with nearly one-hot attention their
    exact value can be far smaller than their terms, so their error is bounded by the terms'
    magnitudes, not by the result's: |dS| <= P (|dP| + |Delta|) entry by entry.
    """
    q, k, v, dout = (t.double() for t in (q, k, v, dout))
    _, p = rbf_attention_reference(q, k, v, causal=causal, return_weights=True)
    ds_size = p * ((dout @ v.transpose(-1, -2)).abs() + (dout * (p @ v)).sum(-1, keepdim=True).abs())
    return {"out": (p @ v.abs()).norm().item(), "dv": (p.transpose(-1, -2) @ dout.abs()).norm().item(),
            "dq": (ds_size @ k.abs()).norm().item(),
            "dk": (ds_size.transpose(-1, -2) @ q.abs() + k.abs() * ds_size.sum(-2)[..., None]).norm().item()}


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_key_norms_stay_finite(dtype, causal, device):
    """Keys 30x longer than queries: scores of order -10^4 must not overflow the online softmax.

    A score of size |s| is known to about eps32 * |s| in fp32, so P carries that relative error.
    Each result must be finite and within TOL of the reference plus that rounding times the
    result's rounding scale (rounding_scales).
    """
    q = torch.randn(1, 2, 70, 64, device=device, dtype=dtype)
    k = 30 * torch.randn(1, 2, 70, 64, device=device, dtype=dtype)
    v = torch.randn(1, 2, 70, 64, device=device, dtype=dtype)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = rbf_attention(qg, kg, vg, causal=causal, backend="triton")
    dout = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (qg, kg, vg), dout))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = rbf_attention_reference(q64, k64, v64, causal=causal)
    want = (ref, *torch.autograd.grad(ref, (q64, k64, v64), dout.double()))
    score_rounding = 8 * torch.finfo(torch.float32).eps * k.double().square().sum(-1).max().item() / math.sqrt(64)
    scales = rounding_scales(q, k, v, dout, causal)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        bound = TOL[dtype] * w.norm().item() + score_rounding * scales[name]
        assert (g.double() - w).norm().item() < bound, f"{name}: error {(g.double() - w).norm():.2e} >= {bound:.2e}"


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
def test_rows_far_from_every_key(causal, device):
    """Every other query sits 15 sqrt(D) away from all keys: all of its weights exp(-c||q_i - k_j||^2)
    underflow even in float64, yet its softmax is well defined; one query block mixes such rows
    with ordinary ones."""
    d, n = 32, 48
    k = torch.randn(1, 2, n, d, device=device)
    v = torch.randn(1, 2, n, d, device=device)
    q = torch.randn(1, 2, n, d, device=device)
    q[:, :, 1::2] += 15 * torch.nn.functional.normalize(torch.randn(d, device=device), dim=0) * d ** 0.5
    weights = torch.exp(-torch.cdist(q.double(), k.double()).square() / math.sqrt(d))
    assert (weights[:, :, 1::2] == 0).all(), "premise: the far rows' unnormalised weights underflow"
    check_against_float64(q, k, v, causal)


@needs_triton
@pytest.mark.parametrize("n_q, n_k", [(1, 50), (7, 64), (40, 33)])
def test_fewer_queries_than_keys(n_q, n_k, device):
    """Queries aligned with the last keys (decoding with a KV cache); non-causal with any lengths."""
    q = torch.randn(1, 2, n_q, 32, device=device)
    k, v = torch.randn(1, 2, n_k, 32, device=device), torch.randn(1, 2, n_k, 32, device=device)
    if n_q <= n_k:
        check_against_float64(q, k, v, causal=True)
    check_against_float64(q, k, v, causal=False)


@needs_triton
def test_custom_scale(device):
    q, k, v = (torch.randn(1, 1, 31, 16, device=device) for _ in range(3))
    check_against_float64(q, k, v, causal=True, scale=0.7)


@needs_triton
def test_calls_without_gradients_skip_autograd(device, monkeypatch):
    """Inference calls go straight to the forward kernel (autograd costs host time per call); calls
    that record gradients still get them. Both give the same output."""
    from rbf_lite.kernels import rbf_attention as kernel
    q, k, v = (torch.randn(1, 2, 37, 32, device=device) for _ in range(3))
    recorded, apply = [], kernel._EagerRBFAttention.apply
    monkeypatch.setattr(kernel._EagerRBFAttention, "apply", lambda *a: recorded.append(a) or apply(*a))
    with torch.no_grad():
        out_no_grad = rbf_attention(q, k, v, backend="triton")
    out_plain = rbf_attention(q, k, v, backend="triton")  # grad mode on, but no input requires grad
    assert not recorded and out_no_grad.grad_fn is None and out_plain.grad_fn is None
    q.requires_grad_(True)
    out = rbf_attention(q, k, v, backend="triton")
    assert len(recorded) == 1 and out.grad_fn is not None
    torch.testing.assert_close(out.detach(), out_no_grad, rtol=0, atol=0)
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(dq).all() and dq.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(),
                    reason="bf16 runs on the GPU only: the Triton interpreter's tl.dot multiplies raw bf16 "
                           "bit patterns (triton-lang/triton#11584, 'not supported yet')")
@pytest.mark.parametrize("tma", ["0", "1"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bfloat16_on_gpu(causal, head_dim, tma, monkeypatch):
    from rbf_lite.kernels import rbf_attention as kernel
    monkeypatch.setattr(kernel, "TMA", tma)
    q, k, v = (torch.randn(2, 4, 300, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    check_against_float64(q, k, v, causal)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled launcher runs on a GPU only")
def test_compiled_launcher_matches_the_jit():
    """After its first (JIT) call, CompiledLauncher launches the cached kernel itself. Other strides
    and lengths (another specialisation) must get their own kernel, never the first one."""
    from rbf_lite.kernels.rbf_attention import ROWDOT, rowdot
    for shape in [(2, 3, 64, 64), (2, 3, 64, 64), (1, 2, 33, 32), (1, 2, 33, 32)]:
        x = torch.randn(*shape, device="cuda")
        y = torch.randn(shape[0], shape[1], shape[3] + 1, shape[2], device="cuda")[:, :, :-1].transpose(-1, -2)
        torch.testing.assert_close(rowdot(x, y), (x * y).sum(-1), rtol=1e-5, atol=1e-5)
    assert len(ROWDOT.compiled) >= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled launcher runs on a GPU only")
def test_compiled_launcher_keeps_launch_hooks():
    """Cached launches skip Triton's per-call wrapper, but a profiler's launch hook still sees them."""
    from triton import knobs
    from rbf_lite.kernels.rbf_attention import rowdot
    if not hasattr(knobs.runtime.launch_enter_hook, "add"):
        pytest.skip("this Triton has no launch-hook chains")
    x = torch.randn(1, 2, 40, 16, device="cuda")
    rowdot(x, x)  # compiles and caches the kernel
    seen = []
    hook = seen.append
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        got = rowdot(x, x)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    torch.testing.assert_close(got, (x * x).sum(-1), rtol=1e-5, atol=1e-5)
    assert len(seen) == 1
    rowdot(x, x)
    assert len(seen) == 1


@needs_triton
@pytest.mark.parametrize("n_q, n_k, chunks", [(1, 1, None), (1, 50, 3), (3, 300, 4), (16, 257, 5), (64, 130, 2),
                                               (5, 200, 1)])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_decode_matches_float64_reference(n_q, n_k, chunks, head_dim, device):
    """Flash-decoding: the cache split in `chunks` (forced, to test the combine; with one chunk the
    first kernel writes the output itself), causal queries."""
    from rbf_lite.kernels.rbf_decode import rbf_decode_triton
    q = torch.randn(2, 3, n_q, head_dim, device=device)
    k, v = (torch.randn(2, 3, n_k, head_dim, device=device) for _ in range(2))
    want = rbf_attention_reference(q.double(), k.double(), v.double(), causal=True)
    got = rbf_decode_triton(q, k, v, None, 1 / math.sqrt(head_dim), num_chunks=chunks)
    assert rel_err(got, want) < TOL[torch.float32]


@needs_triton
def test_decode_steps_share_one_workspace(device):
    """Consecutive multi-chunk steps reuse the partials and per-head counts (the combining program
    resets its count): each step still equals the full computation, after the workspace grows too."""
    from rbf_lite.kernels import rbf_decode as decode
    decode._WORKSPACES.clear()
    k, v = (torch.randn(2, 3, 300, 16, device=device) for _ in range(2))
    for n_k, chunks, n_q in [(100, 3, 1), (300, 5, 2), (300, 5, 2), (60, 2, 1), (300, 4, 3)]:
        q = torch.randn(2, 3, n_q, 16, device=device)
        want = rbf_attention_reference(q.double(), k[:, :, :n_k].double(), v[:, :, :n_k].double(), causal=True)
        got = decode.rbf_decode_triton(q, k[:, :, :n_k], v[:, :, :n_k], None, 0.25, num_chunks=chunks)
        assert rel_err(got, want) < TOL[torch.float32]
    (part, counts), = decode._WORKSPACES.values()
    assert counts.eq(0).all() and part.numel() >= 2 * 3 * 5 * 2 * 17


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_reads_strided_caches_and_cached_norms(dtype, device):
    """The filled part of preallocated (B, H, M_max, D) caches, with norms kept beside them."""
    k_buf, v_buf = (torch.randn(2, 2, 400, 32, device=device, dtype=dtype) for _ in range(2))
    norm_buf = k_buf.float().square().sum(-1)
    k, v, norms = k_buf[:, :, :333], v_buf[:, :, :333], norm_buf[:, :, :333]
    q = torch.randn(2, 2, 2, 32, device=device, dtype=dtype)
    want = rbf_attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert rel_err(rbf_decode(q, k, v, key_sqnorms=norms, backend="triton"), want) < TOL[dtype]


def test_host_next_power_of_2_matches_triton():
    """The launch paths' own next_power_of_2 (without Triton's constexpr wrapper) gives Triton's values."""
    import triton
    from rbf_lite.kernels.rbf_attention import next_power_of_2
    assert [next_power_of_2(n) for n in range(1, 300)] == [triton.next_power_of_2(n) for n in range(1, 300)]


def test_decode_bad_inputs():
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="at least as many cached keys"):
        rbf_decode(torch.randn(1, 2, 9, 16), k, k)
    with pytest.raises(ValueError, match="key_sqnorms must be float32 of shape"):
        rbf_decode(q, k, k, key_sqnorms=torch.ones(1, 2, 7))
    with pytest.raises(ValueError, match="contiguous along the keys"):
        rbf_decode(q, k, k, key_sqnorms=torch.ones(1, 2, 16)[:, :, ::2])


def test_expanded_form_equals_distance_form():
    """softmax(-c||q-k||^2) == softmax(c(2q.k - ||k||^2)): the row constant -c||q||^2 cancels."""
    q, k = torch.randn(3, 40, 16, dtype=torch.float64), torch.randn(3, 50, 16, dtype=torch.float64)
    c = 1 / math.sqrt(16)
    distance = torch.softmax(-c * torch.cdist(q, k).square(), dim=-1)
    expanded = torch.softmax(c * (2 * q @ k.transpose(-1, -2) - k.square().sum(-1)[:, None, :]), dim=-1)
    torch.testing.assert_close(distance, expanded, rtol=1e-12, atol=1e-12)
    # ...and the shifted logits really differ from the distance ones by a per-row constant only.
    shift = c * (2 * q @ k.transpose(-1, -2) - k.square().sum(-1)[:, None, :]) + c * torch.cdist(q, k).square()
    torch.testing.assert_close(shift, c * q.square().sum(-1, keepdim=True).expand_as(shift))


def test_reference_float32_matches_float64():
    q, k, v = (torch.randn(2, 2, 33, 32) for _ in range(3))
    got = rbf_attention(q, k, v, causal=True, backend="torch")
    want = rbf_attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert rel_err(got, want) < 1e-5


@needs_triton
def test_opcheck(device):
    from rbf_lite.kernels.rbf_attention import rbf_attention_fwd
    q, k, v = (torch.randn(1, 2, 20, 16, device=device, requires_grad=True) for _ in range(3))
    torch.library.opcheck(rbf_attention_fwd, (q, k, v, True, 0.25, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_triton
def test_compile_has_no_graph_break(device):
    """fullgraph=True fails on any graph break: the custom op must be traced as one node."""
    def layer(x, w):
        q, k, v = (x @ w).unflatten(-1, (3, 16)).unbind(-2)
        return rbf_attention(q, k, v, causal=True, backend="triton").sum()

    x, w = torch.randn(1, 2, 24, 16, device=device), torch.randn(16, 48, device=device, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w), layer(x, w))
    compiled(x, w).backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_backend_choice(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    q = torch.randn(1, 1, 4, 16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_available("cpu")
    rbf_attention(q, q, q, backend="auto")  # falls back to the reference
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        rbf_attention(q, q, q, backend="triton")


@pytest.mark.parametrize("make, error, match", [
    (lambda: (torch.randn(2, 8, 16),) * 3, ValueError, "shape \\(B, H, N, D\\)"),
    (lambda: (torch.randn(1, 2, 8, 16), torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16)), ValueError, "batch and head"),
    (lambda: (torch.randn(2, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)), ValueError, "batch and head"),
    (lambda: (torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)), ValueError, "head dimension"),
    (lambda: (torch.randn(1, 2, 8, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 8, 16)), ValueError, "same sequence length"),
    (lambda: (torch.ones(1, 2, 8, 16, dtype=torch.int64),) * 3, TypeError, "dtype torch.int64"),
    (lambda: (torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16).half(), torch.randn(1, 2, 8, 16)), TypeError, "share one dtype"),
    (lambda: (torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16, device="meta")), ValueError, "one device"),
    (lambda: (torch.randn(1, 2, 9, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)), ValueError, "at least as many keys"),
    (lambda: (torch.randn(1, 2, 0, 16),) * 3, ValueError, ">= 1"),
    (lambda: ([[1.0]], torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)), TypeError, "torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        rbf_attention(*make())


def test_bad_backend_and_scale():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="backend must be one of"):
        rbf_attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        rbf_attention(q, q, q, scale=-1.0)
    with pytest.raises(TypeError, match="float64"):
        rbf_attention(q.double(), q.double(), q.double(), backend="triton")
    odd = torch.randn(1, 2, 8, 24)
    with pytest.raises(ValueError, match="D=24 is not supported; supported: \\(16, 32, 64, 128\\)"):
        rbf_attention(odd, odd, odd, backend="triton")
