"""HALO: classification by distance to learned centroids, with an abstain class at the origin.

A linear head + cross-entropy lets confidence grow without bound as an embedding moves away from
the decision boundary. HALO instead scores class k by how close the embedding x (in R^D) lies
to its centroid c_k (mean-centred, `HALOHead`):

    logit_k = -gamma * ||x - c_k||^2 / D

Expanding the square, -gamma ||x||^2 / D is the same in every column of a row, so softmax and
cross-entropy only need the *shifted* logits s_k = gamma (2 x.c_k - ||c_k||^2) / D: one matmul.

Abstain. A virtual class K+1 has its centroid pinned at the origin. Its true logit is
b - gamma ||x||^2 / D, which after the shift is the constant b: one extra column, no parameters.
The network is never asked to predict it (its target probability is 0); it wins only where an
embedding lies far enough from every centroid compared with the origin, how far set by b.

Radial ("soap bubble") term. With r^2 = ||x - c_y||^2 / D,
L_rad = -((1/2 - 1/D) log r^2 - r^2 / 2), minimised at r^2 = 1 - 2/D: the mode of a chi-square
with D degrees of freedom, the thin shell on which a D-dimensional Gaussian's mass lives. It
stops cross-entropy from crushing every embedding onto its centroid. Per row,
loss = soft-target cross-entropy over the K+1 shifted logits + radial_weight * L_rad.

The two variants differ in gamma, b and the soft targets.

Published (variant="published", the default): the seed's formulation. With x2 = ||x||^2 / D,
  - gamma = softplus(theta), theta learned, starting at gamma0 = 20 / (2 - (1 - 2/D)) (16.67 at D = 10);
  - b = gamma0 2/D - log(p_max / p_min), fixed at construction (it does not follow gamma), with
    p_max = 1 - eps + eps/K and p_min = eps/K (eps = 0, no label smoothing: 0.99 and 0.01/K);
  - true logits t_k = min(s_k - gamma x2, 0), abstain b - gamma x2;
  - targets (detached, 0 on abstain): "distill" is the softmax over the K known classes of 0 on
    the true class and t_k / eps on each negative; "smooth" is eps/K on every known class plus
    1 - eps on the true one. With eps = 0 both are one-hot.

rbf_lite (variant="rbf_lite"): an ablation, our own derivation.
  - gamma = exp(log_gamma), set by `calibrate_gamma` on one batch of the untrained network so that
    a row's shifted logits have standard deviation 1 across the K classes (averaged over the
    batch): moderate logits whatever the backbone's output scale, so the first softmax is neither
    uniform nor saturated. Until calibrated, gamma = 1.
  - targets: 1 - eps on the true class, eps over the negatives ("distill": in proportion to the
    model's detached probabilities; "smooth": uniformly), 0 on abstain.
  - b tracks gamma, b = -gamma (1 - 2/D) - m (detached from gamma's gradient). Derivation:
    1. the radial term parks an in-distribution x on the shell ||x - c_y||^2 = D - 2;
    2. so its own class's true logit there is -gamma (D - 2) / D = -gamma (1 - 2/D): the
       ||x||^2 and ||c_y||^2 of the expanded square cancel into the distance, no centroid norm left;
    3. the abstain column's true logit is b - gamma ||x||^2 / D <= b, so the own class beats
       abstain by at least -gamma (1 - 2/D) - b wherever x sits on the shell;
    4. we want that lead to be one cross-entropy margin m: the logit gap that cross-entropy drives
       the true class to over a negative under these soft targets, m = log((1 - eps)(K - 1) / eps);
    5. hence b = -gamma (1 - 2/D) - m.

Fused path. Composed from torch ops, the loss's forward and backward are about 90 small kernel
launches, which makes an eager training step launch-bound. Where it applies (fp32, CUDA or
TRITON_INTERPRET=1, reduction "mean" or "sum", not under torch.compile, which fuses the torch ops
itself), `HALOLoss` instead runs `rbf_lite.kernels.halo_head`, for either variant: one Triton kernel
computes the loss and all its gradients at forward time, and the backward is one multiply by
grad_output. The torch composition below stays the specification and the fallback.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .rbf import triton_available


def check_batch(embeddings: torch.Tensor, targets: torch.Tensor | None, num_classes: int,
                dim: int, device_check: bool = True) -> None:
    """Clear errors for the mistakes a caller can make; the value check is skipped when compiling.

    device_check=False leaves the value check of CUDA targets to the caller (the fused kernel
    checks them as it reads them); CPU targets are still checked here, with a clear error."""
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        raise ValueError(f"embeddings must have shape (batch, {dim}), got {tuple(embeddings.shape)}")
    if embeddings.shape[0] == 0:
        raise ValueError("empty batch: embeddings has 0 rows")
    if targets is None:
        return
    if targets.shape != embeddings.shape[:1]:
        raise ValueError(f"targets must have shape ({embeddings.shape[0]},), got {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be integer class indices (torch.int64), got {targets.dtype}")
    if torch.compiler.is_compiling():
        return
    if targets.is_cuda:
        if not device_check:
            return
        # A host sync every step would stall the launch queue (and cost HALO's many small ops
        # their overlap with the backbone): check on the device, failing at the next sync.
        torch._assert_async(((targets >= 0) & (targets < num_classes)).all(),
                            f"targets must lie in [0, {num_classes})")
        return
    low, high = torch.stack(torch.aminmax(targets)).tolist()  # one device sync, not two
    if low < 0 or high >= num_classes:
        raise ValueError(f"targets must lie in [0, {num_classes}), got values in [{low}, {high}]")


def centred(centroids: torch.Tensor) -> torch.Tensor:
    """Centroids minus their mean: HALOHead's parametrisation (a common shift changes no logit)."""
    return centroids - centroids.mean(dim=0, keepdim=True)


