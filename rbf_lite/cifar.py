"""Train a CIFAR ResNet-18 with a HALO or a linear cross-entropy head; evaluate calibration and OOD.

    python -m rbf_lite.cifar --loss halo --epochs 30 --seed 0 --data ../shared/data --out runs/halo

The training set lives on the device as uint8; each batch is cropped, flipped and normalised
there (`rbf_lite.data.images.augment`). The backbone runs in bf16 autocast and channels_last on a
GPU, fp32 on the CPU; heads always compute in fp32 because squared distances lose too much in
bf16. Both losses share the backbone and its embedding width, which defaults to the number of
classes: the seed's deliberate handicap (10 dimensions on CIFAR-10).

A class-balanced split of the training set (`--holdout`, 5,000 images, the same for every run) is
never trained on: it fits the temperature of post-hoc temperature scaling, the calibration baseline
a practitioner would use (`ece_temperature` in the summary).

The run ends by evaluating accuracy, NLL, ECE and OOD detection on every available OOD set, and
writes `out/log.jsonl`, `out/summary.json` (with the reliability-diagram data), `out/latents.npz`
(a sample of the test and OOD embeddings, and HALO's centroids, for the latent-space figure:
`rbf_lite.metrics.pca`) and `out/checkpoint.pt` (written every epoch; `--resume` continues from it).
A folder that already holds a run is refused unless `--resume` or `--overwrite` says what to do.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import metrics
from .data import DataNotFoundError, hub_unreachable
from .data import images as image_data
from .halo import HALOHead, LinearHead
from .models.resnet import ResNet18
from .runs import (JsonlLog, environment, load_checkpoint, prepare_run_dir, progress, save_checkpoint,
                   seed_everything, write_json)

DEFAULT_OOD = ("svhn", "cifar10", "cifar100", "mnist", "fashion-mnist", "uniform-noise", "gaussian-noise")
# Settings that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("resume", "overwrite", "device", "compile", "out", "data")


@dataclass
class Config:
    loss: str = field(default="halo", metadata={"help": "halo or cce (linear head + cross-entropy)"})
    halo_variant: str = field(default="published", metadata={
        "help": "HALO: published (the seed's formulation) or rbf_lite (our derivation, an ablation)"})
    dataset: str = field(default="cifar10", metadata={
        "help": f"one of {sorted(image_data.HUB)} or an open-set split {sorted(image_data.OPEN_SET_SPLITS)}"})
    data: str | None = field(default=None, metadata={"type": str,
        "help": "data folder (or the dataset's .tar.gz); default $RBF_LITE_DATA, then ../shared/data"})
    out: str = field(default="runs/cifar", metadata={"help": "output folder"})
    epochs: int = field(default=30, metadata={"help": "training epochs"})
    batch_size: int = field(default=512, metadata={"help": "training batch size"})
    lr: float = field(default=0.2, metadata={"help": "peak learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD (Nesterov) momentum"})
    weight_decay: float = field(default=5e-4, metadata={
        "help": "on conv/linear weights; not on norms, biases, centroids or gamma"})
    grad_clip: float = field(default=5.0, metadata={
        "help": "clip the gradient norm here (0: off); a rare spike at the peak rate otherwise sent "
                "one of three 40-epoch runs to NaN"})
    schedule: str = field(default="onecycle", metadata={"help": "onecycle or cosine"})
    warmup: float = field(default=0.15, metadata={"help": "fraction of steps the one-cycle rise takes"})
    cutout: int = field(default=0, metadata={
        "help": "side of the square cut out of each training image after crop and flip (0: none)"})
    holdout: int = field(default=5000, metadata={
        "help": "training images held out (class-balanced, the same split for every seed) to fit "
                "the temperature for ece_temperature; never trained on (0: none, no temperature)"})
    width: int = field(default=64, metadata={"help": "ResNet-18 base width (64 is the standard network)"})
    embed_dim: int | None = field(default=None, metadata={"type": int, "help": "embedding width; default: number of classes"})
    eps: float = field(default=0.1, metadata={
        "help": "HALO: label-smoothing mass (published: target temperature and abstain bias; "
                "rbf_lite: mass spread over the negatives)"})
    soft_targets: str = field(default="distill", metadata={"help": "HALO: distill (self-distillation) or smooth"})
    learn_gamma: bool = field(default=True, metadata={"help": "HALO: learn the temperature gamma"})
    radial_weight: float = field(default=1.0, metadata={"help": "HALO: weight of the radial (soap-bubble) term"})
    head_lr: float = field(default=0.1, metadata={
        "help": "HALO: learning rate of the centroids and gamma, as a multiple of --lr (at 1.0 HALO "
                "collapses on CIFAR-10: see HALOHead)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "CCE: label smoothing"})
    subset: int | None = field(default=None, metadata={"type": int, "help": "train on a seeded random subset of this size"})
    test_subset: int | None = field(default=None, metadata={"type": int, "help": "evaluate on at most this many images per set"})
    ood: str = field(default=",".join(DEFAULT_OOD), metadata={
        "help": "comma-separated OOD sets (unavailable ones are skipped and listed in the summary); "
                "an open-set dataset always adds its held-out classes"})
    seed: int = field(default=0, metadata={"help": "seeds initialisation, subsets, order and augmentation"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cuda, cpu, ..."})
    compile: bool = field(default=False, metadata={"help": "torch.compile the backbone and the head's loss"})
    eval_batch: int = field(default=1000, metadata={"help": "evaluation batch size"})
    log_every: int = field(default=50, metadata={"help": "log the training loss every this many steps"})
    latent_points: int = field(default=2000, metadata={
        "help": "embeddings kept per set (test, each OOD set) in latents.npz for the PCA figure"})
    resume: bool = field(default=False, metadata={"help": "continue from out/checkpoint.pt"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace a run already in out (without it or --resume, such a folder is refused)"})

    def __post_init__(self):
        choices = {"loss": ("halo", "cce"), "schedule": ("onecycle", "cosine"),
                   "halo_variant": ("published", "rbf_lite"),
                   "soft_targets": ("distill", "smooth"),
                   "dataset": (*image_data.HUB, *image_data.OPEN_SET_SPLITS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "width", "eval_batch", "log_every", "latent_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("cutout", "holdout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")
        if not (self.lr > 0 and self.head_lr > 0 and self.grad_clip >= 0):
            raise ValueError(f"need lr > 0, head_lr > 0 and grad_clip >= 0, got lr={self.lr}, "
                             f"head_lr={self.head_lr}, grad_clip={self.grad_clip}")
        unknown = set(self.ood_sets) - set(DEFAULT_OOD)
        if unknown:
            raise ValueError(f"unknown OOD sets {sorted(unknown)}; choose from {DEFAULT_OOD}")

    @property
    def ood_sets(self) -> list[str]:
        return [name for name in self.ood.split(",") if name]

    @property
    def head(self) -> str:
        """The head's name in results folders: cce, cce_ls (label smoothing), halo, halo_rbf_lite."""
        if self.loss == "cce":
            return "cce_ls" if self.label_smoothing > 0 else "cce"
        return "halo" if self.halo_variant == "published" else "halo_rbf_lite"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_data(cfg: Config) -> tuple[image_data.ImageSet, image_data.ImageSet | None, image_data.ImageSet, dict, dict]:
    """Train, held-out (None without one) and test sets, the OOD sets that could be loaded, and why
    the others could not."""
    base, known = image_data.OPEN_SET_SPLITS.get(cfg.dataset, (cfg.dataset, None))
    train = image_data.load_dataset(base, "train", cfg.data)
    test = image_data.load_dataset(base, "test", cfg.data)
    ood, skipped = {}, {}
    if known is not None:
        train, _ = image_data.open_set(train, known)
        test, held_out = image_data.open_set(test, known)
        ood[f"{cfg.dataset}-held-out"] = held_out
    for name in cfg.ood_sets:
        if name == base:
            continue
        try:
            if name in image_data.HUB:
                ood[name] = image_data.load_dataset(name, "test", cfg.data)
            elif name in image_data.IDX_SETS:
                ood[name] = image_data.load_idx(name, cfg.data)
            else:
                ood[name] = image_data.noise_images(name, cfg.test_subset or 10_000, seed=cfg.seed)
        except DataNotFoundError as error:
            skipped[name] = " ".join(str(error).split())
            offline = hub_unreachable() if name in image_data.HUB else None
            print(f"OOD set {name} skipped: " + (f"no local copy, and {offline}" if offline else
                  "not found (summary.json's ood_skipped says where it looked)"), file=sys.stderr)
    test = test.subset(min(cfg.test_subset or len(test), len(test)), seed=cfg.seed)
    ood = {name: s.subset(min(cfg.test_subset or len(s), len(s)), seed=cfg.seed) for name, s in ood.items()}
    held_out = None
    if cfg.holdout:
        train, held_out = image_data.holdout_split(train, cfg.holdout)
    return train.subset(cfg.subset, seed=cfg.seed), held_out, test, ood, skipped


