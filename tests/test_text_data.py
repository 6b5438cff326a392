"""TinyStories loading, tokenizers, token caches, packed windows and the errors on bad data."""
import itertools
import random
import sys
import types

import numpy as np
import pytest
import torch

from rbf_lite.data import DataNotFoundError
from rbf_lite.data.text import (EOT, MalformedDataError, PackedWindows, ShuffledBatches, gpt2_tokenizer,
                                load_tinystories, prepare_tinystories, read_stories, split_stories,
                                tokenize_to_memmap, train_bpe_tokenizer)

pytest.importorskip("tokenizers")


def generated_stories(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names, things = ["Tom", "Lily", "Sam", "Mia"], ["ball", "cat", "kite", "cake", "boat"]
    return [f"{rng.choice(names)} had a {rng.choice(things)}. It was {rng.choice(['red', 'big', 'soft'])}. "
            f"{rng.choice(names)} smiled and played all day." for _ in range(n)]


def test_story_layouts():
    assert split_stories(f"One.\n{EOT}\nTwo\nlines.\n{EOT}\n", "x") == ["One.", "Two\nlines."]
    assert split_stories("One.\n\nTwo.\n  \nThree.", "x") == ["One.", "Two.", "Three."]
    assert split_stories("one per line\nanother\n", "x") == ["one per line", "another"]
    with pytest.raises(MalformedDataError, match="no text"):
        split_stories("\n \n", "empty.txt")


def test_non_utf8_file_is_named(tmp_path):
    bad = tmp_path / "train.txt"
    bad.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(MalformedDataError, match="train.txt is not UTF-8"):
        read_stories(bad)


def test_a_single_file_gives_up_its_last_stories_for_validation(tmp_path):
    stories = generated_stories(40)
    path = tmp_path / "mine.txt"
    path.write_text(f"\n{EOT}\n".join(stories))
    loaded = load_tinystories(path, validation_fraction=0.1)
    assert loaded.train == stories[:36] and loaded.validation == stories[36:]
    assert "last 4 stories" in loaded.sources["validation"]


def test_a_folder_with_both_splits(tmp_path, monkeypatch):
    (tmp_path / "tinystories").mkdir()
    (tmp_path / "tinystories" / "TinyStories-train.txt").write_text("a b.\n\nc d.")
    (tmp_path / "tinystories" / "TinyStories-valid.txt").write_text(f"e.\n{EOT}\nf.")
    monkeypatch.setenv("RBF_LITE_DATA", str(tmp_path))
    loaded = load_tinystories()
    assert loaded.train == ["a b.", "c d."] and loaded.validation == ["e.", "f."]


def test_missing_data_says_where_it_looked_and_how_to_provide_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as err:
        load_tinystories(missing)
    assert str(missing) in str(err.value) and "RBF_LITE_DATA" in str(err.value) and "--data" in str(err.value)
    with pytest.raises(ValueError, match="source"):
        load_tinystories(source="ftp")


def test_offline_hub_failure_is_a_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    asked = []

    def unreachable(name, split, **options):
        asked.append((name, split))
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataNotFoundError, match="hub dataset roneneldan/TinyStories failed") as err:
        load_tinystories(source="hub")
    assert asked == [("roneneldan/TinyStories", "train")]
    assert "Couldn't reach" in str(err.value) and "RBF_LITE_DATA" in str(err.value)


def test_a_sample_keeps_the_first_stories_of_each_split(tmp_path):
    stories = generated_stories(30)
    (tmp_path / "train.txt").write_text(f"\n{EOT}\n".join(stories[:20]))
    (tmp_path / "valid.txt").write_text(f"\n{EOT}\n".join(stories[20:]))
    (tmp_path / "tinystories").mkdir()
    for src, name in (("train.txt", "TinyStories-train.txt"), ("valid.txt", "TinyStories-valid.txt")):
        (tmp_path / src).rename(tmp_path / "tinystories" / name)
    sample = load_tinystories(tmp_path, train_stories=5, validation_stories=2)
    assert sample.train == stories[:5] and sample.validation == stories[20:22]
    assert sample.sources["train"].startswith("first 5 stories of ")
    whole = load_tinystories(tmp_path, train_stories=100)  # more than the split holds: all of it
    assert whole.train == stories[:20] and not whole.sources["train"].startswith("first")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="train_stories must be a positive integer"):
            load_tinystories(tmp_path, train_stories=bad)


