"""HALO: the shift trick, the abstain column, the radial shell, soft targets, robustness, errors;
the published formulation against the formulas, written out here in float64; the fused kernel."""
import math

import pytest
import torch

from rbf_lite.halo import HALOHead, HALOLoss, LinearHead

VARIANTS = ["published", "rbf_lite"]


def random_problem(batch=16, classes=7, dim=12, dtype=torch.float64, variant="published"):
    x = torch.randn(batch, dim, dtype=dtype) * torch.rand(()) * 3
    centroids = torch.randn(classes, dim, dtype=dtype) * 2
    targets = torch.randint(0, classes, (batch,))
    halo = HALOLoss(classes, dim, variant=variant).to(dtype)
    halo.set_gamma(math.exp(torch.randn(()).item()))
    return halo, x, centroids, targets


def distance_logits(halo, x, centroids):
    """The definition, written out: -gamma ||x - c_k||^2 / D, and the abstain centroid at 0."""
    dim = x.shape[1]
    known = -halo.gamma * ((x[:, None, :] - centroids[None]) ** 2).sum(-1) / dim
    abstain = halo.abstain_bias() - halo.gamma * (x ** 2).sum(1, keepdim=True) / dim
    return torch.cat([known, abstain], dim=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_shifted_logits_give_the_distance_softmax(variant):
    halo, x, centroids, _ = random_problem(variant=variant)
    reference = distance_logits(halo, x, centroids)
    shifted = halo.shifted_logits(x, centroids)
    torch.testing.assert_close(shifted.softmax(1), reference.softmax(1))
    torch.testing.assert_close(halo.logits(x, centroids), reference)
    # The shift is one constant per row: -gamma ||x||^2 / D.
    difference = reference - shifted
    torch.testing.assert_close(difference, difference[:, :1].expand_as(difference))


@pytest.mark.parametrize("variant", VARIANTS)
def test_abstain_column_is_constant_in_x(variant):
    halo, x, centroids, _ = random_problem(variant=variant)
    column = halo.shifted_logits(x, centroids)[:, -1]
    other = halo.shifted_logits(torch.randn_like(x) * 10, centroids)[:, -1]
    assert torch.all(column == column[0]) and torch.all(other == column[0])


def test_abstain_bias_is_one_margin_below_the_equilibrium_logit():
    """At x = 0 with its centroid on the shell ||c_y||^2 = D - 2, own class leads abstain by the margin;
    anywhere else on the shell the lead is larger (the abstain logit falls with ||x||^2)."""
    classes, dim = 5, 9
    halo = HALOLoss(classes, dim, variant="rbf_lite", eps=0.2)
    centroids = torch.randn(classes, dim, dtype=torch.float64)
    centroids[2] *= math.sqrt(dim - 2) / centroids[2].norm()
    halo = halo.double()
    logits = halo.logits(torch.zeros(1, dim, dtype=torch.float64), centroids)
    assert (logits[0, 2] - logits[0, -1]).item() == pytest.approx(halo.margin, rel=1e-9)
    assert halo.margin == pytest.approx(math.log(0.8 * 4 / 0.2))
    on_shell = centroids[2] + math.sqrt(dim - 2) * torch.nn.functional.normalize(torch.randn(50, dim).double(), dim=1)
    logits = halo.logits(on_shell, centroids)
    assert torch.all(logits[:, 2] - logits[:, -1] >= halo.margin - 1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_abstain_bias_does_not_train_gamma(variant):
    halo = HALOLoss(4, 6, variant=variant)
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


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("where", ["centroid", "origin"])
def test_finite_loss_and_gradients_at_degenerate_points(where, variant):
    head = HALOHead(5, 8, variant=variant)
    with torch.no_grad():
        head.centroids[0] = head.centroids[1:].mean(0)  # mean-centring puts centroid 0 at the origin
    centroids = head.centred_centroids().detach()
    x = (centroids[[0, 0, 3]] if where == "centroid" else torch.zeros(3, 8)).clone().requires_grad_()
    loss, logits = head(x, torch.tensor([0, 0, 3]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits).all()
    for tensor in (x.grad, head.centroids.grad, head.loss.gamma_parameter.grad):
        assert torch.isfinite(tensor).all()


def test_rbf_lite_soft_targets():
    halo, x, centroids, targets = random_problem(batch=32, variant="rbf_lite")
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


@pytest.mark.parametrize("variant", VARIANTS)
def test_reduction_and_returned_logits(variant):
    halo, x, centroids, targets = random_problem(variant=variant)
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
    head = HALOHead(10, 10, variant="rbf_lite")
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


@pytest.mark.parametrize("variant", VARIANTS)
def test_learn_gamma_switch(variant):
    assert not HALOHead(4, 5, variant=variant, learn_gamma=False).loss.gamma_parameter.requires_grad
    assert HALOHead(4, 5, variant=variant).loss.gamma_parameter.requires_grad


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
    with pytest.raises(ValueError, match="variant must be 'published' or 'rbf_lite', got 'seed'"):
        HALOLoss(4, 6, variant="seed")
    with pytest.raises(ValueError, match=r"eps .* \(0, 1\) for the rbf_lite variant"):
        HALOLoss(4, 6, variant="rbf_lite", eps=0)
    for eps in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"eps .* \[0, 1\)"):
            HALOLoss(4, 6, eps=eps)
    with pytest.raises(ValueError, match="margin belongs to the rbf_lite variant"):
        HALOLoss(4, 6).margin
    with pytest.raises(ValueError, match="gamma must be positive"):
        HALOLoss(4, 6).set_gamma(0.0)
    with pytest.raises(ValueError, match="soft_targets"):
        HALOLoss(4, 6, soft_targets="teacher")
    with pytest.raises(ValueError, match="dim"):
        HALOLoss(4, 2)
    with pytest.raises(ValueError, match="centroids must have shape"):
        HALOLoss(4, 6)(torch.randn(3, 6), torch.tensor([0, 1, 2]), torch.randn(5, 6))


# The published formulation, against its formulas written out here in float64.

def published_gamma0(dim):
    return 20 / (2 - (1 - 2 / dim))


def published_bias(classes, dim, eps):
    p_max, p_min = (1 - eps + eps / classes, eps / classes) if eps > 0 else (0.99, 0.01 / classes)
    return published_gamma0(dim) * 2 / dim - math.log(p_max / p_min)


def published_reference(x, centroids, targets, gamma, eps, soft_targets, radial_weight):
    """(true logits, soft targets, radial term, loss per row) from the formulas, on float64 inputs."""
    classes, dim = centroids.shape
    x2 = (x ** 2).sum(1, keepdim=True) / dim
    xc = x @ centroids.T / dim
    c2 = (centroids ** 2).sum(1) / dim
    shifted = gamma * (2 * xc - c2)
    b = published_bias(classes, dim, eps)
    true_logits = torch.cat([torch.minimum(shifted - gamma * x2, torch.zeros(())), b - gamma * x2], dim=1)
    one_hot = torch.nn.functional.one_hot(targets, classes).double()
    if soft_targets == "smooth":
        known = eps / classes + (1 - eps) * one_hot
    elif eps == 0:
        known = one_hot
    else:
        scores = torch.where(one_hot.bool(), 0.0, true_logits[:, :classes] / eps)
        known = scores.exp() / scores.exp().sum(1, keepdim=True)
    soft = torch.cat([known, torch.zeros(len(x), 1, dtype=torch.float64)], dim=1)
    log_p = torch.cat([shifted, torch.full((len(x), 1), b, dtype=torch.float64)], dim=1).log_softmax(1)
    r2 = (((x - centroids[targets]) ** 2).sum(1) / dim).clamp_min(1e-6)
    radial = -((0.5 - 1 / dim) * r2.log() - r2 / 2)
    return true_logits, soft, radial, -(soft * log_p).sum(1) + radial_weight * radial


@pytest.mark.parametrize("dim", [3, 10, 64])
@pytest.mark.parametrize("eps", [0.1, 0.0])
def test_published_gamma0_and_abstain_bias(dim, eps):
    halo = HALOLoss(7, dim, eps=eps)
    theta = halo.gamma_raw.item()
    assert math.log1p(math.exp(theta)) == pytest.approx(published_gamma0(dim), rel=1e-6)  # softplus, float32 theta
    assert halo.gamma.item() == pytest.approx(published_gamma0(dim), rel=1e-6)
    assert halo.abstain_bias().item() == pytest.approx(published_bias(7, dim, eps), rel=1e-6)
    if dim == 10:
        assert halo.gamma.item() == pytest.approx(16.67, abs=5e-3)
        # p_max / p_min = (0.9 + 0.1/7) / (0.1/7) = 64, or 0.99 / (0.01/7) = 693 without smoothing
        expected = 10 / 3 - math.log(64 if eps else 693)
        assert halo.abstain_bias().item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("soft_targets", ["distill", "smooth"])
@pytest.mark.parametrize("eps", [0.3, 0.0])
@pytest.mark.parametrize("gamma", ["initial", "small"])
def test_published_formulas(soft_targets, eps, gamma):
    """Logits, soft targets, radial term and loss on fresh random inputs; a small gamma gives the
    distilled negatives some mass, the initial one tests the default start."""
    classes, dim, batch = 6, 9, 40
    halo = HALOLoss(classes, dim, eps=eps, soft_targets=soft_targets, radial_weight=0.7, reduction="none",
                    fused=False).double()
    if gamma == "small":
        halo.set_gamma(0.02 + 0.1 * torch.rand(()).item())
    centroids = torch.randn(classes, dim, dtype=torch.float64) * 2
    targets = torch.randint(0, classes, (batch,))
    spread = torch.rand(batch, 1, dtype=torch.float64) * 2
    x = centroids[targets] + torch.randn(batch, dim, dtype=torch.float64) * spread
    x[0] = centroids[targets[0]]  # on its centroid: the radial clamp
    true_logits, soft, radial, loss = published_reference(x, centroids, targets, halo.gamma.item(), eps,
                                                          soft_targets, 0.7)
    close = dict(rtol=1e-6, atol=1e-6)  # b is stored in float32
    torch.testing.assert_close(halo.logits(x, centroids), true_logits, **close)
    got_soft = halo.targets_distribution(halo.shifted_logits(x, centroids), targets, embeddings=x)
    torch.testing.assert_close(got_soft, soft, **close)
    torch.testing.assert_close(halo.radial(x, centroids, targets), radial, **close)
    each, _ = halo(x, targets, centroids)
    torch.testing.assert_close(each, loss, **close)
    halo.reduction = "mean"
    torch.testing.assert_close(halo(x, targets, centroids)[0], loss.mean(), **close)
    # The target's own properties, independent of the reference: sums to 1, nothing on abstain,
    # and the smooth target's true class at 1 - eps + eps/K.
    torch.testing.assert_close(got_soft.sum(1), torch.ones(batch, dtype=torch.float64))
    assert torch.all(got_soft[:, -1] == 0)
    if soft_targets == "smooth":
        torch.testing.assert_close(got_soft[torch.arange(batch), targets],
                                   torch.full((batch,), 1 - eps + eps / classes, dtype=torch.float64))
    if gamma == "small" and eps > 0 and soft_targets == "distill":
        negatives = got_soft[:, :-1].masked_fill(torch.nn.functional.one_hot(targets, classes).bool(), 0)
        assert negatives.sum(1).mean() > 0.01  # the comparison above was not between near one-hot targets


def test_published_targets_need_the_embeddings_to_distill():
    halo, x, centroids, targets = random_problem()
    with pytest.raises(ValueError, match="'distill' targets need the embeddings"):
        halo.targets_distribution(halo.shifted_logits(x, centroids), targets)


@pytest.mark.parametrize("soft_targets", ["distill", "smooth"])
def test_published_gradients_pass_gradcheck(soft_targets, monkeypatch):
    """Loss (torch path, raw centroids centred as HALOHead does) against finite differences in
    theta, embeddings and centroids. The targets are detached, so the finite differences must see
    the distilled ones frozen too."""
    classes, dim = 5, 6
    halo = HALOLoss(classes, dim, eps=0.2, soft_targets=soft_targets, fused=False).double()
    halo.set_gamma(0.8)
    x = torch.randn(9, dim, dtype=torch.float64, requires_grad=True)
    centroids = torch.randn(classes, dim, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, classes, (9,))
    theta = halo.gamma_raw.detach().clone().requires_grad_()
    if soft_targets == "distill":
        frozen = halo.targets_distribution(halo.shifted_logits(x, centroids - centroids.mean(0)), targets,
                                           embeddings=x).detach()
        monkeypatch.setattr(halo, "targets_distribution", lambda *args, **kwargs: frozen)

    def loss(x, centroids, theta):
        return torch.func.functional_call(halo, {"gamma_raw": theta}, (x, targets, centroids),
                                          {"return_logits": False, "centre": True})[0]

    assert torch.autograd.gradcheck(loss, (x, centroids, theta))


@pytest.mark.parametrize("fused", [False, True])
def test_published_abstain_bias_stays_put_while_gamma_trains(fused, device):
    head = HALOHead(5, 8, fused=fused).to(device)
    bias, gamma = head.loss.abstain_bias().clone(), head.loss.gamma.item()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    for _ in range(5):
        optimizer.zero_grad()
        head(torch.randn(32, 8, device=device) * 3, torch.randint(0, 5, (32,), device=device))[0].backward()
        optimizer.step()
    assert abs(head.loss.gamma.item() - gamma) > 1e-3
    assert torch.equal(head.loss.abstain_bias(), bias)
    assert head.loss.abstain_bias().item() == pytest.approx(published_bias(5, 8, 0.1), rel=1e-6)


def test_calibrate_is_a_no_op_when_published():
    head = HALOHead(10, 10)
    theta = head.loss.gamma_raw.detach().clone()
    gamma = head.calibrate(torch.randn(256, 10) * 37.0 + 5)
    assert torch.equal(head.loss.gamma_raw, theta)
    assert gamma == head.loss.gamma.item() == pytest.approx(published_gamma0(10), rel=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_set_gamma_round_trips(variant, dtype, rel):
    halo = HALOLoss(4, 6, variant=variant).to(dtype)
    for value in (1e-3, 0.5, 2.0, published_gamma0(6), 50.0):
        halo.set_gamma(value)
        assert halo.gamma.item() == pytest.approx(value, rel=rel)
        assert halo.gamma_parameter.dtype == dtype


def test_halo_head_defaults_to_published():
    head = HALOHead(4, 5)
    assert head.loss.variant == "published" and HALOLoss(4, 5).variant == "published"
    assert not hasattr(head.loss, "log_gamma")
    assert hasattr(HALOHead(4, 5, variant="rbf_lite").loss, "log_gamma")


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_loads_into_the_same_variant(variant):
    saved = HALOHead(4, 5, variant=variant)
    saved.loss.set_gamma(3.3)
    state = saved.state_dict()
    assert set(state) == {"centroids", "loss.gamma_raw" if variant == "published" else "loss.log_gamma"}
    loaded = HALOHead(4, 5, variant=variant)
    loaded.load_state_dict(state)
    assert torch.equal(loaded.centroids, saved.centroids) and torch.equal(loaded.loss.gamma, saved.loss.gamma)
    torch.testing.assert_close(loaded.loss.abstain_bias(), saved.loss.abstain_bias())
    other = "rbf_lite" if variant == "published" else "published"
    with pytest.raises(RuntimeError, match="Missing key"):
        HALOHead(4, 5, variant=other).load_state_dict(state)


# The fused Triton loss (rbf_lite.kernels.halo_head), run by Triton's interpreter on the CPU.

def fused_and_reference(classes, dim, device, variant, seed=0, **options):
    """An fp32 head on the fused path (GPU, or the interpreter on the CPU), and a float64 copy of
    it on the torch path; gamma moved off its start by a random factor."""
    torch.manual_seed(seed)
    fused = HALOHead(classes, dim, variant=variant, fused=True, **options).to(device)
    reference = HALOHead(classes, dim, variant=variant, fused=False, **options).double().to(device)
    with torch.no_grad():
        fused.centroids.add_(torch.randn(dim, device=device))  # raw centroids off-centre: the centring matters
    fused.loss.set_gamma(fused.loss.gamma.item() * math.exp(0.5 * torch.randn(()).item()))
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def loss_and_grads(head, x, targets, grad_output=1.7):
    """Through HALOHead's loss (HALOHead.forward itself casts to fp32), centring as HALOHead does."""
    x = x.detach().clone().requires_grad_()
    loss, _ = head.loss(x, targets, head.centroids, return_logits=False, centre=True)
    (grad_output * loss).backward()
    return loss.detach(), x.grad, head.centroids.grad, head.loss.gamma_parameter.grad


def assert_matches_reference(fused, reference, x, targets):
    got = loss_and_grads(fused, x, targets)
    expected = loss_and_grads(reference, x.double(), targets)
    for name, a, b in zip(("loss", "embeddings", "centroids", "gamma parameter"), got, expected):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch,classes,dim", [(1, 2, 3), (37, 7, 10), (300, 10, 17)])
@pytest.mark.parametrize("soft_targets", ["distill", "smooth"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("radial_weight", [0.0, 0.7])
def test_fused_loss_and_gradients_match_the_torch_path(batch, classes, dim, soft_targets, reduction, radial_weight,
                                                       variant, device):
    fused, reference = fused_and_reference(classes, dim, device, variant, soft_targets=soft_targets,
                                           reduction=reduction, radial_weight=radial_weight)
    fused.loss.rows_per_program = 64  # 300 rows: five programs, their partial gradients summed
    x = torch.randn(batch, dim, device=device) * 2
    assert_matches_reference(fused, reference, x, torch.randint(0, classes, (batch,), device=device))


@pytest.mark.parametrize("soft_targets", ["distill", "smooth"])
def test_fused_published_without_label_smoothing(soft_targets, device):
    """eps = 0: one-hot targets, through the kernel too."""
    fused, reference = fused_and_reference(7, 10, device, "published", eps=0.0, soft_targets=soft_targets)
    x, targets = torch.randn(50, 10, device=device) * 2, torch.randint(0, 7, (50,), device=device)
    assert fused.loss.uses_fused(x, fused.centroids)
    assert_matches_reference(fused, reference, x, targets)


@pytest.mark.parametrize("gamma", [1e-6, 1e-3, 30.0])
def test_fused_softplus_far_from_its_knee(gamma, device):
    """The kernel's softplus keeps a tiny gamma to float32 precision (plain log(1 + e^theta) would
    not), and its derivative sigmoid(theta) saturates correctly. Without the radial term every
    gradient scales with gamma, so each is compared relative to its own size; the centroids are
    off-centre so that no gradient is a small difference of large terms."""
    fused = HALOLoss(5, 8, radial_weight=0.0, fused=True).to(device)
    fused.set_gamma(gamma)
    reference = HALOLoss(5, 8, radial_weight=0.0, fused=False).double().to(device)
    reference.load_state_dict(fused.state_dict())
    centroids = torch.randn(5, 8, device=device) + 3
    x, targets = torch.randn(30, 8, device=device) * 2, torch.randint(0, 5, (30,), device=device)
    results = []
    for halo, dtype in ((fused, torch.float32), (reference, torch.float64)):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (x, centroids)]
        loss, _ = halo(inputs[0], targets, inputs[1], return_logits=False)
        loss.backward()
        results.append([loss.detach(), inputs[0].grad, inputs[1].grad, halo.gamma_raw.grad])
    for name, a, b in zip(("loss", "embeddings", "centroids", "gamma parameter"), *results):
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-5, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_without_learned_gamma(variant, device):
    fused, reference = fused_and_reference(5, 6, device, variant, learn_gamma=False)
    x = torch.randn(20, 6, device=device)
    assert_matches_reference(fused, reference, x, torch.randint(0, 5, (20,), device=device))
    assert fused.loss.gamma_parameter.grad is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_at_the_radial_clamp(variant, device):
    """x exactly on its centroid: r^2 = 0 is clamped, with zero radial gradient, as in the torch path."""
    fused, reference = fused_and_reference(6, 9, device, variant)
    targets = torch.tensor([0, 3, 3, 5, 1], device=device)
    x = fused.centred_centroids().detach()[targets]
    x[-1] += torch.randn(9, device=device)  # one row off its centroid
    assert_matches_reference(fused, reference, x, targets)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_reads_strided_embeddings(variant, device):
    fused, reference = fused_and_reference(7, 10, device, variant)
    x = torch.randn(40, 30, device=device)[:, 1::3]  # row stride 30, column stride 3
    assert not x.is_contiguous()
    assert_matches_reference(fused, reference, x, torch.randint(0, 7, (40,), device=device))
    x = torch.randn(10, 40, device=device).t()  # column-major
    assert_matches_reference(fused, reference, x, torch.randint(0, 7, (40,), device=device))


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_loss_without_centring_and_with_logits(variant, device):
    """HALOLoss called directly (centroids as given), returning the logits too."""
    halo = HALOLoss(4, 8, variant=variant, fused=True).to(device)
    centroids = torch.randn(4, 8, device=device, requires_grad=True)
    x = torch.randn(12, 8, device=device, requires_grad=True)
    targets = torch.randint(0, 4, (12,), device=device)
    loss, logits = halo(x, targets, centroids)
    loss.backward()
    halo.fused = False
    expected = [t.detach().clone() for t in halo(x, targets, centroids)]
    fused_grads = [t.grad for t in (x, centroids, halo.gamma_parameter)]
    x.grad, centroids.grad, halo.gamma_parameter.grad = None, None, None
    halo(x, targets, centroids)[0].backward()
    torch.testing.assert_close(loss.detach(), expected[0])
    torch.testing.assert_close(logits, expected[1])
    for got, tensor in zip(fused_grads, (x, centroids, halo.gamma_parameter)):
        torch.testing.assert_close(got, tensor.grad, rtol=1e-4, atol=1e-5)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused kernel's launches."""
    from rbf_lite.kernels import halo_head
    calls = []
    launch = halo_head.halo_loss_and_grads

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs)

    monkeypatch.setattr(halo_head, "halo_loss_and_grads", counted)
    return calls


def test_fused_path_is_taken_where_it_applies(fused_calls, device):
    x, targets = torch.randn(8, 6, device=device), torch.randint(0, 4, (8,), device=device)
    HALOHead(4, 6).to(device)(x, targets, return_logits=False)  # fp32 and Triton available: auto
    assert len(fused_calls) == 1
    HALOHead(4, 6, fused=False).to(device)(x, targets)
    HALOHead(4, 6, reduction="none").to(device)(x, targets)
    HALOLoss(4, 6).double().to(device)(x.double(), targets, torch.randn(4, 6, dtype=torch.float64, device=device))
    assert len(fused_calls) == 1
    with pytest.raises(RuntimeError, match="fused=True.*fp32"):
        HALOLoss(4, 6, fused=True).double().to(device)(x.double(), targets,
                                                         torch.randn(4, 6, dtype=torch.float64, device=device))
    with pytest.raises(RuntimeError, match="reduction='none'"):
        HALOHead(4, 6, fused=True, reduction="none").to(device)(x, targets)


@pytest.mark.parametrize("rows_per_program", [64, 512])
def test_fused_kernel_flags_out_of_range_targets(rows_per_program, device):
    """What a CUDA caller asserts on (check_batch leaves CUDA targets to the kernel): nonzero iff
    every target is valid, from one program or summed over several; bad targets are never read."""
    from rbf_lite.kernels.halo_head import halo_loss_and_grads
    x, centroids = torch.randn(150, 5, device=device), torch.randn(3, 5, device=device)
    theta = torch.zeros((), device=device)
    for targets, valid in [(torch.randint(0, 3, (150,)), True), (torch.full((150,), 3), False),
                           (torch.tensor([0] * 149 + [-1]), False)]:
        targets = targets.to(device)
        for published in (False, True):
            loss, grads, flag = halo_loss_and_grads(x, targets, centroids, theta, eps=0.1, abstain_offset=-1.0,
                                                    radial_weight=1.0, distill=True, published=published,
                                                    centre=True, mean=True, rows_per_program=rows_per_program)
            assert bool(flag) is valid and torch.isfinite(loss) and torch.isfinite(grads).all()
