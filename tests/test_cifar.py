"""The image data, GPU-style augmentation, and short CPU training runs on real CIFAR-10 images.

Tests that need CIFAR-10 skip cleanly when ../shared/data (or $RBF_LITE_DATA) does not hold it.
The first run decodes all 60k JPEGs into the cache (about 10 s); later runs load the cache.
"""
import json
import sys
import types

import numpy as np
import pytest
import torch

import rbf_lite.data
from rbf_lite import cifar
from rbf_lite.data import DataNotFoundError
from rbf_lite.data import images as image_data
from rbf_lite.models.resnet import ResNet18
from rbf_lite.runs import read_jsonl


@pytest.fixture(scope="module")
def cifar10_test():
    try:
        return image_data.load_dataset("cifar10", "test")
    except DataNotFoundError as error:
        pytest.skip(f"CIFAR-10 not available offline: {str(error).splitlines()[0]}")


def tiny_config(tmp_path, **changes):
    settings = dict(subset=256, test_subset=100, width=8, batch_size=64, lr=0.05, epochs=2,
                    ood="mnist,uniform-noise", out=str(tmp_path), log_every=2, device="cpu")
    return cifar.Config(**{**settings, **changes})


def test_cifar10_loads_with_its_classes(cifar10_test):
    assert cifar10_test.images.shape == (10_000, 32, 32, 3) and cifar10_test.images.dtype == np.uint8
    assert cifar10_test.classes[:3] == ("airplane", "automobile", "bird")
    assert np.bincount(cifar10_test.labels).tolist() == [1000] * 10
    known, held_out = image_data.open_set(cifar10_test, image_data.OPEN_SET_SPLITS["cifar10-6v4"][1])
    assert len(known) == 6000 and len(held_out) == 4000 and known.labels.max() == 5
    assert held_out.classes == ("deer", "dog", "frog", "horse")


def test_idx_sets_are_padded_grey_rgb():
    try:
        mnist = image_data.load_idx("mnist")
    except DataNotFoundError:
        pytest.skip("MNIST not available offline")
    assert mnist.images.shape == (10_000, 32, 32, 3)
    assert (mnist.images[:, :2] == 0).all() and (mnist.images[:, :, -2:] == 0).all()
    assert (mnist.images[..., 0] == mnist.images[..., 2]).all() and mnist.images.max() == 255