VARIANTS = ("published", "rbf_lite")


def inverse_softplus(value: float) -> float:
    """theta with softplus(theta) = value > 0, without overflow: value + log(1 - exp(-value))."""
    return value + math.log(-math.expm1(-value))


class HALOLoss(nn.Module):
    """Distance logits + abstain column + radial term + soft-target cross-entropy.

    `loss, logits = halo(embeddings, targets, centroids)`; `logits` has K+1 columns, abstain last,
    and are the true (clamped-distance) logits: the same softmax as the shifted ones the loss uses.
    variant: "published" (the seed's formulation) or "rbf_lite" (our ablation); the module
    docstring gives both. soft_targets: "distill" (the model's own detached logits shape the mass
    on the negatives: dark knowledge) or "smooth" (uniform), as each variant defines them.
    fused: None runs the fused Triton loss wherever it applies (module docstring), False always
    the torch composition, True requires the fused loss (RuntimeError where it cannot run; under
    torch.compile the torch composition is still used, since the compiler fuses it).
    """
    rows_per_program = 512  # fused kernel: batch rows per program; more programs cost one more launch

    def __init__(self, num_classes: int, dim: int, variant: str = "published", eps: float = 0.1,
                 soft_targets: str = "distill", learn_gamma: bool = True, radial_weight: float = 1.0,
                 reduction: str = "mean", fused: bool | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be 'published' or 'rbf_lite', got {variant!r}")
        if num_classes < 2:
            raise ValueError(f"need at least 2 classes, got {num_classes}")
        if dim < 3:
            raise ValueError(f"dim must be at least 3 for the radial shell r^2 = 1 - 2/D > 0, got {dim}")
        if variant == "rbf_lite" and not 0 < eps < 1:
            raise ValueError(f"eps (target mass on the negatives) must lie in (0, 1) for the rbf_lite "
                             f"variant, got {eps}")
        if not 0 <= eps < 1:
            raise ValueError(f"eps (label smoothing) must lie in [0, 1), got {eps}")
        if soft_targets not in ("distill", "smooth"):
            raise ValueError(f"soft_targets must be 'distill' or 'smooth', got {soft_targets!r}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.num_classes, self.dim, self.variant, self.eps = num_classes, dim, variant, eps
        self.soft_targets, self.radial_weight, self.reduction = soft_targets, radial_weight, reduction
        self.fused = fused
        if variant == "rbf_lite":
            self.log_gamma = nn.Parameter(torch.zeros(()), requires_grad=learn_gamma)
            return
        gamma0 = 20 / (2 - (1 - 2 / dim))
        self.gamma_raw = nn.Parameter(torch.tensor(inverse_softplus(gamma0)), requires_grad=learn_gamma)
        p_max, p_min = (1 - eps + eps / num_classes, eps / num_classes) if eps > 0 else (0.99, 0.01 / num_classes)
        # b is a constant of K, D and eps: not saved, so that a checkpoint cannot contradict the
        # constructor; the fused kernel takes it as a float (reading the buffer would sync the host).
        self.fixed_abstain_bias_value = gamma0 * 2 / dim - math.log(p_max / p_min)
        self.register_buffer("fixed_abstain_bias", torch.tensor(self.fixed_abstain_bias_value), persistent=False)

    @property
    def gamma_parameter(self) -> nn.Parameter:
        """The learned parameter behind gamma: log_gamma (rbf_lite) or theta = gamma_raw (published)."""
        return self.log_gamma if self.variant == "rbf_lite" else self.gamma_raw

    @property
    def gamma(self) -> torch.Tensor:
        return self.log_gamma.exp() if self.variant == "rbf_lite" else F.softplus(self.gamma_raw)

    @torch.no_grad()
    def set_gamma(self, value: float) -> None:
        """Puts gamma at `value` through the variant's parametrisation (figures at a given gamma, tests)."""
        if not value > 0:
            raise ValueError(f"gamma must be positive, got {value}")
        if self.variant == "rbf_lite":
            self.log_gamma.fill_(math.log(value))
        else:
            self.gamma_raw.fill_(inverse_softplus(value))

    @property
    def margin(self) -> float:
        """rbf_lite: cross-entropy margin, the log-odds of the true class over a mean negative in the soft target."""
        if self.variant != "rbf_lite":
            raise ValueError("margin belongs to the rbf_lite variant's abstain bias; the published variant's "
                             "b is fixed at construction (abstain_bias())")
        return math.log((1 - self.eps) * (self.num_classes - 1) / self.eps)

    def abstain_bias(self) -> torch.Tensor:
        """b (module docstring): a constant buffer (published), or -gamma (1 - 2/D) - margin (rbf_lite),
        detached there so that abstain does not train gamma."""
        if self.variant == "published":
            return self.fixed_abstain_bias
        return -self.gamma.detach() * (1 - 2 / self.dim) - self.margin

    @torch.no_grad()
    def calibrate_gamma(self, embeddings: torch.Tensor, centroids: torch.Tensor) -> float:
        """The rbf_lite gamma init rule: unit standard deviation of a row's K logits, on average.
        Published: nothing to do (gamma starts at gamma0); returns gamma all the same, so that
        trainers treat both variants alike."""
        if self.variant == "published":
            return self.gamma.item()
        check_batch(embeddings, None, self.num_classes, self.dim)
        with torch.autocast(embeddings.device.type, enabled=False):
            shifted = self._distance_terms(embeddings.float(), centroids.float()) / self.dim
        spread = shifted.std(dim=1).mean().clamp_min(1e-12)
        self.log_gamma.copy_(-spread.log())
        return self.gamma.item()

    @staticmethod
    def _distance_terms(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """2 x.c_k - ||c_k||^2, i.e. ||x||^2 - ||x - c_k||^2: the shifted logit before gamma / D."""
        return 2 * x @ c.T - (c * c).sum(dim=1)

    def shifted_logits(self, embeddings: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """The K+1 logits minus the row constant -gamma ||x||^2 / D; the abstain column is constant."""
        known = self.gamma * self._distance_terms(embeddings, centroids) / self.dim
        abstain = self.abstain_bias().to(known.dtype).expand(known.shape[0], 1)
        return torch.cat([known, abstain], dim=1)

    def logits(self, embeddings: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """True logits -gamma d^2 / D (= min(s_k - gamma ||x||^2 / D, 0)), squared distances clamped at 0
        against rounding; abstain last."""
        check_batch(embeddings, None, self.num_classes, self.dim)
        row = (embeddings * embeddings).sum(dim=1, keepdim=True)
        squared = (row - self._distance_terms(embeddings, centroids)).clamp_min(0)
        known = -self.gamma * squared / self.dim
        abstain = self.abstain_bias() - self.gamma * row / self.dim
        return torch.cat([known, abstain], dim=1)

    def is_true(self, targets: torch.Tensor) -> torch.Tensor:
        """(batch, K) mask of each row's class. A comparison, not F.one_hot: one_hot range-checks
        its input with a host sync every call."""
        return targets[:, None] == torch.arange(self.num_classes, device=targets.device)

    def targets_distribution(self, shifted: torch.Tensor, targets: torch.Tensor,
                             is_true: torch.Tensor | None = None,
                             embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Soft targets over K+1 classes, 0 on abstain, detached (module docstring, per variant).
        The published "distill" targets need the embeddings: their norms turn the shifted logits
        into the true ones."""
        known = shifted[:, :self.num_classes].detach()
        is_true = self.is_true(targets) if is_true is None else is_true
        if self.variant == "rbf_lite":
            if self.soft_targets == "distill":
                negatives = known.masked_fill(is_true, float("-inf")).softmax(dim=1)
            else:
                negatives = (~is_true).to(known.dtype) / (self.num_classes - 1)
            known_targets = torch.where(is_true, 1 - self.eps, self.eps * negatives)
        elif self.soft_targets == "smooth" or self.eps == 0:  # with eps = 0 both are one-hot
            uniform = self.eps / self.num_classes
            known_targets = torch.full_like(known, uniform).masked_fill(is_true, 1 - self.eps + uniform)
        else:
            if embeddings is None:
                raise ValueError("the published variant's 'distill' targets need the embeddings")
            row = embeddings.detach().square().sum(dim=1, keepdim=True) / self.dim
            true_logits = (known - self.gamma.detach() * row).clamp_max(0)
            # Every score is <= 0 and the true class's is 0: the softmax cannot overflow.
            known_targets = (true_logits / self.eps).masked_fill(is_true, 0).softmax(dim=1)
        return torch.cat([known_targets, known_targets.new_zeros(known.shape[0], 1)], dim=1)

    def radial(self, embeddings: torch.Tensor, centroids: torch.Tensor, targets: torch.Tensor,
               is_true: torch.Tensor | None = None) -> torch.Tensor:
        """L_rad per example, on r^2 = ||x - c_y||^2 / D computed directly (exact at x = c_y).
        c_y is picked by a one-hot matmul: its backward is one matmul, an indexed gather's is a
        scatter (several kernels)."""
        is_true = self.is_true(targets) if is_true is None else is_true
        r2 = ((embeddings - is_true.to(centroids.dtype) @ centroids) ** 2).sum(dim=1) / self.dim
        r2 = r2.clamp_min(1e-6)
        return -((0.5 - 1 / self.dim) * r2.log() - 0.5 * r2)

    def uses_fused(self, embeddings: torch.Tensor, centroids: torch.Tensor) -> bool:
        """Whether `forward` runs the fused Triton loss on these inputs (see `fused`)."""
        if self.fused is False or torch.compiler.is_compiling():
            return False
        reason = None
        if self.reduction == "none":
            reason = "reduction='none'"
        elif not embeddings.dtype == centroids.dtype == self.gamma_parameter.dtype == torch.float32:
            reason = "fp32 embeddings, centroids and gamma parameter"
        elif not embeddings.device == centroids.device == self.gamma_parameter.device:
            reason = "one device for every input"
        elif not triton_available(embeddings.device):
            reason = "Triton on a CUDA GPU with compute capability >= 8.0, or TRITON_INTERPRET=1"
        else:
            from .kernels.halo_head import fits
            if not fits(self.num_classes, self.dim):
                reason = f"a smaller head than {self.num_classes} classes x {self.dim} dimensions"
        if reason is not None and self.fused:
            raise RuntimeError(f"fused=True, but the fused HALO loss needs {reason}; use fused=None or False")
        return reason is None

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, centroids: torch.Tensor,
                return_logits: bool = True, centre: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss and the true logits; return_logits=False skips the logits (None), which a
        training step does not need: about a fifth of the torch path's kernel launches.
        centre=True mean-centres the centroids first (`HALOHead`'s parametrisation): the fused
        kernel then does it on the fly, and its gradient reaches the raw centroids."""
        fused = self.uses_fused(embeddings, centroids)
        check_batch(embeddings, targets, self.num_classes, self.dim, device_check=not fused)
        if centroids.shape != (self.num_classes, self.dim):
            raise ValueError(f"centroids must have shape ({self.num_classes}, {self.dim}), "
                             f"got {tuple(centroids.shape)}")
        if fused:
            from .kernels.halo_head import FusedHALOLoss
            published = self.variant == "published"
            # With eps = 0 the published "distill" targets are one-hot, as "smooth" ones are.
            loss = FusedHALOLoss.apply(embeddings, targets, centroids, self.gamma_parameter, self.eps,
                                       self.fixed_abstain_bias_value if published else -self.margin,
                                       self.radial_weight, self.soft_targets == "distill" and self.eps > 0,
                                       published, centre, self.reduction == "mean", self.rows_per_program)
        else:
            centroids, centre = (centred(centroids) if centre else centroids), False
            shifted = self.shifted_logits(embeddings, centroids)
            is_true = self.is_true(targets)
            soft = self.targets_distribution(shifted, targets, is_true, embeddings)
            cross_entropy = -(soft * shifted.log_softmax(dim=1)).sum(dim=1)
            loss = cross_entropy + self.radial_weight * self.radial(embeddings, centroids, targets, is_true)
            if self.reduction == "mean":
                loss = loss.mean()
            elif self.reduction == "sum":
                loss = loss.sum()
        if not return_logits:
            return loss, None
        centroids = centroids.detach()
        return loss, self.logits(embeddings.detach(), centred(centroids) if centre else centroids)


class HALOHead(nn.Module):
    """Holds the K x D centroids (mean-centred on every forward) and the HALO loss.

    `loss, logits = head(embeddings, targets)`; with targets=None the loss is None. Centroids
    start as N(0, I) so that neighbouring centroids sit about sqrt(2D) apart, wider than the
    shell radius sqrt(D - 2) the radial term sets.

    `variant` and the other options go to `HALOLoss`.

    Train the centroids and gamma more slowly than the backbone (`rbf_lite.cifar` uses 0.1x).
    The loss has a trivial minimum: every embedding at one point, every centroid on the sphere of
    radius sqrt(D - 2) around it. The radial term is then exactly satisfied, cross-entropy sits at
    uniform, and once gamma has shrunk the gradients that could leave it vanish. At the backbone's
    SGD rate (0.2) the head reaches it within a few dozen steps on CIFAR-10, before the backbone's
    features separate the classes (`results/cifar10-sweep/`, the rbf_lite variant).
    """
    abstains = True

    def __init__(self, num_classes: int, dim: int, variant: str = "published", **loss_options):
        super().__init__()
        self.centroids = nn.Parameter(torch.randn(num_classes, dim))
        self.loss = HALOLoss(num_classes, dim, variant, **loss_options)

    def centred_centroids(self) -> torch.Tensor:
        return centred(self.centroids)

    def calibrate(self, embeddings: torch.Tensor) -> float:
        """`HALOLoss.calibrate_gamma` on these embeddings: the rbf_lite init rule, a no-op when published."""
        return self.loss.calibrate_gamma(embeddings, self.centred_centroids())

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor | None = None,
                return_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        embeddings = embeddings.float()
        if targets is None:
            return None, self.loss.logits(embeddings, self.centred_centroids())
        return self.loss(embeddings, targets, self.centroids, return_logits, centre=True)


class LinearHead(nn.Module):
    """The baseline: a linear layer and (optionally label-smoothed) cross-entropy."""
    abstains = False

    def __init__(self, num_classes: int, dim: int, label_smoothing: float = 0.0):
        super().__init__()
        self.num_classes, self.dim, self.label_smoothing = num_classes, dim, label_smoothing
        self.linear = nn.Linear(dim, num_classes)

    def calibrate(self, embeddings: torch.Tensor) -> None:
        """Nothing to calibrate: present so that trainers treat both heads alike."""

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor | None = None,
                return_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """return_logits is accepted for symmetry with HALOHead; the logits come for free here."""
        check_batch(embeddings, targets, self.num_classes, self.dim)
        logits = self.linear(embeddings.float())
        if targets is None:
            return None, logits
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing), logits