class Trainer:
    """Model, head, optimiser and the on-device training set; `train_epoch`, `evaluate`, `run`."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.on_gpu = self.device.type == "cuda"
        seed_everything(cfg.seed)
        self.train_set, self.held_out_set, self.test_set, self.ood_sets, self.ood_skipped = load_data(cfg)
        self.num_classes = len(self.train_set.classes)
        self.images = torch.from_numpy(self.train_set.images).to(self.device)
        self.labels = torch.from_numpy(self.train_set.labels).to(self.device)
        self.mean, self.std = image_data.channel_stats(self.images)

        dim = cfg.embed_dim or self.num_classes
        self.model = ResNet18(dim, cfg.width).to(self.device)
        if self.on_gpu:
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.backbone = torch.compile(self.model) if cfg.compile else self.model
        if cfg.loss == "halo":
            self.head = HALOHead(self.num_classes, dim, variant=cfg.halo_variant, eps=cfg.eps,
                                 soft_targets=cfg.soft_targets,
                                 learn_gamma=cfg.learn_gamma, radial_weight=cfg.radial_weight).to(self.device)
        else:
            self.head = LinearHead(self.num_classes, dim, cfg.label_smoothing).to(self.device)
        # Compiled, the loss's few dozen small ops fuse into a handful of kernels: uncompiled, they
        # make a training step launch-bound (HALO costs 16-25% more per epoch on an H100, eager:
        # results/bench/NOTES.md).
        self.training_head = torch.compile(self.head) if cfg.compile else self.head

        named = [*self.model.named_parameters(), *self.head.named_parameters()]
        self.parameters = [p for _, p in named]
        halo = {id(p) for p in self.head.parameters()} if isinstance(self.head, HALOHead) else set()
        decay = [p for _, p in named if p.ndim >= 2 and id(p) not in halo]
        no_decay = [p for _, p in named if p.ndim < 2 and id(p) not in halo]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
                  {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr}]
        if halo:  # HALO's centroids and gamma: no decay, their own learning rate
            groups.append({"params": [p for _, p in named if id(p) in halo], "weight_decay": 0.0,
                           "lr": cfg.lr * cfg.head_lr})
        # fused: one kernel per parameter group instead of a few foreach launches and their Python
        # (the step is host-bound, and HALO's head adds a group).
        self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                         fused=True if self.on_gpu else None)
        self.steps_per_epoch = math.ceil(len(self.train_set) / cfg.batch_size)
        total = self.steps_per_epoch * cfg.epochs
        if cfg.schedule == "onecycle":
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer, max_lr=[g["lr"] for g in groups], total_steps=total, pct_start=cfg.warmup)
        else:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total)
        self.epoch = self.step = 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.on_gpu)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float NCHW images -> fp32 embeddings (bf16 inside on a GPU)."""
        with self.autocast():
            return self.backbone(images).float()

    @torch.no_grad()
    def calibrate(self) -> None:
        """Apply the head's init rule (HALO: gamma) to one batch from the untrained network."""
        batch = self.images[:self.cfg.batch_size]
        self.head.calibrate(self.embed(image_data.normalise(batch, self.mean, self.std)))

    def train_epoch(self, log: JsonlLog | None = None, max_steps: int | None = None) -> dict:
        """One pass over a fresh permutation (the last batch may be smaller; none is dropped)."""
        self.model.train()
        order = torch.randperm(len(self.images), device=self.device)
        steps = min(self.steps_per_epoch, max_steps or self.steps_per_epoch)
        running, seen, start = torch.zeros((), device=self.device), 0, time.perf_counter()
        bar = progress(range(steps), desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", leave=False, mininterval=1)
        for i in bar:
            index = order[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]
            embeddings = self.embed(image_data.augment(self.images[index], self.mean, self.std,
                                                       cutout=self.cfg.cutout))
            loss, _ = self.training_head(embeddings, self.labels[index], return_logits=False)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (torch.nn.utils.clip_grad_norm_(self.parameters, self.cfg.grad_clip)
                         if self.cfg.grad_clip > 0 else None)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            running += loss.detach() * len(index)
            seen += len(index)
            if log is not None and self.step % self.cfg.log_every == 0:
                record = {"step": self.step, "epoch": self.epoch + 1, "loss": loss.item(),
                          "lr": self.scheduler.get_last_lr()[0]}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm.item()
                if isinstance(self.head, HALOHead):
                    record["gamma"] = self.head.loss.gamma.item()
                log.write(**record)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
        mean_loss = (running / seen).item()  # waits for the device: the timing below is honest
        seconds = time.perf_counter() - start
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"the training loss became {mean_loss} in epoch {self.epoch + 1}: the "
                                     f"run diverged (try a lower --lr or --grad-clip)")
        self.epoch += 1
        return {"train_loss": mean_loss, "seconds": seconds, "images_per_s": seen / seconds, "images": seen}

    @torch.no_grad()
    def logits(self, data: image_data.ImageSet) -> tuple[np.ndarray, np.ndarray]:
        """fp32 logits (K or K + 1 columns) and embeddings, without augmentation."""
        self.model.eval()
        logits, embeddings = [], []
        for start in range(0, len(data), self.cfg.eval_batch):
            batch = torch.from_numpy(data.images[start:start + self.cfg.eval_batch]).to(self.device)
            embedded = self.embed(image_data.normalise(batch, self.mean, self.std))
            logits.append(self.head(embedded)[1].cpu())
            embeddings.append(embedded.cpu())
        return torch.cat(logits).numpy(), torch.cat(embeddings).numpy()

    def predict(self, data: image_data.ImageSet) -> tuple[np.ndarray, np.ndarray]:
        """Softmax probabilities (K or K + 1 columns) and embeddings, without augmentation."""
        logits, embeddings = self.logits(data)
        return metrics.softmax(logits), embeddings

    def evaluate(self, with_ood: bool = True) -> dict:
        """Test-set metrics; with OOD, temperature scaling fitted on the held-out split, detection
        metrics per set and score, and every embedding."""
        logits, embeddings = self.logits(self.test_set)
        probs = metrics.softmax(logits)
        result = metrics.classification(probs, self.test_set.labels, self.head.abstains)
        if with_ood and self.held_out_set is not None:
            result.update(metrics.temperature_scaled(logits, self.test_set.labels,
                                                     self.logits(self.held_out_set)[0], self.held_out_set.labels))
        if with_ood:
            result["reliability"] = {k: v.tolist() for k, v in metrics.reliability(probs, self.test_set.labels).items()}
            in_scores = metrics.ood_scores(probs, self.head.abstains)
            result["ood"], result["embeddings"] = {}, {"test": embeddings}
            for name, data in progress(self.ood_sets.items(), desc="OOD sets", leave=False):
                out_probs, result["embeddings"][f"ood_{name}"] = self.predict(data)
                out_scores = metrics.ood_scores(out_probs, self.head.abstains)
                result["ood"][name] = {score: metrics.detection(in_scores[score], out_scores[score])
                                       for score in in_scores}
        return result

    def checkpoint_path(self) -> Path:
        return Path(self.cfg.out) / "checkpoint.pt"

    def save(self) -> None:
        save_checkpoint(self.checkpoint_path(), model=self.model.state_dict(), head=self.head.state_dict(),
                        optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                        epoch=self.epoch, step=self.step, config=dataclasses.asdict(self.cfg))

    def restore(self) -> None:
        state = load_checkpoint(self.checkpoint_path(), map_location=self.device)
        saved, current = state["config"], dataclasses.asdict(self.cfg)
        changed = {k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]}
        if changed:
            raise ValueError(f"cannot resume: settings {sorted(changed)} differ from the checkpoint's "
                             f"({ {k: saved.get(k) for k in sorted(changed)} })")
        self.model.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = state["epoch"], state["step"]

    def save_latents(self, embeddings: dict[str, np.ndarray], path: Path) -> None:
        """A seeded sample of at most `latent_points` embeddings per set, in float16, with the test
        labels and HALO's centroids: what the latent-space (PCA) figure needs, small enough to keep."""
        rng = np.random.default_rng(self.cfg.seed)
        kept = {name: np.sort(rng.permutation(len(e))[:self.cfg.latent_points]) for name, e in embeddings.items()}
        arrays = {name: e[kept[name]].astype(np.float16) for name, e in embeddings.items()}
        arrays["test_labels"] = self.test_set.labels[kept["test"]]
        if isinstance(self.head, HALOHead):
            arrays["centroids"] = self.head.centred_centroids().detach().cpu().numpy()
        np.savez_compressed(path, **arrays)

    def run(self) -> dict:
        """Train (or resume), checkpointing every epoch; evaluate everything; write the summary."""
        out = prepare_run_dir(self.cfg.out, self.cfg.resume, self.cfg.overwrite)
        if self.cfg.resume:
            self.restore()
            log = JsonlLog(out / "log.jsonl", resume_from_step=self.step)
        else:
            self.calibrate()
            log = JsonlLog(out / "log.jsonl")
        log.write(step=self.step, event="start", epoch=self.epoch, resumed=self.cfg.resume, config=dataclasses.asdict(self.cfg),
                  train_images=len(self.train_set), ood_skipped=self.ood_skipped)
        started = time.perf_counter()
        while self.epoch < self.cfg.epochs:
            stats = self.train_epoch(log)
            test = self.evaluate(with_ood=False)
            log.write(step=self.step, epoch=self.epoch, **stats, **{f"test_{k}": v for k, v in test.items()})
            self.save()
        result = self.evaluate()
        self.save_latents(result.pop("embeddings"), out / "latents.npz")
        summary = {"config": dataclasses.asdict(self.cfg), **environment(self.device),
                   "head": self.cfg.head,
                   "dataset": {"name": self.cfg.dataset, "classes": list(self.train_set.classes),
                               "train_images": len(self.train_set), "test_images": len(self.test_set),
                               "held_out_images": len(self.held_out_set) if self.held_out_set else 0},
                   "train_seconds_this_process": time.perf_counter() - started, "epochs": self.epoch,
                   "steps": self.step, **result, "ood_skipped": self.ood_skipped,
                   "ood_sizes": {name: len(data) for name, data in self.ood_sets.items()}}
        if isinstance(self.head, HALOHead):
            summary["gamma"] = self.head.loss.gamma.item()
            summary["abstain_bias"] = self.head.loss.abstain_bias().item()
        log.write(step=self.step, event="end", **{k: summary[k] for k in ("accuracy", "nll", "ece", "ece_temperature", "ood")
                                                  if k in summary})
        write_json(out / "summary.json", summary)
        return summary


def parse_args(argv: list[str] | None = None) -> Config:
    """Command-line flags generated from `Config`'s fields (`--batch-size` sets batch_size)."""
    parser = argparse.ArgumentParser(prog="python -m rbf_lite.cifar", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = f.metadata.get("type", type(f.default))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
            continue
        parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"] + " (default: %(default)s)")
    return Config(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    prepare_run_dir(cfg.out, cfg.resume, cfg.overwrite)  # refuse a folder before loading any data
    summary = Trainer(cfg).run()
    scaled = f"  ece after temperature {summary['ece_temperature']:.4f}" if "ece_temperature" in summary else ""
    print(f"accuracy {summary['accuracy']:.4f}  nll {summary['nll']:.4f}  ece {summary['ece']:.4f}{scaled}  "
          f"-> {Path(cfg.out) / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