def test_missing_data_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(rbf_lite.data, "candidate_roots", lambda path=None: [tmp_path])
    with pytest.raises(DataNotFoundError, match=str(tmp_path)):
        image_data.load_idx("fashion-mnist", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        image_data.load_dataset("imagenet", "train")


def test_image_folder_tree_round_trip(tmp_path, monkeypatch):
    """A small JPEG tree written here decodes to the same classes, counts and (nearly) pixels."""
    Image = pytest.importorskip("PIL.Image")
    monkeypatch.setenv("RBF_LITE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng()
    originals = {}
    for split, per_class in (("train", 3), ("test", 2)):
        for cls in ("cat", "ant"):
            (tmp_path / "toy" / split / cls).mkdir(parents=True)
            for i in range(per_class):
                image = np.full((32, 32, 3), rng.integers(0, 256, 3), dtype=np.uint8)
                Image.fromarray(image).save(tmp_path / "toy" / split / cls / f"{i}.png")
                originals[(split, cls, i)] = image
    train = image_data.load_image_folder(tmp_path / "toy", "train")
    assert train.classes == ("ant", "cat") and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(train.images[3], originals[("train", "cat", 0)])
    assert len(image_data.load_image_folder(tmp_path / "toy", "test")) == 4


def test_augment_is_a_shifted_and_possibly_flipped_crop():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    mean, std = torch.zeros(3), torch.ones(3)
    out = image_data.augment(images, mean, std)
    assert out.shape == (64, 3, 32, 32) and out.is_contiguous(memory_format=torch.channels_last)
    padded = torch.nn.functional.pad(images, (0, 0, 4, 4, 4, 4)).permute(0, 3, 1, 2).float() / 255
    flips = 0
    for b in range(64):
        windows = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if torch.equal(out[b], (lambda w: w.flip(-1) if flip else w)(padded[b, :, dy:dy + 32, dx:dx + 32]))]
        assert windows, f"image {b} is not a crop of its padded original"
        flips += windows[0][2]
    assert 10 < flips < 54  # about half flipped


@pytest.mark.parametrize("side", [1, 8, 16])
def test_cutout_blanks_one_square_of_the_crop(side):
    """With the same generator state the crop is the same, so every change cutout makes is the
    square: zeros on a side x side square (clipped at the edges), centred inside the image."""
    images = torch.randint(1, 256, (32, 32, 32, 3), dtype=torch.uint8)  # no pixel is black
    mean, std = torch.zeros(3), torch.ones(3)
    torch.manual_seed(1)
    plain = image_data.augment(images, mean, std)
    torch.manual_seed(1)
    cut = image_data.augment(images, mean, std, cutout=side)
    for b in range(32):
        blank = (cut[b] != plain[b]).any(0)
        assert torch.equal(cut[b][:, blank], torch.zeros_like(cut[b][:, blank]))
        assert torch.equal(cut[b][:, ~blank], plain[b][:, ~blank])
        # cropping pads with black: the square is judged where the crop has content
        rows, cols = blank.any(1).nonzero().flatten(), blank.any(0).nonzero().flatten()
        if len(rows):
            assert rows.max() - rows.min() < side and cols.max() - cols.min() < side
            content = (plain[b] != 0).any(0)
            assert torch.equal(blank, content & (torch.arange(32)[:, None] >= rows.min()) & (torch.arange(32)[:, None] <= rows.max())
                               & (torch.arange(32)[None] >= cols.min()) & (torch.arange(32)[None] <= cols.max()))
    assert sum(bool((cut[b] != plain[b]).any()) for b in range(32)) > 16


def test_holdout_split_is_class_balanced_disjoint_and_fixed():
    rng = np.random.default_rng()
    labels = rng.integers(0, 4, 400)
    data = image_data.ImageSet(rng.integers(0, 256, (400, 32, 32, 3), dtype=np.uint8), labels,
                               ("a", "b", "c", "d"), "toy")
    data.images[:, 0, 0, 0] = np.arange(400) % 256  # identify each image by two pixels
    data.images[:, 0, 0, 1] = np.arange(400) // 256
    rest, held = image_data.holdout_split(data, 40)
    assert len(rest) == 360 and len(held) == 40
    assert np.bincount(held.labels, minlength=4).tolist() == [10] * 4
    ids = lambda s: set((s.images[:, 0, 0, 0].astype(int) + 256 * s.images[:, 0, 0, 1].astype(int)).tolist())
    assert ids(rest) | ids(held) == set(range(400)) and not ids(rest) & ids(held)
    again, _ = image_data.holdout_split(data, 40)
    assert ids(again) == ids(rest)
    with pytest.raises(ValueError, match="multiple of 4"):
        image_data.holdout_split(data, 42)


def test_resnet_shapes():
    model = ResNet18(embed_dim=10, width=4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="images must have shape"):
        model(torch.randn(3, 32, 32))


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["cce", "halo"])
def test_short_training_lowers_the_loss(loss, cifar10_test, tmp_path):
    trainer = cifar.Trainer(tiny_config(tmp_path, loss=loss, epochs=8, ood=""))
    trainer.calibrate()

    @torch.no_grad()
    def loss_on_training_images():
        embedded = trainer.embed(image_data.normalise(trainer.images, trainer.mean, trainer.std))
        return trainer.head(embedded, trainer.labels)[0].item()

    before = loss_on_training_images()
    for _ in range(8):
        trainer.train_epoch()
    after = loss_on_training_images()
    assert after < 0.92 * before, (before, after)


