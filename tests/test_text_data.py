"""TinyStories loading and cleaning, tokenizers, token caches, both row layouts and the errors on bad data."""
import itertools
import random
import sys
import types

import numpy as np
import pytest
import torch

from rbf_lite.data import DataNotFoundError
from rbf_lite.data.text import (EOT, IGNORE_INDEX, MalformedDataError, PackedWindows, ShuffledBatches,
                                StoryRows, drop_validation_repeats, gpt2_tokenizer, load_tinystories,
                                prepare_tinystories, read_stories, split_stories, story_spans,
                                subsample_stories, tokenize_to_memmap, train_bpe_tokenizer)

pytest.importorskip("tokenizers")


def generated_stories(n: int, seed: int = 0) -> list[str]:
    """n distinct short stories (numbered: duplicates would be dropped by the loader)."""
    rng = random.Random(seed)
    names, things = ["Tom", "Lily", "Sam", "Mia"], ["ball", "cat", "kite", "cake", "boat"]
    return [f"{rng.choice(names)} had a {rng.choice(things)} {i}. It was {rng.choice(['red', 'big', 'soft'])}. "
            f"{rng.choice(names)} smiled and played all day." for i in range(n)]


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
    assert windows.num_rows == 10
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


# ---------------------------------------------------------------- several files, cleaning, holdout

LONG = "a paragraph long enough to name its story: the fox and the owl built a boat out of leaves and string"


