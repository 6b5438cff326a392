"""Every attention kind against an independent float64 formula, with and without a KV cache;
which backend `rbf_attention` runs, and the scale it takes."""
import math
import warnings

import pytest
import torch

from rbf_lite import attention as attention_module
from rbf_lite import rbf as rbf_module
from rbf_lite.attention import ATTENTION_KINDS, CausalSelfAttention, KVCache, rbf_flex_attention
from rbf_lite.rbf import rbf_attention, rbf_attention_reference, rbf_decode, triton_available

D_MODEL, HEADS = 64, 2
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def expected_output(module: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer's output computed from its weights in float64 by the textbook formulas."""
    b, n, c = x.shape
    h, d = module.n_heads, module.head_dim
    qkv = x.double() @ module.qkv.weight.double().T
    q, k, v = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    if module.kind == "sdpa_qknorm":
        q = q / q.square().mean(-1, keepdim=True).add(module.q_norm.eps or 1e-6).sqrt() * module.q_norm.weight.double()
        k = k / k.square().mean(-1, keepdim=True).add(module.k_norm.eps or 1e-6).sqrt() * module.k_norm.weight.double()
    if module.kind.startswith("rbf"):
        scores = -(q[..., :, None, :] - k[..., None, :, :]).square().sum(-1) / math.sqrt(d)
    else:
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    y = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return y @ module.proj.weight.double().T


def make_layer(kind: str) -> CausalSelfAttention:
    layer = CausalSelfAttention(D_MODEL, HEADS, kind)
    if layer.q_norm is not None:  # non-trivial gains, so the test sees whether they are applied
        with torch.no_grad():
            layer.q_norm.weight.uniform_(0.5, 1.5)
            layer.k_norm.weight.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_each_kind_matches_the_formula(kind):
    layer = make_layer(kind)
    x = torch.randn(2, 11, D_MODEL)
    with torch.no_grad():
        out, weights = layer(x, torch.arange(11))
    assert weights is None
    torch.testing.assert_close(out.double(), expected_output(layer, x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_return_attn_gives_causal_rows_that_reproduce_the_output(kind):
    layer = make_layer(kind)
    x = torch.randn(2, 9, D_MODEL)
    with torch.no_grad():
        plain, _ = layer(x, torch.arange(9))
        out, weights = layer(x, torch.arange(9), return_attn=True)
    assert weights.shape == (2, HEADS, 9, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, HEADS, 9))
    assert torch.all(weights.triu(1) == 0)
    torch.testing.assert_close(out, plain, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_kv_cache_in_chunks_equals_one_pass(kind):
    layer = make_layer(kind)
    x = torch.randn(2, 10, D_MODEL)
    with torch.no_grad():
        full, _ = layer(x, torch.arange(10))
        cache = KVCache(n_layers=1)
        pieces = [layer(x[:, a:b], torch.arange(a, b), cache)[0] for a, b in ((0, 4), (4, 5), (5, 10))]
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=2e-5, rtol=1e-4)


def test_rbf_decoding_with_cached_key_norms_equals_one_pass():
    """With key_sqnorms=True the rbf layer decodes through rbf_decode, reading the cached norms."""
    layer = make_layer("rbf")
    x = torch.randn(2, 10, D_MODEL)
    with torch.no_grad():
        full, _ = layer(x, torch.arange(10))
        cache = KVCache(n_layers=1, key_sqnorms=True)
        pieces = [layer(x[:, a:b], torch.arange(a, b), cache)[0] for a, b in ((0, 4), (4, 5), (5, 10))]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(cache.sqnorms[0], cache.keys[0].square().sum(-1))


def test_rbf_kind_gradients_match_the_reference_layer():
    """`rbf` runs the Triton kernels here (the test set-up enables Triton's CPU interpreter)."""
    fused, reference = make_layer("rbf"), make_layer("rbf_reference")
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(2, 12, D_MODEL)
    target = torch.randn(2, 12, D_MODEL)
    for layer in (fused, reference):
        ((layer(x, torch.arange(12))[0] - target).square().sum()).backward()
    for a, b in zip(fused.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("n", [1, 5, 12])
def test_flex_score_mod_matches_reference_with_query_offset(n):
    q, k, v = torch.randn(3, 2, 3, 12, 32).unbind(0)
    q = q[:, :, -n:]
    with torch.no_grad():
        got = rbf_flex_attention(q, k * 2, v)
    torch.testing.assert_close(got, rbf_attention_reference(q, k * 2, v), atol=1e-5, rtol=1e-4)


def test_flex_falls_back_loudly_when_cpu_training():
    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))
    with pytest.warns(UserWarning, match="no backward pass on the CPU"):
        out = rbf_flex_attention(q, k, v)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="attention kind"):
        CausalSelfAttention(D_MODEL, HEADS, "cosine")
    with pytest.raises(ValueError, match="not divisible"):
        CausalSelfAttention(D_MODEL, 3, "sdpa")


