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


# The fused Triton loss (rbf_lite.kernels.halo_head), run by Triton's interpreter on the CPU.

def fused_and_reference(classes, dim, device, seed=0, **options):
    """An fp32 head on the fused path (GPU, or the interpreter on the CPU), and a float64 copy of
    it on the torch path."""
    torch.manual_seed(seed)
    fused = HALOHead(classes, dim, fused=True, **options).to(device)
    reference = HALOHead(classes, dim, fused=False, **options).double().to(device)
    with torch.no_grad():
        fused.centroids.add_(torch.randn(dim, device=device))  # raw centroids off-centre: the centring matters
        fused.loss.log_gamma.fill_(0.5 * torch.randn(()).item())
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def loss_and_grads(head, x, targets, grad_output=1.7):
    """Through HALOHead's loss (HALOHead.forward itself casts to fp32), centring as HALOHead does."""
    x = x.detach().clone().requires_grad_()
    loss, _ = head.loss(x, targets, head.centroids, return_logits=False, centre=True)
    (grad_output * loss).backward()
    return loss.detach(), x.grad, head.centroids.grad, head.loss.log_gamma.grad


def assert_matches_reference(fused, reference, x, targets):
    got = loss_and_grads(fused, x, targets)
    expected = loss_and_grads(reference, x.double(), targets)
    for name, a, b in zip(("loss", "embeddings", "centroids", "log_gamma"), got, expected):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("batch,classes,dim", [(1, 2, 3), (37, 7, 10), (300, 10, 17)])
@pytest.mark.parametrize("soft_targets", ["distill", "smooth"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("radial_weight", [0.0, 0.7])
def test_fused_loss_and_gradients_match_the_torch_path(batch, classes, dim, soft_targets, reduction, radial_weight,
                                                       device):
    fused, reference = fused_and_reference(classes, dim, device, soft_targets=soft_targets, reduction=reduction,
                                           radial_weight=radial_weight)
    fused.loss.rows_per_program = 64  # 300 rows: five programs, their partial gradients summed
    x = torch.randn(batch, dim, device=device) * 2
    assert_matches_reference(fused, reference, x, torch.randint(0, classes, (batch,), device=device))


def test_fused_without_learned_gamma(device):
    fused, reference = fused_and_reference(5, 6, device, learn_gamma=False)
    x = torch.randn(20, 6, device=device)
    assert_matches_reference(fused, reference, x, torch.randint(0, 5, (20,), device=device))
    assert fused.loss.log_gamma.grad is None


def test_fused_at_the_radial_clamp(device):
    """x exactly on its centroid: r^2 = 0 is clamped, with zero radial gradient, as in the torch path."""
    fused, reference = fused_and_reference(6, 9, device)
    targets = torch.tensor([0, 3, 3, 5, 1], device=device)
    x = fused.centred_centroids().detach()[targets]
    x[-1] += torch.randn(9, device=device)  # one row off its centroid
    assert_matches_reference(fused, reference, x, targets)


def test_fused_reads_strided_embeddings(device):
    fused, reference = fused_and_reference(7, 10, device)
    x = torch.randn(40, 30, device=device)[:, 1::3]  # row stride 30, column stride 3
    assert not x.is_contiguous()
    assert_matches_reference(fused, reference, x, torch.randint(0, 7, (40,), device=device))
    x = torch.randn(10, 40, device=device).t()  # column-major
    assert_matches_reference(fused, reference, x, torch.randint(0, 7, (40,), device=device))


def test_fused_loss_without_centring_and_with_logits(device):
    """HALOLoss called directly (centroids as given), returning the logits too."""
    halo = HALOLoss(4, 8, fused=True).to(device)
    centroids = torch.randn(4, 8, device=device, requires_grad=True)
    x = torch.randn(12, 8, device=device, requires_grad=True)
    targets = torch.randint(0, 4, (12,), device=device)
    loss, logits = halo(x, targets, centroids)
    loss.backward()
    halo.fused = False
    expected = [t.detach().clone() for t in halo(x, targets, centroids)]
    x.grad, centroids.grad, halo.log_gamma.grad = None, None, None
    halo(x, targets, centroids)[0].backward()
    torch.testing.assert_close(loss.detach(), expected[0])
    torch.testing.assert_close(logits, expected[1])
    for tensor in (x, centroids, halo.log_gamma):
        assert tensor.grad is not None


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
    log_gamma = torch.zeros((), device=device)
    for targets, valid in [(torch.randint(0, 3, (150,)), True), (torch.full((150,), 3), False),
                           (torch.tensor([0] * 149 + [-1]), False)]:
        targets = targets.to(device)
        loss, grads, flag = halo_loss_and_grads(x, targets, centroids, log_gamma, eps=0.1, margin=1.0,
                                                radial_weight=1.0, distill=True, centre=True, mean=True,
                                                rows_per_program=rows_per_program)
        assert bool(flag) is valid and torch.isfinite(loss) and torch.isfinite(grads).all()
