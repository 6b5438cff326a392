"""HALO: the shift trick, the abstain column, the radial shell, soft targets, robustness, errors."""
import math

import pytest
import torch

from rbf_lite.halo import HALOHead, HALOLoss, LinearHead


def random_problem(batch=16, classes=7, dim=12, dtype=torch.float64):
    x = torch.randn(batch, dim, dtype=dtype) * torch.rand(()) * 3
    centroids = torch.randn(classes, dim, dtype=dtype) * 2
    targets = torch.randint(0, classes, (batch,))
    halo = HALOLoss(classes, dim).to(dtype)
    with torch.no_grad():
        halo.log_gamma.fill_(torch.randn(()).item())
    return halo, x, centroids, targets


def distance_logits(halo, x, centroids):
    """The definition, written out: -gamma ||x - c_k||^2 / D, and the abstain centroid at 0."""
    dim = x.shape[1]
    known = -halo.gamma * ((x[:, None, :] - centroids[None]) ** 2).sum(-1) / dim
    abstain = halo.abstain_bias() - halo.gamma * (x ** 2).sum(1, keepdim=True) / dim
    return torch.cat([known, abstain], dim=1)


def test_shifted_logits_give_the_distance_softmax():
    halo, x, centroids, _ = random_problem()
    reference = distance_logits(halo, x, centroids)
    shifted = halo.shifted_logits(x, centroids)
    torch.testing.assert_close(shifted.softmax(1), reference.softmax(1))
    torch.testing.assert_close(halo.logits(x, centroids), reference)
    # The shift is one constant per row: -gamma ||x||^2 / D.
    difference = reference - shifted
    torch.testing.assert_close(difference, difference[:, :1].expand_as(difference))


def test_abstain_column_is_constant_in_x():
    halo, x, centroids, _ = random_problem()
    column = halo.shifted_logits(x, centroids)[:, -1]
    other = halo.shifted_logits(torch.randn_like(x) * 10, centroids)[:, -1]
    assert torch.all(column == column[0]) and torch.all(other == column[0])


def test_abstain_bias_is_one_margin_below_the_equilibrium_logit():
    """At x = 0 with its centroid on the shell ||c_y||^2 = D - 2, own class leads abstain by the margin;
    anywhere else on the shell the lead is larger (the abstain logit falls with ||x||^2)."""
    classes, dim = 5, 9
    halo = HALOLoss(classes, dim, eps=0.2)
    centroids = torch.randn(classes, dim, dtype=torch.float64)
    centroids[2] *= math.sqrt(dim - 2) / centroids[2].norm()
    halo = halo.double()
    logits = halo.logits(torch.zeros(1, dim, dtype=torch.float64), centroids)
    assert (logits[0, 2] - logits[0, -1]).item() == pytest.approx(halo.margin, rel=1e-9)
    assert halo.margin == pytest.approx(math.log(0.8 * 4 / 0.2))
    on_shell = centroids[2] + math.sqrt(dim - 2) * torch.nn.functional.normalize(torch.randn(50, dim).double(), dim=1)
    logits = halo.logits(on_shell, centroids)
    assert torch.all(logits[:, 2] - logits[:, -1] >= halo.margin - 1e-9)


def test_abstain_bias_does_not_train_gamma():
    halo = HALOLoss(4, 6)
    assert not halo.abstain_bias().requires_grad


@pytest.mark.parametrize("dim", [3, 10, 64])
def test_radial_minimum_is_at_one_minus_two_over_d(dim):
    halo = HALOLoss(3, dim).double()
    centroids = torch.randn(3, dim, dtype=torch.float64)
    direction = torch.nn.functional.normalize(torch.randn(dim, dtype=torch.float64), dim=0)
    r2 = torch.linspace(0.05, 3, 20001, dtype=torch.float64)
    x = centroids[1] + (r2 * dim).sqrt()[:, None] * direction
    loss = halo.radial(x, centroids, torch.ones(len(r2), dtype=torch.long))
    assert r2[loss.argmin()].item() == pytest.approx(1 - 2 / dim, abs=2e-4)