def write_stories(path, stories, separator=f"\n{EOT}\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(separator.join(stories))
    return path


def test_a_folder_gives_every_training_file_without_duplicates_or_validation_repeats(tmp_path):
    first, extra = generated_stories(20), generated_stories(30, seed=1)
    extra = [s.replace("had a", "found a") for s in extra]  # distinct from `first`
    extra[3] = first[5]                                       # an exact duplicate across files
    extra[7] = f"Sam sailed.\n{LONG}\nThe end."               # repeats a validation story,
    extra[9] = "Mia sang.\nThe end."                          # shares only a short paragraph: kept
    write_stories(tmp_path / "tinystories" / "train-sample.txt", first)
    write_stories(tmp_path / "tinystories" / "train-extra.txt", extra)
    write_stories(tmp_path / "tinystories" / "train-sample-lowercase.txt", ["never training text"], "\n")
    # the validation sample: paragraphs separated by blank lines, other whitespace than the training text
    write_stories(tmp_path / "tinystories" / "valid-sample.txt",
                  ["Once there was a boat.", LONG.replace(" the owl", "  the\towl"), "The end."], "\n\n")
    loaded = load_tinystories(tmp_path)
    c = loaded.counts
    assert [p.split("/")[-1] for p in c["files"]] == ["train-sample.txt", "train-extra.txt"]
    assert list(c["read"].values()) == [20, 30]
    assert (c["duplicates"], c["validation_repeats"], c["held_out"], c["unsampled"]) == (1, 1, 0, 0)
    assert c["kept"] == len(loaded.train) == 48 and c["validation"] == 3 and c["validation_unit"] == "paragraphs"
    assert sum(c["read"].values()) == c["duplicates"] + c["validation_repeats"] + c["held_out"] + c["kept"]
    assert loaded.train == first + [s for i, s in enumerate(extra) if i not in (3, 7)]
    assert "never training text" not in loaded.train
    assert "train-sample.txt" in loaded.sources["train"] and "train-extra.txt" in loaded.sources["train"]


def test_repeats_are_found_by_long_paragraphs_only():
    validation = [f"{LONG}\nThe end.", "Tom smiled."]
    train = [f"Once.\n{LONG.upper()}", f"Hi.\n  {LONG} ", "The end.", f"{LONG[:60]}\nTom smiled.", f"x\n\n{LONG}"]
    kept, dropped = drop_validation_repeats(train, validation)
    assert kept == [f"Once.\n{LONG.upper()}", "The end.", f"{LONG[:60]}\nTom smiled."] and dropped == 2


def test_a_list_of_files_is_all_training_text(tmp_path):
    a = write_stories(tmp_path / "a.txt", generated_stories(30))
    b = write_stories(tmp_path / "b.txt", generated_stories(30, seed=2)[10:] + generated_stories(30)[:2])
    loaded = load_tinystories([a, b], validation_fraction=0.1)
    assert loaded.counts["read"] == {str(a): 30, str(b): 22} and loaded.counts["duplicates"] == 2
    everything = generated_stories(30) + generated_stories(30, seed=2)[10:]
    assert loaded.train + loaded.validation == everything and len(loaded.validation) == 5
    assert "a.txt" in loaded.sources["train"] and "b.txt" in loaded.sources["train"]
    held = load_tinystories([str(a), str(b)], validation_holdout=4)
    assert len(held.validation) == 4 and held.counts["held_out"] == 4
    with pytest.raises(DataNotFoundError, match="missing.txt"):
        load_tinystories([a, tmp_path / "missing.txt"])


def test_the_holdout_is_random_reproducible_disjoint_and_independent_of_the_sample(tmp_path):
    stories = generated_stories(50)
    write_stories(tmp_path / "tinystories" / "train-sample.txt", stories)
    write_stories(tmp_path / "tinystories" / "valid-sample.txt", ["ignored when holding out"], "\n\n")
    held = load_tinystories(tmp_path, validation_holdout=5)
    picked = np.random.default_rng(42).permutation(50)[:5]
    assert held.validation == [stories[i] for i in picked]
    assert held.train == [s for i, s in enumerate(stories) if i not in picked]
    assert held.validation != stories[-5:] and not set(held.validation) & set(held.train)
    assert load_tinystories(tmp_path, validation_holdout=5).validation == held.validation
    assert held.sources["validation"].startswith("5 stories held out of ") and "(seed 42)" in held.sources["validation"]
    assert held.sources["train"] != load_tinystories(tmp_path).sources["train"]  # different token caches
    sample = load_tinystories(tmp_path, validation_holdout=5, train_stories=10)
    assert sample.validation == held.validation and sample.train == held.train[:10]
    assert sample.counts["unsampled"] == 35 and sample.counts["kept"] == 10
    with pytest.raises(ValueError, match="validation_holdout=50 leaves no training stories.*50 distinct"):
        load_tinystories(tmp_path, validation_holdout=50)
    with pytest.raises(ValueError, match="leave validation_stories unset"):
        load_tinystories(tmp_path, validation_holdout=5, validation_stories=3)
    with pytest.raises(ValueError, match="validation_holdout must be a positive integer"):
        load_tinystories(tmp_path, validation_holdout=0)


def test_a_hub_holdout_does_not_download_the_validation_split(monkeypatch):
    hub = FakeHub()
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=hub.load_dataset))
    held = load_tinystories(source="hub", train_stories=3, validation_holdout=2)
    assert hub.asked == [("roneneldan/TinyStories", "train", True)]
    assert len(held.train) == 3 and len(held.validation) == 2
    assert sorted(held.train + held.validation) == sorted(f"train story {i}." for i in (0, 2, 3, 4, 5))
    assert held.sources["validation"] == "2 stories held out of hub:roneneldan/TinyStories:train[:5] (seed 42)"


def test_the_real_folder_uses_both_training_files_and_the_counts_add_up(shared_data):
    loaded = load_tinystories(shared_data)
    c = loaded.counts
    names = [p.split("/")[-1] for p in c["files"]]
    assert names == ["train-sample.txt", "train-extra.txt"], "every training file, never the lowercase one"
    read = dict(zip(names, c["read"].values()))
    assert read["train-sample.txt"] >= 2316 and read["train-extra.txt"] == 14414
    assert sum(read.values()) == c["duplicates"] + c["validation_repeats"] + c["held_out"] + c["kept"]
    assert c["held_out"] == 0 and c["validation_file"].endswith("valid-sample.txt")
    assert 0 < c["duplicates"] + c["validation_repeats"] < 0.01 * read["train-extra.txt"]  # "under 1%"
    assert len(loaded.train) == len(set(loaded.train)) == c["kept"]
    extra = read_stories(shared_data / "tinystories" / "train-extra.txt")
    assert extra[-1] in loaded.train and loaded.train[0] == read_stories(shared_data / "tinystories" / "train-sample.txt")[0]
    kept, dropped = drop_validation_repeats(loaded.train, loaded.validation)
    assert dropped == 0
    held = load_tinystories(shared_data, validation_holdout=512)
    assert held.counts["kept"] + 512 + held.counts["validation_repeats"] == sum(read.values()) - c["duplicates"]


