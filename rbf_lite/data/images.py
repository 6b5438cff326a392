"""Small-image datasets as uint8 arrays, and augmentation that runs on the GPU.

Every set is an `ImageSet`: (N, 32, 32, 3) uint8 images, int64 labels (-1 for unlabelled OOD
sets) and class names. Sources, in the order tried:
  * a local image-folder tree (`train/<class>/*.jpg`, `test/<class>/*.jpg`) or a .tar.gz of one,
    decoded once and cached as .npz under `cache_dir("images")` (all 60k CIFAR-10 JPEGs decode in
    about 7 s on one CPU core);
  * CIFAR-10, CIFAR-100 and SVHN from the Hugging Face hub through `datasets`, when online
    (offline, the hub is skipped at once rather than retried);
  * MNIST and Fashion-MNIST test sets from IDX files, grey 28x28 padded to 32x32 and repeated
    to RGB: far-OOD sets for a CIFAR model;
  * synthetic uniform and Gaussian noise images;
  * the open-set split "cifar10-6v4": train on six CIFAR-10 classes, the four held out (deer,
    dog, frog, horse) are near-OOD: animals that resemble the known bird and cat.

The whole training set fits on a GPU (CIFAR-10 is 150 MB as uint8), so `augment` crops, flips
and normalises a batch there instead of in a CPU data loader.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import DataNotFoundError, cache_dir, find_local, hub_unreachable, not_found
from ..runs import progress

SIZE = 32
# name -> (hub repository, configuration, image column, label column)
HUB = {
    "cifar10": ("uoft-cs/cifar10", None, "img", "label"),
    "cifar100": ("uoft-cs/cifar100", None, "img", "fine_label"),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits", "image", "label"),
}
IDX_SETS = ("mnist", "fashion-mnist")
NOISE_SETS = ("uniform-noise", "gaussian-noise")
# name -> (dataset, known classes); every other class of the dataset is held out as near-OOD.
OPEN_SET_SPLITS = {"cifar10-6v4": ("cifar10", ("airplane", "automobile", "bird", "cat", "ship", "truck"))}


@dataclass
class ImageSet:
    images: np.ndarray          # (N, 32, 32, 3) uint8
    labels: np.ndarray          # (N,) int64; -1 where the set has no labels
    classes: tuple[str, ...]
    name: str

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.shape[1:] != (SIZE, SIZE, 3):
            raise ValueError(f"{self.name}: images must be uint8 (N, {SIZE}, {SIZE}, 3), "
                             f"got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"{self.name}: {len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, size: int | None, seed: int = 0) -> ImageSet:
        """A seeded random subset of `size` images (all of them when size is None)."""
        if size is None:
            return self
        if not 0 < size <= len(self):
            raise ValueError(f"{self.name}: subset size must lie in [1, {len(self)}], got {size}")
        keep = np.sort(np.random.default_rng(seed).permutation(len(self))[:size])
        return ImageSet(self.images[keep], self.labels[keep], self.classes, self.name)


# ---------------------------------------------------------------------------- image folders
def _tree_location(location: Path) -> Path | None:
    """`location` itself if it is a tree or a .tar.gz of one, or the single .tar.gz inside it."""
    if location.is_file() and location.name.endswith((".tar.gz", ".tgz")):
        return location
    if location.is_dir():
        if (location / "train").is_dir() and (location / "test").is_dir():
            return location
        archives = sorted(location.glob("*.tar.gz")) + sorted(location.glob("*.tgz"))
        if len(archives) == 1:
            return archives[0]
    return None


def _tree_files(location: Path):
    """Yield (split, class name, file name, bytes) for every image in a folder tree or archive."""
    def parse(relative: str):
        parts = Path(relative).parts
        if len(parts) >= 3 and parts[-3] in ("train", "test") and not parts[-1].startswith("."):
            return parts[-3], parts[-2], parts[-1]
        return None

    if location.is_dir():
        for file in sorted(location.glob("*/*/*")):
            key = parse(str(file.relative_to(location)))
            if key and file.is_file():
                yield (*key, file.read_bytes())
        return
    with tarfile.open(location, "r:*") as archive:
        for member in archive:
            key = parse(member.name) if member.isfile() else None
            if key:
                yield (*key, archive.extractfile(member).read())


def _decode_tree(location: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    found = {"train": [], "test": []}
    for split, cls, file, data in progress(_tree_files(location), desc=f"decoding {location.name}",
                                       unit="img", mininterval=2):
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        if image.shape != (SIZE, SIZE, 3):
            raise ValueError(f"{location}: {split}/{cls}/{file} is {image.shape[:2]}, expected {SIZE}x{SIZE}")
        found[split].append((cls, file, image))
    if not found["train"] or not found["test"]:
        raise ValueError(f"{location}: expected images under train/<class>/ and test/<class>/, found "
                         f"{len(found['train'])} train and {len(found['test'])} test images")
    classes = sorted({cls for cls, _, _ in found["train"]})
    unknown = {cls for cls, _, _ in found["test"]} - set(classes)
    if unknown:
        raise ValueError(f"{location}: test classes {sorted(unknown)} have no training images")
    arrays = {"classes": np.array(classes)}
    for split, items in found.items():
        items.sort(key=lambda item: item[:2])
        arrays[f"{split}_images"] = np.stack([image for _, _, image in items])
        arrays[f"{split}_labels"] = np.array([classes.index(cls) for cls, _, _ in items], dtype=np.int64)
    return arrays


def _cached(key: str, build) -> dict[str, np.ndarray]:
    """Load arrays cached under `key`, or build and cache them (atomically)."""
    path = cache_dir("images") / f"{key}.npz"
    if not path.exists():
        arrays = build()
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    with np.load(path) as stored:
        return {k: stored[k] for k in stored.files}


def load_image_folder(location: str | Path, split: str, name: str | None = None) -> ImageSet:
    """A `train/<class>/*`, `test/<class>/*` tree (or a .tar.gz of one), decoded once and cached."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    tree = _tree_location(Path(location).expanduser())
    if tree is None:
        raise DataNotFoundError(f"{location} is neither a train/ + test/ image tree nor a .tar.gz of one")
    stat = tree.stat()
    fingerprint = hashlib.sha1(f"{tree.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    arrays = _cached(f"{tree.name.split('.')[0]}-{fingerprint}", lambda: _decode_tree(tree))
    return ImageSet(arrays[f"{split}_images"], arrays[f"{split}_labels"],
                    tuple(str(c) for c in arrays["classes"]), name or tree.name.split(".")[0])


# ---------------------------------------------------------------------------- hub datasets
def _from_hub(name: str, split: str) -> dict[str, np.ndarray]:
    offline = hub_unreachable()
    if offline is not None:  # `datasets` would retry for tens of seconds before failing
        raise ConnectionError(offline)
    import datasets

    repo, config, image_column, label_column = HUB[name]
    hub_split = datasets.load_dataset(repo, config, split=split)
    images = np.stack([np.asarray(image.convert("RGB")) for image in
                       progress(hub_split[image_column], desc=f"decoding {name} {split}", unit="img", mininterval=2)])
    return {"images": images, "labels": np.asarray(hub_split[label_column], dtype=np.int64),
            "classes": np.array(hub_split.features[label_column].names)}


def _names(location: Path, name: str) -> bool:
    """Whether a file or folder is named for dataset `name` ("cifar10-jpeg.tar.gz" is not cifar100)."""
    stem = location.name.split(".")[0]
    return stem == name or stem.startswith((f"{name}-", f"{name}_"))


def load_dataset(name: str, split: str, path: str | Path | None = None) -> ImageSet:
    """CIFAR-10, CIFAR-100 or SVHN: from `path` / RBF_LITE_DATA / ../shared/data, else the hub."""
    if name not in HUB:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(HUB)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    candidates = [find_local(relative, path) for relative in (f"{name}/{name}-jpeg.tar.gz", name)]
    if path is not None and _names(Path(path), name):
        candidates.insert(0, Path(path).expanduser())
    for candidate in candidates:
        if candidate is not None and _tree_location(candidate) is not None:
            return load_image_folder(candidate, split, name)
    try:
        arrays = _cached(f"hub-{name}-{split}", lambda: _from_hub(name, split))
    except Exception as error:  # offline, datasets missing, hub refusal: all end the same way
        raise not_found(
            f"{name} ({split})", f"{name}/{name}-jpeg.tar.gz", path,
            f"or a folder {name}/ with train/<class>/*.jpg and test/<class>/*.jpg; or go online with "
            f"`pip install datasets` to fetch {HUB[name][0]} from the Hugging Face hub "
            f"(the hub attempt failed: {type(error).__name__}: {error})") from error
    return ImageSet(arrays["images"], arrays["labels"], tuple(str(c) for c in arrays["classes"]), name)


# ---------------------------------------------------------------------------- IDX (MNIST)
def read_idx(file: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) of unsigned bytes, as an array of its stated shape."""
    data = (gzip.open if file.suffix == ".gz" else open)(file, "rb").read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{file} is not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != np.prod(shape):
        raise ValueError(f"{file}: header says {shape}, body holds {body.size} bytes")
    return body.reshape(shape)


def load_idx(name: str, path: str | Path | None = None) -> ImageSet:
    """MNIST or Fashion-MNIST test set, padded 28 -> 32 with black and repeated to three channels."""
    if name not in IDX_SETS:
        raise ValueError(f"unknown IDX set {name!r}; choose from {IDX_SETS}")
    files = {}
    for part, kind in (("images", "idx3"), ("labels", "idx1")):
        relative = f"{name}/t10k-{part}-{kind}-ubyte.gz"
        files[part] = find_local(relative, path)
        if files[part] is None:
            raise not_found(f"{name} test {part}", relative, path,
                            f"download t10k-{part}-{kind}-ubyte.gz of {name} into that folder.")
    grey = read_idx(files["images"])
    pad = (SIZE - grey.shape[1]) // 2
    padded = np.pad(grey, ((0, 0), (pad, SIZE - grey.shape[1] - pad), (pad, SIZE - grey.shape[2] - pad)))
    return ImageSet(np.repeat(padded[..., None], 3, axis=3), read_idx(files["labels"]).astype(np.int64),
                    tuple(str(d) for d in range(10)), name)


# ---------------------------------------------------------------------------- noise, open set
def noise_images(kind: str, count: int, seed: int = 0) -> ImageSet:
    """Uniform noise over [0, 255], or Gaussian noise around mid-grey (sd 64) clipped to [0, 255]."""
    rng = np.random.default_rng(seed)
    shape = (count, SIZE, SIZE, 3)
    if kind == "uniform-noise":
        images = rng.integers(0, 256, shape, dtype=np.uint8)
    elif kind == "gaussian-noise":
        images = np.clip(rng.normal(127.5, 64.0, shape), 0, 255).round().astype(np.uint8)
    else:
        raise ValueError(f"unknown noise {kind!r}; choose from {NOISE_SETS}")
    return ImageSet(images, np.full(count, -1, dtype=np.int64), (), kind)


def open_set(data: ImageSet, known: tuple[str, ...]) -> tuple[ImageSet, ImageSet]:
    """Split into the known classes (relabelled 0..len(known)-1) and the held-out rest (label -1)."""
    missing = set(known) - set(data.classes)
    if missing:
        raise ValueError(f"{data.name} has no classes {sorted(missing)}; it has {data.classes}")
    remap = np.array([known.index(c) if c in known else -1 for c in data.classes], dtype=np.int64)
    labels = remap[data.labels]
    inside = labels >= 0
    held_out = tuple(c for c in data.classes if c not in known)
    return (ImageSet(data.images[inside], labels[inside], tuple(known), f"{data.name}-known"),
            ImageSet(data.images[~inside], np.full(int((~inside).sum()), -1, dtype=np.int64), held_out,
                     f"{data.name}-held-out({','.join(held_out)})"))


def holdout_split(data: ImageSet, size: int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(the rest, `size` held-out images), class-balanced: size / classes images of each class,
    drawn with `seed`. With a fixed seed every run holds out the same images, so the heads and
    seeds it compares fit their temperatures on one split."""
    classes = len(data.classes)
    if size % classes or not 0 < size < len(data):
        raise ValueError(f"{data.name}: the held-out split must be a multiple of {classes} classes "
                         f"in [1, {len(data)}), got {size}")
    rng = np.random.default_rng(seed)
    held = []
    for label in range(classes):
        members = np.flatnonzero(data.labels == label)
        if len(members) <= size // classes:
            raise ValueError(f"{data.name}: class {data.classes[label]!r} has {len(members)} images, "
                             f"too few to hold out {size // classes}")
        held.append(rng.choice(members, size // classes, replace=False))
    held = np.sort(np.concatenate(held))
    rest = np.setdiff1d(np.arange(len(data)), held)
    return (ImageSet(data.images[rest], data.labels[rest], data.classes, data.name),
            ImageSet(data.images[held], data.labels[held], data.classes, f"{data.name}-held-out-split"))


# ---------------------------------------------------------------------------- on the GPU
def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (in [0, 1] units) of uint8 NHWC images."""
    pixels = images.reshape(-1, 3).float() / 255
    return pixels.mean(dim=0), pixels.std(dim=0)


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in channels_last memory (the permute of NHWC already is)."""
    return ((images.float() / 255 - mean) / std).permute(0, 3, 1, 2)


def augment(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, pad: int = 4,
            cutout: int = 0) -> torch.Tensor:
    """Random crop from a zero-padded image plus horizontal flip, as one gather, then normalise;
    `cutout` > 0 then sets a cutout x cutout square (centred anywhere in the image, clipped at
    its edges) to 0, the mean colour after normalisation (DeVries & Taylor, 2017).

    Each image gets its own offset, flip and square, drawn from the device's global generator, so
    a checkpoint's RNG state replays the same augmentations on resume.
    """
    batch, height, width, _ = images.shape
    padded = F.pad(images, (0, 0, pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (batch, 1), device=images.device)
    dx = torch.randint(0, 2 * pad + 1, (batch, 1), device=images.device)
    flip = torch.rand(batch, 1, device=images.device) < 0.5
    columns = torch.arange(width, device=images.device)
    rows = dy + torch.arange(height, device=images.device)
    cols = dx + torch.where(flip, width - 1 - columns, columns)
    cropped = padded[torch.arange(batch, device=images.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    normalised = normalise(cropped, mean, std)
    if cutout <= 0:
        return normalised
    centre_y = torch.randint(0, height, (batch, 1), device=images.device)
    centre_x = torch.randint(0, width, (batch, 1), device=images.device)
    low, high = cutout // 2, cutout - cutout // 2  # the square spans [centre - low, centre + high)
    inside_y = ((torch.arange(height, device=images.device) >= centre_y - low)
                & (torch.arange(height, device=images.device) < centre_y + high))
    inside_x = ((columns >= centre_x - low) & (columns < centre_x + high))
    keep = ~(inside_y[:, :, None] & inside_x[:, None, :])
    return normalised * keep[:, None].to(normalised.dtype)