@pytest.mark.slow
def test_cli_writes_summary_and_resumes_exactly(cifar10_test, tmp_path):
    flags = ["--loss", "halo", "--epochs", "2", "--seed", "3", "--subset", "128", "--test-subset", "64",
             "--width", "4", "--batch-size", "32", "--ood", "mnist,uniform-noise", "--device", "cpu",
             "--latent-points", "20"]
    straight = cifar.main(flags + ["--out", str(tmp_path / "straight")])
    with pytest.raises(FileExistsError, match="--overwrite"):
        cifar.main(flags + ["--out", str(tmp_path / "straight")])
    stored = json.loads((tmp_path / "straight" / "summary.json").read_text())
    for key in ("config", "device", "torch", "commit", "command", "accuracy", "nll", "ece", "ece_known",
                "temperature", "nll_temperature", "ece_temperature"):
        assert key in stored
    assert stored["head"] == "halo" and stored["dataset"]["held_out_images"] == 5000
    assert set(stored["ood"]) == {"mnist", "uniform-noise"}
    for scores in stored["ood"].values():
        assert set(scores) == {"max_known", "not_abstain"}
        assert all(set(v) == {"auroc", "fpr95", "aupr"} for v in scores.values())
    log = read_jsonl(tmp_path / "straight" / "log.jsonl")
    assert log[0]["event"] == "start" and log[-1]["event"] == "end"
    bins = stored["reliability"]
    assert sum(bins["count"]) == 64 and len(bins["edges"]) == len(bins["count"]) + 1 == 16
    latents = np.load(tmp_path / "straight" / "latents.npz")
    assert latents["test"].shape == (20, 10) and latents["test"].dtype == np.float16
    assert latents["ood_mnist"].shape == (20, 10) and latents["centroids"].shape == (10, 10)
    assert len(latents["test_labels"]) == 20

    # Interrupt after one epoch, then resume: the same numbers as the uninterrupted run.
    interrupted = cifar.Trainer(cifar.parse_args(flags + ["--out", str(tmp_path / "resumed")]))
    interrupted.calibrate()
    interrupted.train_epoch()
    interrupted.save()
    resumed = cifar.main(flags + ["--out", str(tmp_path / "resumed"), "--resume"])
    for key in ("accuracy", "nll", "ece", "ece_temperature", "ood", "gamma"):
        assert resumed[key] == straight[key], key

    with pytest.raises(ValueError, match="lr"):
        cifar.main(flags + ["--out", str(tmp_path / "resumed"), "--resume", "--lr", "0.3"])


def test_a_diverged_run_stops_with_a_clear_error(cifar10_test, tmp_path):
    trainer = cifar.Trainer(tiny_config(tmp_path, loss="cce", epochs=1, ood=""))
    trainer.training_head = lambda embeddings, labels, **_: (embeddings.sum() * float("nan"), None)
    with pytest.raises(FloatingPointError, match="diverged"):
        trainer.train_epoch()


def test_bad_configuration(tmp_path):
    with pytest.raises(SystemExit):
        cifar.parse_args(["--epochs", "many"])
    with pytest.raises(ValueError, match="loss must be one of"):
        cifar.Config(loss="hinge")
    with pytest.raises(ValueError, match="grad_clip >= 0"):
        cifar.Config(grad_clip=-1.0)
    with pytest.raises(ValueError, match="unknown OOD sets"):
        cifar.Config(ood="mnist,imagenet-o")
    with pytest.raises(ValueError, match="halo_variant must be one of"):
        cifar.Config(halo_variant="seed")
    for name in ("cutout", "holdout"):
        with pytest.raises(ValueError, match=f"{name} must be at least 0"):
            cifar.Config(**{name: -1})


@pytest.mark.parametrize("settings, head", [({"loss": "cce"}, "cce"), ({"loss": "cce", "label_smoothing": 0.1}, "cce_ls"),
                                            ({}, "halo"), ({"halo_variant": "rbf_lite"}, "halo_rbf_lite")])
def test_head_names(settings, head):
    assert cifar.Config(**settings).head == head


# ---------------------------------------------------------------------------- offline, run folders
def fake_cifar10(name, split, path=None):
    """A small random stand-in for CIFAR-10, so that these tests need no data."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    return image_data.ImageSet(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), np.arange(64) % 10,
                               tuple(f"class{i}" for i in range(10)), name)


@pytest.fixture
def fresh_probe():
    """Forget the cached hub probe before and after, so no test sees another's (fake) answer."""
    probe = rbf_lite.data._probe
    probe.cache_clear()
    yield
    probe.cache_clear()


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_switches_skip_the_hub_without_probing(var, monkeypatch):
    probed = []
    monkeypatch.setattr(rbf_lite.data, "_probe", lambda url: probed.append(url))
    for other in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(var, "0")
    assert rbf_lite.data.hub_unreachable() is None and len(probed) == 1
    monkeypatch.setenv(var, "1")
    assert rbf_lite.data.hub_unreachable() == f"the Hugging Face hub is switched off ({var}=1)"
    assert len(probed) == 1