class FakeHub:
    """Stands in for `datasets.load_dataset`: an endless streamed split (so a sample must stop
    reading by itself) and a small whole split; records what was asked and how many rows were read."""

    def __init__(self):
        self.asked, self.rows_read = [], {}

    def load_dataset(self, name, split, streaming=False):
        self.asked.append((name, split, streaming))
        if not streaming:
            return {"text": [f"{split} story {i}." for i in range(7)] + ["  "]}
        self.rows_read[split] = 0

        def rows():
            for i in itertools.count():
                self.rows_read[split] += 1
                yield {"text": "" if i == 1 else f"{split} story {i}."}
        return rows()


def test_a_hub_sample_streams_only_its_stories_and_the_whole_split_loads_in_full(monkeypatch):
    hub = FakeHub()
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=hub.load_dataset))
    sample = load_tinystories(source="hub", train_stories=3, validation_stories=2)
    assert sample.train == ["train story 0.", "train story 2.", "train story 3."]  # the empty row skipped
    assert sample.validation == ["validation story 0.", "validation story 2."]
    assert hub.asked == [("roneneldan/TinyStories", "train", True), ("roneneldan/TinyStories", "validation", True)]
    assert hub.rows_read == {"train": 4, "validation": 3}, "a sample reads no more rows than it needs"
    assert sample.sources == {"train": "hub:roneneldan/TinyStories:train[:3]",
                              "validation": "hub:roneneldan/TinyStories:validation[:2]"}
    hub.asked.clear()
    whole = load_tinystories(source="hub")
    assert [streaming for _, _, streaming in hub.asked] == [False, False] and len(whole.train) == 7
    assert whole.sources["train"] == "hub:roneneldan/TinyStories:train"


def test_samples_of_different_sizes_get_their_own_token_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("RBF_LITE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "stories.txt"
    path.write_text(f"\n{EOT}\n".join(generated_stories(60)))
    small = prepare_tinystories(path, tokenizer="bpe", bpe_vocab_size=300, train_stories=10)
    large = prepare_tinystories(path, tokenizer="bpe", bpe_vocab_size=300, train_stories=40)
    assert 0 < len(small.train) < len(large.train)
    assert len(small.validation) == len(large.validation)


def test_gpt2_tokenizer_from_local_files(shared_data):
    tok = gpt2_tokenizer(shared_data / "gpt2-tokenizer")
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    text = "Once upon a time, Lily saw a big dog. \u00e9!"
    assert tok.decode(tok.encode(text)) == text


def test_small_bpe_is_trained_cached_and_round_trips(tmp_path):
    stories = generated_stories(300)
    tok = train_bpe_tokenizer(stories, 300, tmp_path / "bpe.json")
    assert (tmp_path / "bpe.json").exists() and tok.vocab_size <= 300
    assert tok.decode(tok.encode(stories[0])) == stories[0]
    assert tok.encode(EOT) == [tok.eot_id]
    again = train_bpe_tokenizer(["unrelated text"], 300, tmp_path / "bpe.json")
    assert again.encode(stories[1]) == tok.encode(stories[1])
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(stories, 100, tmp_path / "small.json")


def test_token_memmap_appends_end_of_text_and_is_reused(tmp_path):
    stories = generated_stories(20, seed=1)
    tok = train_bpe_tokenizer(stories, 280, tmp_path / "bpe.json")
    tokens = tokenize_to_memmap(stories, tok, tmp_path / "train.uint16", batch_size=7)
    assert tokens.dtype == np.uint16
    expected = [i for s in stories for i in tok.encode(s) + [tok.eot_id]]
    assert tokens.tolist() == expected
    assert tokenize_to_memmap(["other"], tok, tmp_path / "train.uint16").tolist() == expected


def test_packed_windows_shift_targets_by_one():
    tokens = np.arange(103, dtype=np.uint16)
    windows = PackedWindows(tokens, 10)
    assert windows.num_windows == 10
    x, y = windows.rows([0, 3])
    assert x.dtype == torch.long and x.shape == (2, 10)
    assert torch.equal(y[:, :-1], x[:, 1:]) and x[1, 0] == 30 and y[1, -1] == 40
    with pytest.raises(MalformedDataError, match="fewer than one window"):
        PackedWindows(np.arange(5, dtype=np.uint16), 10, "tiny split")


def test_shuffled_batches_cover_each_epoch_and_split_over_ranks():
    windows = PackedWindows(np.arange(1201, dtype=np.uint16), 10)  # 120 windows
    batches = ShuffledBatches(windows, global_batch=8, seed=3)
    first_epoch = [i for step in range(15) for i in batches.indices(step)]
    assert sorted(first_epoch) == list(range(120))
    assert ShuffledBatches(windows, 8, 3).indices(21) == batches.indices(21)
    assert ShuffledBatches(windows, 8, 4).indices(0) != batches.indices(0)
    whole, _ = batches.batch(7)
    halves = [batches.batch(7, rank, 2)[0] for rank in range(2)]
    assert torch.equal(torch.cat(halves), whole)