def test_radial_term_pulls_embeddings_onto_the_shell():
    dim = 16
    halo = HALOLoss(2, dim, radial_weight=1.0)
    centroids = torch.randn(2, dim)
    x = (centroids[0] + 0.1 * torch.randn(8, dim)).requires_grad_()
    optimizer = torch.optim.SGD([x], lr=0.5)
    for _ in range(500):
        optimizer.zero_grad()
        halo.radial(x, centroids, torch.zeros(8, dtype=torch.long)).sum().backward()
        optimizer.step()
    squared = ((x.detach() - centroids[0]) ** 2).sum(1)
    torch.testing.assert_close(squared, torch.full_like(squared, dim - 2.0), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("where", ["centroid", "origin"])
def test_finite_loss_and_gradients_at_degenerate_points(where):
    head = HALOHead(5, 8)
    with torch.no_grad():
        head.centroids[0] = head.centroids[1:].mean(0)  # mean-centring puts centroid 0 at the origin
    centroids = head.centred_centroids().detach()
    x = (centroids[[0, 0, 3]] if where == "centroid" else torch.zeros(3, 8)).clone().requires_grad_()
    loss, logits = head(x, torch.tensor([0, 0, 3]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits).all()
    for tensor in (x.grad, head.centroids.grad, head.loss.log_gamma.grad):
        assert torch.isfinite(tensor).all()


def test_soft_targets():
    halo, x, centroids, targets = random_problem(batch=32)
    shifted = halo.shifted_logits(x, centroids)
    for kind in ("distill", "smooth"):
        halo.soft_targets = kind
        soft = halo.targets_distribution(shifted, targets)
        torch.testing.assert_close(soft.sum(1), torch.ones(32, dtype=soft.dtype))
        assert torch.all(soft[:, -1] == 0)
        torch.testing.assert_close(soft[torch.arange(32), targets], torch.full((32,), 1 - halo.eps, dtype=soft.dtype))
    # Distillation: the negatives' target mass ranks them exactly as their logits do.
    halo.soft_targets = "distill"
    soft = halo.targets_distribution(shifted, targets)
    is_true = torch.nn.functional.one_hot(targets, 7).bool()
    by_mass = soft[:, :-1].masked_fill(is_true, -1).argsort(1)[:, 1:]
    by_logit = shifted[:, :-1].masked_fill(is_true, float("-inf")).argsort(1)[:, 1:]
    assert torch.equal(by_mass, by_logit)


def test_reduction_and_returned_logits():
    halo, x, centroids, targets = random_problem()
    halo.reduction = "none"
    each, logits = halo(x, targets, centroids)
    assert each.shape == (16,) and logits.shape == (16, 8)
    halo.reduction = "sum"
    torch.testing.assert_close(halo(x, targets, centroids)[0], each.sum())
    halo.reduction = "mean"
    torch.testing.assert_close(halo(x, targets, centroids)[0], each.mean())
    loss, none = halo(x, targets, centroids, return_logits=False)  # what a training step asks for
    assert none is None and torch.equal(loss, halo(x, targets, centroids)[0])


def test_radial_picks_the_true_centroid():
    halo, x, centroids, targets = random_problem()
    expected = ((x - centroids[targets]) ** 2).sum(1) / halo.dim
    direct = -((0.5 - 1 / halo.dim) * expected.clamp_min(1e-6).log() - 0.5 * expected.clamp_min(1e-6))
    torch.testing.assert_close(halo.radial(x, centroids, targets), direct)


def test_gamma_calibration_gives_unit_spread():
    head = HALOHead(10, 10)
    embeddings = torch.randn(256, 10) * 37.0 + 5
    gamma = head.calibrate(embeddings)
    _, logits = head(embeddings)
    assert gamma == pytest.approx(head.loss.gamma.item())
    assert logits[:, :-1].std(1).mean().item() == pytest.approx(1.0, rel=1e-4)


def test_centroids_are_mean_centred():
    head = HALOHead(6, 8)
    x = torch.randn(5, 8)
    before = head(x)[1]
    with torch.no_grad():
        head.centroids += torch.randn(8) * 5
    torch.testing.assert_close(head(x)[1], before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head.centred_centroids().mean(0), torch.zeros(8), atol=1e-5, rtol=0)


def test_learn_gamma_switch():
    assert not HALOHead(4, 5, learn_gamma=False).loss.log_gamma.requires_grad
    assert HALOHead(4, 5).loss.log_gamma.requires_grad


@pytest.mark.parametrize("head", [HALOHead(4, 6), LinearHead(4, 6)], ids=["halo", "linear"])
def test_bad_input_gets_a_clear_error(head):
    with pytest.raises(ValueError, match="targets must lie in"):
        head(torch.randn(3, 6), torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="targets must lie in"):
        head(torch.randn(3, 6), torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match=r"shape \(batch, 6\)"):
        head(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="empty batch"):
        head(torch.randn(0, 6), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class indices"):
        head(torch.randn(3, 6), torch.tensor([0.0, 1.0, 2.0]))


def test_bad_configuration():
    with pytest.raises(ValueError, match="eps"):
        HALOLoss(4, 6, eps=0)
    with pytest.raises(ValueError, match="soft_targets"):
        HALOLoss(4, 6, soft_targets="teacher")
    with pytest.raises(ValueError, match="dim"):
        HALOLoss(4, 2)
    with pytest.raises(ValueError, match="centroids must have shape"):
        HALOLoss(4, 6)(torch.randn(3, 6), torch.tensor([0, 1, 2]), torch.randn(5, 6))