def test_the_hub_is_probed_once_per_process(monkeypatch, fresh_probe):
    import urllib.error
    calls = []

    def no_network(request, timeout):
        calls.append((request.full_url, timeout))
        raise urllib.error.URLError("no route to host")

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example")
    monkeypatch.setattr(rbf_lite.data.urllib.request, "urlopen", no_network)
    for _ in range(3):
        assert rbf_lite.data.hub_unreachable() == "the Hugging Face hub is unreachable (https://hub.example: no route to host)"
    assert calls == [("https://hub.example", rbf_lite.data.HUB_TIMEOUT_S)]

    rbf_lite.data._probe.cache_clear()  # an HTTP error is an answer: the hub is there
    monkeypatch.setattr(rbf_lite.data.urllib.request, "urlopen", lambda request, timeout: (_ for _ in ()).throw(
        urllib.error.HTTPError(request.full_url, 403, "Forbidden", None, None)))
    assert rbf_lite.data.hub_unreachable() is None


def test_offline_hub_sets_are_skipped_at_once_with_a_note(tmp_path, monkeypatch, capsys):
    """Offline, SVHN and CIFAR-100 are skipped without asking `datasets` (which retries for ~25 s each)."""
    hub_calls = []
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda *args, **kwargs: hub_calls.append(args) or pytest.fail("asked the hub")))
    monkeypatch.setattr(rbf_lite.data, "hub_unreachable", lambda: "the hub is unreachable (test)")
    monkeypatch.setattr(image_data, "hub_unreachable", rbf_lite.data.hub_unreachable)
    monkeypatch.setattr(cifar, "hub_unreachable", rbf_lite.data.hub_unreachable)
    monkeypatch.setattr(rbf_lite.data, "candidate_roots", lambda path=None: [tmp_path])
    monkeypatch.setenv("RBF_LITE_CACHE", str(tmp_path / "cache"))
    real_load = image_data.load_dataset
    monkeypatch.setattr(image_data, "load_dataset",
                        lambda name, split, path=None: (fake_cifar10 if name == "cifar10" else real_load)(name, split, path))

    _, _, _, ood, skipped = cifar.load_data(tiny_config(tmp_path, subset=None, holdout=20,
                                                       ood="svhn,cifar100,uniform-noise"))
    assert hub_calls == []
    assert set(ood) == {"uniform-noise"} and set(skipped) == {"svhn", "cifar100"}
    assert "the hub is unreachable (test)" in skipped["svhn"]
    assert capsys.readouterr().err.splitlines() == [
        f"OOD set {name} skipped: no local copy, and the hub is unreachable (test)" for name in ("svhn", "cifar100")]


def test_a_folder_with_a_run_is_refused_before_any_data_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "Trainer", lambda cfg: pytest.fail("built a trainer (and loaded data)"))
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(FileExistsError, match=f"{tmp_path} already holds a run \\(summary.json\\).*--resume.*--overwrite"):
        cifar.main(["--out", str(tmp_path), "--device", "cpu"])
    assert (tmp_path / "summary.json").read_text() == "{}"


def test_overwrite_starts_from_an_empty_folder(tmp_path, monkeypatch):
    seen = []

    class Recorder:
        def __init__(self, cfg):
            seen.append(sorted(p.name for p in tmp_path.iterdir()))

        def run(self):
            return {"accuracy": 0.5, "nll": 1.0, "ece": 0.1}

    for name in ("summary.json", "log.jsonl", "checkpoint.pt", "latents.npz"):
        (tmp_path / name).write_text("old")
    monkeypatch.setattr(cifar, "Trainer", Recorder)
    cifar.main(["--out", str(tmp_path), "--overwrite", "--device", "cpu"])
    assert seen == [[]]


def test_the_trainer_refuses_a_folder_with_a_run_too(tmp_path, monkeypatch):
    """`Trainer.run` guards the folder itself, for callers that do not go through the CLI."""
    monkeypatch.setattr(image_data, "load_dataset", fake_cifar10)
    trainer = cifar.Trainer(tiny_config(tmp_path, width=4, subset=None, test_subset=None, ood="", epochs=1,
                                        holdout=0))
    (tmp_path / "log.jsonl").write_text("old\n")
    with pytest.raises(FileExistsError, match="log.jsonl"):
        trainer.run()
    assert (tmp_path / "log.jsonl").read_text() == "old\n"
