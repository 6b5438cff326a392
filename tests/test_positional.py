"""RoPE and SuSiE: shapes, registers, and what each does to distances and dot products."""
import pytest
import torch

from rbf_lite.positional import (POSITIONAL_KINDS, LearnedPositions, Rotary, SuSiE, inverse_frequencies,
                                 qk_positional)

H, D = 3, 16


def test_inverse_frequencies_follow_the_transformer_table():
    f = inverse_frequencies(D)
    assert f.shape == (D // 2,)
    torch.testing.assert_close(f, 10000.0 ** (-torch.arange(0, D, 2).float() / D))
    with pytest.raises(ValueError, match="even"):
        inverse_frequencies(15)


def test_rope_keeps_shapes_norms_and_makes_dot_products_depend_on_offset_only():
    rope = Rotary(D)
    q, k = torch.randn(2, 1, H, 1, D).unbind(0)

    def dot(p, p2):
        rq, _ = rope(q, q, torch.tensor([p]))
        _, rk = rope(k, k, torch.tensor([p2]))
        return (rq * rk).sum()

    rq, rk = rope(q.expand(1, H, 5, D), k.expand(1, H, 5, D), torch.arange(5))
    assert rq.shape == rk.shape == (1, H, 5, D)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1).expand(1, H, 5))
    torch.testing.assert_close(dot(7, 3), dot(40, 36), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(dot(7, 3), dot(7, 5), atol=1e-3)


def test_rope_leaves_register_slots_unrotated():
    q = torch.randn(1, H, 4, D)
    rq, _ = Rotary(D)(q, q, torch.arange(-2, 2))
    torch.testing.assert_close(rq[:, :, :2], q[:, :, :2])
    assert not torch.allclose(rq[:, :, 3], q[:, :, 3])


def test_susie_shapes_and_initial_weights():
    susie = SuSiE(H, D, num_registers=2)
    assert susie.embedding(torch.arange(-2, 6)).shape == (H, 8, D)
    assert torch.all(susie.weight == 0.5) and susie.weight.shape == (H, D // 2)
    assert susie.register_embedding.shape == (H, 2, D)
    q, k = torch.randn(2, 2, H, 8, D).unbind(0)
    sq, sk = susie(q, k, torch.arange(-2, 6))
    assert sq.shape == sk.shape == q.shape


def test_susie_same_position_leaves_the_distance_unchanged():
    susie = SuSiE(H, D, num_registers=1)
    with torch.no_grad():
        susie.weight.uniform_(0.1, 2.0)
    q, k = torch.randn(2, 1, H, 7, D).unbind(0)
    positions = torch.arange(-1, 6)
    sq, sk = susie(q, k, positions)
    torch.testing.assert_close((sq - sk).norm(dim=-1), (q - k).norm(dim=-1))


def test_susie_positional_distance_depends_on_offset_and_grows_with_it():
    susie = SuSiE(H, D)
    with torch.no_grad():
        susie.weight.uniform_(0.1, 2.0)
    e = susie.embedding(torch.arange(100))  # (H, N, D)

    def dist2(p, p2):
        return (e[:, p] - e[:, p2]).square().sum(-1)

    torch.testing.assert_close(dist2(10, 13), dist2(60, 63), atol=1e-4, rtol=1e-4)
    expected = (2 * susie.weight.detach() ** 2 * (1 - torch.cos(3 * inverse_frequencies(D)))).sum(-1)
    torch.testing.assert_close(dist2(10, 13), expected, atol=1e-4, rtol=1e-4)
    assert torch.all(dist2(5, 6) < dist2(5, 7)) and torch.all(dist2(5, 7) < dist2(5, 8))


def test_susie_register_slots_use_their_own_small_embeddings():
    susie = SuSiE(H, D, num_registers=3)
    e = susie.embedding(torch.arange(-3, 2))
    torch.testing.assert_close(e[:, :3], susie.register_embedding.detach())
    assert 0.005 < susie.register_embedding.std() < 0.05


def test_susie_weights_and_register_embeddings_learn():
    susie = SuSiE(H, D, num_registers=1)
    q, k = torch.randn(2, 1, H, 4, D).unbind(0)
    sq, sk = susie(q, k, torch.arange(-1, 3))
    (sq.square().sum() + sk.sum()).backward()
    assert susie.weight.grad.abs().sum() > 0 and susie.register_embedding.grad.abs().sum() > 0


def test_factory_and_learned_positions():
    assert qk_positional("none", H, D, 1) is None and qk_positional("learned", H, D, 1) is None
    assert isinstance(qk_positional("rope", H, D, 1), Rotary)
    assert isinstance(qk_positional("susie", H, D, 1), SuSiE)
    assert set(POSITIONAL_KINDS) == {"none", "learned", "rope", "susie"}
    assert LearnedPositions(8, 12)(torch.arange(8)).shape == (8, 12)
    with pytest.raises(ValueError, match="positional kind"):
        qk_positional("alibi", H, D, 1)