# ---------------------------------------------------------------- story boundaries and subsets

EOT_ID = 9


def stream_of(stories: list[list[int]]) -> np.ndarray:
    return np.asarray([t for story in stories for t in story + [EOT_ID]], dtype=np.uint16)


def random_token_stories(n: int, seed: int = 0, longest: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 500, size=rng.integers(1, longest)).tolist() for _ in range(n)]


def test_story_spans_round_trip():
    stories = random_token_stories(50)
    tokens = stream_of(stories)
    starts, lengths = story_spans(tokens, EOT_ID)
    assert starts.dtype == lengths.dtype == np.int64
    assert [tokens[s:s + n].tolist() for s, n in zip(starts, lengths)] == stories
    with pytest.raises(MalformedDataError, match="does not end with the end-of-text"):
        story_spans(tokens[:-1], EOT_ID)
    assert len(story_spans(np.zeros(0, np.uint16), EOT_ID)[0]) == 0


def test_subsamples_are_whole_stories_nested_and_just_reach_the_budget():
    stories = random_token_stories(300)
    tokens = stream_of(stories)
    small, large = (subsample_stories(tokens, EOT_ID, n) for n in (1000, 3000))
    for subset, budget in ((small, 1000), (large, 3000)):
        starts, lengths = story_spans(subset, EOT_ID)
        got = [subset[s:s + n].tolist() for s, n in zip(starts, lengths)]
        assert all(story in stories for story in got)
        assert len(subset) >= budget > len(subset) - (lengths[-1] + 1), "the shortest prefix reaching it"
        assert subset.dtype == tokens.dtype
    assert np.array_equal(large[:len(small)], small), "the smaller subset is a prefix of the larger"
    assert not np.array_equal(subsample_stories(tokens, EOT_ID, 1000, seed=1), small)
    assert not np.array_equal(small, tokens[:len(small)]), "stories in random order, not the first ones"
    assert np.array_equal(np.sort(subsample_stories(tokens, EOT_ID, len(tokens))), np.sort(tokens))
    with pytest.raises(ValueError, match=f"max_tokens={len(tokens) + 1:,} exceeds.*300 stories hold {len(tokens):,}"):
        subsample_stories(tokens, EOT_ID, len(tokens) + 1)


# ---------------------------------------------------------------- story rows


def test_story_rows_start_at_a_story_truncate_and_mask_padding(tmp_path):
    stories = [s * (1 + i % 4) for i, s in enumerate(generated_stories(20, seed=3))]
    tok = train_bpe_tokenizer(stories, 300, tmp_path / "bpe.json")
    tokens = tokenize_to_memmap(stories, tok, tmp_path / "train.uint16")
    c = 30
    rows = StoryRows(tokens, tok.eot_id, c, "the training split")
    assert rows.num_rows == 20
    x, y = rows.rows(range(20))
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (20, c)
    lengths = [len(tok.encode(s)) for s in stories]
    assert min(lengths) < c < max(lengths), "both truncated and padded rows"
    for i, story in enumerate(stories):
        ids = tok.encode(story)[:c + 1]
        n = len(ids)
        assert x[i, :min(n, c)].tolist() == ids[:c], "a row starts at its story's first token"
        assert (x[i, n:] == tok.eot_id).all(), "inputs right-padded with end-of-text"
        assert y[i, :n - 1].tolist() == ids[1:], "every real target is the true next token"
        assert (y[i, n - 1:] == IGNORE_INDEX).all(), "every padded target is ignored"
    assert (y != tok.eot_id).all(), "end-of-text is never a target"
    x2, y2 = rows.rows(np.array([7, 2, 7]))
    assert torch.equal(x2, x[[7, 2, 7]]) and torch.equal(y2, y[[7, 2, 7]])