def test_attention_maps_refuse_large_inputs(monkeypatch):
    monkeypatch.setattr(attention_module, "MAX_ATTENTION_MAP_ELEMENTS", 100)
    layer = CausalSelfAttention(D_MODEL, HEADS, "rbf")
    with warnings.catch_warnings(), pytest.raises(ValueError, match="shorter"):
        layer(torch.randn(1, 16, D_MODEL), torch.arange(16), return_attn=True)


# ---------------------------------------------------------------------------- rbf_attention's inputs
def spy_on_reference(monkeypatch) -> list:
    """Record each call of the PyTorch reference made by `rbf_attention` / `rbf_decode`."""
    calls = []
    monkeypatch.setattr(rbf_module, "rbf_attention_reference",
                        lambda *args, **kwargs: calls.append(args[0].dtype) or rbf_attention_reference(*args, **kwargs))
    return calls


@pytest.mark.parametrize("triton_interpreter", [True, False])
def test_auto_runs_the_reference_for_float64(triton_interpreter, monkeypatch):
    """float64 is the reference's precision, not the kernels': "auto" must run it, wherever it is."""
    if not triton_interpreter:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = spy_on_reference(monkeypatch)
    q, k, v = (torch.randn(1, 2, 7, 16, dtype=torch.float64) for _ in range(3))
    out = rbf_attention(q, k, v)
    assert out.dtype == torch.float64 and calls == [torch.float64]
    torch.testing.assert_close(out, rbf_attention_reference(q, k, v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rbf_decode(q[:, :, -2:], k, v), out[:, :, -2:], rtol=1e-12, atol=1e-12)


def test_auto_runs_the_reference_for_head_dims_the_kernels_lack(monkeypatch):
    calls = spy_on_reference(monkeypatch)
    q, k, v = (torch.randn(1, 2, 7, 24) for _ in range(3))
    torch.testing.assert_close(rbf_attention(q, k, v), rbf_attention_reference(q, k, v))
    assert calls == [torch.float32]


def test_auto_keeps_the_fused_kernels_where_they_run(monkeypatch):
    if not triton_available("cpu" if not torch.cuda.is_available() else "cuda"):
        pytest.skip("the fused kernels cannot run here")
    calls = spy_on_reference(monkeypatch)
    q = torch.randn(1, 2, 7, 16, device="cuda" if torch.cuda.is_available() else "cpu")
    rbf_attention(q, q, q)
    assert calls == []


@pytest.mark.parametrize("dtype, head_dim, error, match", [
    (torch.float64, 16, TypeError, "float64; backend='auto' or 'torch' runs the PyTorch reference"),
    (torch.float32, 24, ValueError, "D=24 is not supported; supported: \\(16, 32, 64, 128\\); backend='auto'"),
])
def test_triton_backend_names_what_it_cannot_run(dtype, head_dim, error, match):
    q = torch.randn(1, 1, 4, head_dim, dtype=dtype)
    with pytest.raises(error, match=match):
        rbf_attention(q, q, q, backend="triton")
    with pytest.raises(error, match=match):
        rbf_decode(q, q, q, backend="triton")


@pytest.mark.parametrize("make", [lambda: torch.tensor(0.5), lambda: torch.tensor([0.5], dtype=torch.float64),
                                  lambda: torch.tensor(1, dtype=torch.int64) / 2])
def test_tensor_scale_counts_as_a_number(make):
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    want = rbf_attention(q, k, v, scale=0.5)
    torch.testing.assert_close(rbf_attention(q, k, v, scale=make()), want)
    torch.testing.assert_close(rbf_decode(q, k, v, scale=make()), want)


@pytest.mark.parametrize("scale, match", [
    (torch.tensor(0.0), "positive finite number, got 0.0$"),
    (torch.tensor(-0.5), "positive finite number, got -0.5$"),
    (torch.tensor(float("nan")), "positive finite number, got nan$"),
    (float("inf"), "positive finite number, got inf$"),
    (torch.tensor([0.5, 0.5]), "one-element real tensor, got a torch.float32 tensor of shape \\(2,\\)"),
    (torch.tensor(0.5j), "one-element real tensor"),
    (True, "positive finite number, got True"),
    ("0.5", "positive finite number, got '0.5'"),
])
def test_bad_scale_is_named_as_a_number(scale, match):
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match=match):
        rbf_attention(q, q, q, scale=scale)
    with pytest.raises(ValueError, match=match):
        rbf_decode(q, q, q, scale=scale)