def test_padding_never_reaches_the_loss():
    stories = random_token_stories(40, seed=4, longest=20)
    c = 12
    rows = StoryRows(stream_of(stories), EOT_ID, c)
    x, y = rows.rows(range(40))
    real_targets = sum(min(len(s), c + 1) - 1 for s in stories)
    assert (y != IGNORE_INDEX).sum() == real_targets
    torch.manual_seed(0)
    table = torch.randn(600, 600)  # a per-position "model": logits of slot j depend on x[:, j] only

    def loss(inputs, targets):
        return torch.nn.functional.cross_entropy(table[inputs].reshape(-1, 600), targets.reshape(-1))

    # the loss over the real targets, computed from the stories themselves
    by_hand = torch.stack([-torch.log_softmax(table[a], -1)[b] for s in stories
                           for a, b in zip(s[:c], s[1:c + 1])]).mean()
    assert torch.allclose(loss(x, y), by_hand)
    padded = torch.arange(c)[None, :] >= torch.tensor([min(len(s), c + 1) for s in stories])[:, None]
    garbage = x.clone()
    garbage[padded] = torch.randint(0, 600, (int(padded.sum()),))
    other_stream = np.where(stream_of(stories) == EOT_ID, 599, stream_of(stories))  # pad id 599, not 9
    other_pad = StoryRows(other_stream, 599, c)
    assert (other_pad.rows(range(40))[0][padded] == 599).all()
    assert torch.allclose(loss(garbage, y), by_hand) and torch.allclose(loss(*other_pad.rows(range(40))), by_hand)
    assert not torch.allclose(loss(x, torch.where(y == IGNORE_INDEX, EOT_ID, y)), by_hand), "the test can fail"


def test_one_token_stories_have_no_targets_and_no_stories_is_an_error():
    rows = StoryRows(stream_of([[5], [6, 7, 8]]), EOT_ID, 4)
    x, y = rows.rows([0, 1])
    assert x.tolist() == [[5, 9, 9, 9], [6, 7, 8, 9]]
    assert y.tolist() == [[IGNORE_INDEX] * 4, [7, 8, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(MalformedDataError, match="the validation split holds no stories"):
        StoryRows(np.zeros(0, np.uint16), EOT_ID, 4, "the validation split")


def test_shuffled_batches_take_story_rows():
    rows = StoryRows(stream_of(random_token_stories(24, seed=5)), EOT_ID, 8)
    batches = ShuffledBatches(rows, global_batch=6, seed=1)
    assert sorted(i for step in range(4) for i in batches.indices(step)) == list(range(24))
    x, y = batches.batch(2)
    assert x.shape == (6, 8) and torch.equal(x, rows.rows(batches.indices(2))[0])


def test_prepare_says_what_stories_and_tokens_it_used_within_a_page_width(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RBF_LITE_CACHE", str(tmp_path / "cache"))
    stories = generated_stories(80)
    write_stories(tmp_path / "data" / "tinystories" / "train-sample.txt", stories[:50])
    write_stories(tmp_path / "data" / "tinystories" / "train-extra.txt", stories[40:])  # 10 duplicates
    data = prepare_tinystories(tmp_path / "data", tokenizer="bpe", bpe_vocab_size=300, validation_holdout=8)
    printed = capsys.readouterr().out.strip()
    assert all(len(row) <= 79 for row in printed.splitlines()), "wrapped to fit the page"
    line = " ".join(printed.split())
    c = data.counts
    assert (c["train_stories"], c["validation_stories"], c["duplicates"]) == (72, 8, 10)
    assert c["train_tokens"] == len(data.train) and c["validation_tokens"] == len(data.validation)
    assert (f"72 training stories ({len(data.train):,} tokens) from train-sample.txt + train-extra.txt, "
            f"10 duplicates and 0 validation repeats dropped; validation: 8 stories held out") in line
    subset = prepare_tinystories(tmp_path / "data", tokenizer="bpe", bpe_vocab_size=300, validation_holdout=8,
                                 train_tokens=len(data.train) // 2)
    assert "drawn at random" in capsys.readouterr().out
    assert len(data.train) // 2 <= subset.counts["train_tokens"] < len(data.train)
    assert subset.counts["train_stories"] == len(story_spans(subset.train, data.tokenizer.eot_id)[0]) < 72
    assert np.array_equal(subset.validation, data.validation) and subset.sources["train"] != data.sources["train"]
