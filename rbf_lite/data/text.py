"""TinyStories as token rows: local text files or the Hugging Face hub, two tokenizers, two layouts.

Stories are read from local files when found (an explicit path or list of files, $RBF_LITE_DATA,
../shared/data), else from the hub (`roneneldan/TinyStories`). A folder gives every training file
it holds (LOCAL_FILES, in that order: e.g. train-sample.txt + train-extra.txt), so no text we have
is left unused. A sample (the first N stories of a split) is streamed from the hub, so it needs
neither the full 1.9 GB download nor its tokenization. Files may use the official layout (stories
separated by `<|endoftext|>` lines), blank-line-separated paragraphs, or (if neither occurs) one
story per line.

Cleaning, because the files overlap: exact duplicate training stories are dropped (the first
kept), and so is every training story that repeats a validation story, else validation would
measure memorisation. The validation sample marks paragraphs, not stories, so a repeat is found by
its paragraphs: a training story is a repeat if one of its paragraphs of at least
REPEAT_MIN_CHARS characters (whitespace-normalised) is a validation paragraph. Short paragraphs
("The end.") are shared by unrelated stories (246 training stories share one with the validation
sample); on the real files, a training story with a paragraph of 40+ characters in the validation
sample has all its long paragraphs there (3 stories): a true repeat.

Validation: the validation file when found, or `validation_holdout` = N training stories picked at
random (seed 42) as the seed did (it validated on a random 0.1% of the training stories; our
validation sample has no story boundaries, so the story layout cannot use it), or else the last
stories of a single training file.

Tokenizers: the GPT-2 / GPT-Neo byte-level BPE (50,257 tokens) from `encoder.json` + `vocab.bpe`
or the hub, or a small byte-level BPE trained on the training stories: with only a few MB of text,
most of GPT-2's 50k embeddings would never be trained. Each split becomes one uint16 token stream,
every story followed by exactly one `<|endoftext|>` (which occurs nowhere else), cached as a memmap.
`story_spans` finds the stories again; `subsample_stories` takes whole stories up to a token budget.

Two row layouts with one interface (`num_rows`, `rows(indices) -> (x, y)`), both fed by
`ShuffledBatches`:

- `PackedWindows`: the stream cut into non-overlapping windows of `context_length + 1` tokens. No
  compute is spent on padding and no loss mask is needed; a window may start mid-story and cross
  story boundaries, and the end-of-text token tells the model where one story ends.
- `StoryRows`: the seed's layout. One row per story, its first `context_length + 1` tokens,
  right-padded with end-of-text; targets whose slot is padding are IGNORE_INDEX, so padding never
  reaches the loss and no end-of-text token is ever a target. Every row starts at a story's start.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import DataNotFoundError, cache_dir, candidate_roots, find_local, not_found
from ..runs import progress

HUB_DATASET = "roneneldan/TinyStories"
SPLITS = ("train", "validation")
EOT = "<|endoftext|>"
LOCAL_FILES = {  # every training file found in a folder is used, in this order; never the lowercased sample
    "train": ("tinystories/TinyStories-train.txt", "tinystories/train-sample.txt",
              "tinystories/train-extra.txt", "TinyStories-train.txt", "train-sample.txt", "train-extra.txt"),
    "validation": ("tinystories/TinyStories-valid.txt", "tinystories/valid-sample.txt",
                   "TinyStories-valid.txt", "valid-sample.txt"),
}
HOW_TO_PROVIDE = (f"download TinyStories-train.txt and TinyStories-valid.txt from the hub dataset "
                  f"{HUB_DATASET} (or any text file of stories) and pass --data PATH, or go online "
                  f"with `pip install datasets` so the hub can be used")
TOKENIZERS = ("gpt2", "bpe")
HOLDOUT_SEED = 42         # the seed's train/validation split seed
REPEAT_MIN_CHARS = 80     # paragraphs this long identify a story (see the module docstring)
IGNORE_INDEX = -100       # targets torch's cross_entropy leaves out of the loss (its default)
# Part of the token cache key: a change to how stories are cleaned must not reuse old caches.
CLEANING = f"exact duplicates and validation repeats (paragraphs >= {REPEAT_MIN_CHARS} chars) dropped"


class MalformedDataError(ValueError):
    """Raised for data that exists but cannot be used: not UTF-8, empty, or too short."""


# ---------------------------------------------------------------- stories


def _layout(text: str) -> str:
    if EOT in text:
        return "stories"
    return "paragraphs" if re.search(r"\n[ \t]*\n", text) else "lines"


def split_stories(text: str, source: str | Path) -> list[str]:
    """Stories of one text: split on `<|endoftext|>`, else on blank lines, else one per line."""
    layout = _layout(text)
    if layout == "stories":
        parts = text.split(EOT)
    elif layout == "paragraphs":
        parts = re.split(r"\n[ \t]*\n", text)
    else:
        parts = text.splitlines()
    stories = [p.strip() for p in parts if p.strip()]
    if not stories:
        raise MalformedDataError(f"{source} holds no text; expected stories separated by "
                                 f"'{EOT}' lines or blank lines")
    return stories


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MalformedDataError(f"{path} is not UTF-8 text ({e}); expected stories separated by "
                                 f"'{EOT}' lines or blank lines") from None


def read_stories(path: str | Path) -> list[str]:
    path = Path(path)
    return split_stories(_read_text(path), path)


def _paragraphs(story: str) -> list[str]:
    """A story's paragraphs long enough to identify it, whitespace-normalised. Training files
    end paragraphs with one newline, the validation sample with a blank line: lines cover both."""
    lines = (" ".join(line.split()) for line in story.splitlines())
    return [line for line in lines if len(line) >= REPEAT_MIN_CHARS]


def drop_validation_repeats(train: list[str], validation: list[str]) -> tuple[list[str], int]:
    """`train` without the stories that repeat a validation story (one of their paragraphs of at
    least REPEAT_MIN_CHARS characters is a validation paragraph), and how many were dropped."""
    seen = {p for story in validation for p in _paragraphs(story)}
    kept = [story for story in train if seen.isdisjoint(_paragraphs(story))]
    return kept, len(train) - len(kept)


@dataclass
class Stories:
    """Both splits as lists of stories, where each came from (for caches and summaries), and what
    was read and dropped on the way (`counts`: files, read per file, duplicates,
    validation_repeats, held_out, unsampled, kept, validation, and validation_from / _file / _unit
    saying where validation came from; read adds up to duplicates + validation_repeats + held_out
    + unsampled + kept)."""
    train: list[str]
    validation: list[str]
    sources: dict[str, str] = field(default_factory=dict)
    counts: dict = field(default_factory=dict)


def _file_identity(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _files_in(root: Path, split: str) -> list[Path]:
    """The files of one split in `root`, in LOCAL_FILES order, each once (links resolved)."""
    hits, seen = [], set()
    for relative in LOCAL_FILES[split]:
        candidate = root / relative
        if candidate.is_file() and candidate.resolve() not in seen:
            seen.add(candidate.resolve())
            hits.append(candidate)
    return hits


def _find_files(path) -> tuple[list[Path], Path | None]:
    """Training files and the validation file (or None) to read; no training files: ([], None).

    An explicit path is the only place searched (a typo must not silently pick other data): a
    list of text files (all training text), one text file, or a folder. Without one, the first
    of $RBF_LITE_DATA and ../shared/data holding a training file is used, validation from there
    too, so the two splits never come from different copies of the data.
    """
    if isinstance(path, (list, tuple)):
        files = [Path(p).expanduser() for p in path]
        missing = [str(p) for p in files if not p.is_file()]
        if not files or missing:
            raise DataNotFoundError(f"TinyStories text not found: a list of paths must name text files; "
                                    f"{'not files: ' + ', '.join(missing) if missing else 'the list is empty'}")
        return files, None
    if path is not None:
        path = Path(path).expanduser()
        if path.is_file():
            return [path], None
        roots = [path]
    else:
        roots = candidate_roots()
    for root in roots:
        train = _files_in(root, "train")
        if train:
            validation = _files_in(root, "validation")
            return train, (validation[0] if validation else None)
    return [], None


def _check_positive(name: str, n: int | None) -> None:
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise ValueError(f"{name} must be a positive integer or None, got {n!r}")


def load_tinystories(path: str | Path | list | None = None, source: str = "auto",
                     validation_fraction: float = 0.05, train_stories: int | None = None,
                     validation_stories: int | None = None,
                     validation_holdout: int | None = None) -> Stories:
    """TinyStories train/validation stories from local files (source 'local'), the hub ('hub'),
    or local when found and the hub otherwise ('auto'); duplicates and validation repeats dropped.

    `path` may be a folder holding the files named in LOCAL_FILES (every training file is read),
    a text file, or a list of text files (all training text); without it, RBF_LITE_DATA and
    ../shared/data are searched. Validation: `validation_holdout` = N training stories picked at
    random (seed 42, after dropping duplicates; from the hub its validation split is then not
    downloaded), else the validation file, else the last `validation_fraction` of the training
    stories. `train_stories` / `validation_stories` keep only the first N stories of that split
    (None: all of it; the validation split does not depend on `train_stories`); from the hub
    only those N (plus the holdout) are downloaded.
    """
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"source must be 'auto', 'local' or 'hub', got {source!r}")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction}")
    for name, n in (("train_stories", train_stories), ("validation_stories", validation_stories),
                    ("validation_holdout", validation_holdout)):
        _check_positive(name, n)
    if validation_holdout is not None and validation_stories is not None:
        raise ValueError(f"validation_holdout={validation_holdout} already sets the validation split's "
                         f"size; leave validation_stories unset (got {validation_stories})")
    train_files, valid_file = _find_files(path) if source != "hub" else ([], None)
    if train_files:
        parts = [(_file_identity(f), str(f), read_stories(f)) for f in train_files]
        validation = None
        if valid_file is not None and validation_holdout is None:
            text = _read_text(valid_file)
            validation = (_file_identity(valid_file), str(valid_file), split_stories(text, valid_file),
                          _layout(text))
        return _assemble(parts, validation, validation_holdout, validation_fraction,
                         train_stories, validation_stories)
    if path is not None:
        raise DataNotFoundError(f"TinyStories text not found at {path}: expected a text file, or a "
                                f"folder holding one of {', '.join(LOCAL_FILES['train'])}. "
                                f"Fix --data, or set RBF_LITE_DATA instead; {HOW_TO_PROVIDE}")
    if source == "local":
        raise not_found("TinyStories text", LOCAL_FILES["train"][0], None, HOW_TO_PROVIDE)
    return _load_from_hub(train_stories, validation_stories, validation_holdout)


def _assemble(parts: list[tuple[str, str, list[str]]], validation: tuple[str, str, list[str], str] | None,
              holdout: int | None, validation_fraction: float, train_stories: int | None,
              validation_stories: int | None) -> Stories:
    """Training parts (identity, name, stories) and the validation file's (identity, name, stories,
    layout) or None -> cleaned Stories: drop duplicates, choose validation, drop its repeats, sample."""
    counts = {"files": [name for _, name, _ in parts], "read": {name: len(s) for _, name, s in parts}}
    train_source = " + ".join(identity for identity, _, _ in parts)
    read = [story for _, _, stories in parts for story in stories]
    train = list(dict.fromkeys(read))  # exact duplicates: the first kept
    counts["duplicates"] = len(read) - len(train)
    sources = {"train": train_source}
    if holdout is not None:
        if holdout >= len(train):
            raise ValueError(f"validation_holdout={holdout} leaves no training stories: the training "
                             f"text holds {len(train)} distinct stories")
        picked = np.random.default_rng(HOLDOUT_SEED).permutation(len(train))[:holdout]
        valid, picked_set = [train[i] for i in picked], set(picked.tolist())
        train = [story for i, story in enumerate(train) if i not in picked_set]
        sources["validation"] = f"{holdout} stories held out of {train_source} (seed {HOLDOUT_SEED})"
        sources["train"] = f"{train_source}, less {holdout} stories held out (seed {HOLDOUT_SEED})"
        counts.update(held_out=holdout, validation_from=f"random holdout (seed {HOLDOUT_SEED})",
                      validation_file=None, validation_unit="stories")
    elif validation is not None:
        identity, name, valid, unit = validation
        sources["validation"] = identity
        counts.update(held_out=0, validation_from="file", validation_file=name, validation_unit=unit)
    else:
        held_out = max(1, int(len(train) * validation_fraction))
        if held_out >= len(train):
            raise MalformedDataError(f"{' + '.join(counts['files'])} holds {len(train)} stories: too few "
                                     "to hold out a validation split; provide a validation file")
        train, valid = train[:-held_out], train[-held_out:]
        sources["validation"] = f"last {held_out} stories of {train_source}"
        counts.update(held_out=held_out, validation_from="last stories", validation_file=None,
                      validation_unit="stories")
    if validation_stories is not None and validation_stories < len(valid):
        valid = valid[:validation_stories]
        sources["validation"] = f"first {validation_stories} stories of {sources['validation']}"
    train, counts["validation_repeats"] = drop_validation_repeats(train, valid)
    counts["unsampled"] = 0
    if train_stories is not None and train_stories < len(train):
        counts["unsampled"] = len(train) - train_stories
        train = train[:train_stories]
        sources["train"] = f"first {train_stories} stories of {sources['train']}"
    counts.update(kept=len(train), validation=len(valid))
    return Stories(train, valid, sources, counts)


def _hub_split(split: str, n: int | None) -> list[str]:
    """One split from the hub: all of it, or its first n non-empty stories, streamed (a sample then
    costs a few MB of download, not the whole split)."""
    from datasets import load_dataset
    if n is None:
        return [text.strip() for text in load_dataset(HUB_DATASET, split=split)["text"] if text.strip()]
    rows = load_dataset(HUB_DATASET, split=split, streaming=True)
    return list(itertools.islice((text for row in rows if (text := row["text"].strip())), n))


def _load_from_hub(train_stories: int | None, validation_stories: int | None,
                   holdout: int | None) -> Stories:
    """The hub's splits, cleaned as local files are; with a holdout the validation split is not
    downloaded, and a sample of N training stories streams N + holdout."""
    sizes = {"train": None if train_stories is None else train_stories + (holdout or 0),
             "validation": validation_stories}
    names = {s: f"hub:{HUB_DATASET}:{s}" + (f"[:{sizes[s]}]" if sizes[s] is not None else "") for s in SPLITS}
    try:
        stories = {split: _hub_split(split, sizes[split])
                   for split in (SPLITS if holdout is None else ("train",))}
    except Exception as e:  # offline, no `datasets`, or the hub refused: say where we looked
        raise not_found(f"TinyStories text (the hub dataset {HUB_DATASET} failed too: "
                        f"{type(e).__name__}: {str(e)[:200]})", LOCAL_FILES["train"][0], None,
                        HOW_TO_PROVIDE) from e
    for split, texts in stories.items():
        if not texts:
            raise MalformedDataError(f"the hub dataset {HUB_DATASET} returned no text for {split!r}")
    validation = (None if holdout is not None else
                  (names["validation"], names["validation"], stories["validation"], "stories"))
    return _assemble([(names["train"], names["train"], stories["train"])], validation, holdout,
                     0.05, train_stories, None)


# ---------------------------------------------------------------- tokenizers


@dataclass
class TextTokenizer:
    """A `tokenizers.Tokenizer` with its end-of-text id and a name that identifies its vocabulary."""
    name: str
    backend: object
    eot_id: int

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def _byte_level(tokenizer):
    from tokenizers import decoders, pre_tokenizers
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("the text data needs Hugging Face `tokenizers`: "
                          "pip install 'rbf_lite[data]' (or pip install tokenizers)") from None
    return tokenizers


def gpt2_tokenizer(path: str | Path | None = None) -> TextTokenizer:
    """GPT-2 / GPT-Neo BPE from local `encoder.json` + `vocab.bpe` (in `path`, or in a
    `gpt2-tokenizer/` folder under the data roots), else from the hub."""
    tokenizers = _require_tokenizers()
    for relative in ("encoder.json", "gpt2-tokenizer/encoder.json"):
        encoder = find_local(relative, path)
        if encoder is not None and (encoder.parent / "vocab.bpe").is_file():
            backend = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(
                str(encoder), str(encoder.parent / "vocab.bpe")))
            break
    else:
        try:
            backend = tokenizers.Tokenizer.from_pretrained("gpt2")
        except Exception as e:
            raise not_found(f"GPT-2 tokenizer files (the hub's 'gpt2' failed too: {type(e).__name__})",
                            "gpt2-tokenizer/encoder.json", path,
                            "put encoder.json and vocab.bpe (from the GPT-2 release) in that folder") from e
    backend = _byte_level(backend)
    backend.add_special_tokens([EOT])
    return TextTokenizer("gpt2", backend, backend.token_to_id(EOT))


def train_bpe_tokenizer(stories: list[str], vocab_size: int, cache_file: str | Path) -> TextTokenizer:
    """A byte-level BPE with `vocab_size` tokens (including `<|endoftext|>`) learned from
    `stories`, loaded from `cache_file` when an earlier run already trained it."""
    tokenizers = _require_tokenizers()
    if not (isinstance(vocab_size, int) and 257 <= vocab_size <= 65535):
        raise ValueError(f"bpe vocab_size must be an integer in [257, 65535] (256 bytes + "
                         f"end-of-text; ids stored as uint16), got {vocab_size!r}")
    cache_file = Path(cache_file)
    if cache_file.exists():
        backend = tokenizers.Tokenizer.from_file(str(cache_file))
    else:
        backend = _byte_level(tokenizers.Tokenizer(tokenizers.models.BPE()))
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(stories, trainer)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        backend.save(str(tmp))
        os.replace(tmp, cache_file)
    return TextTokenizer(f"bpe{vocab_size}", backend, backend.token_to_id(EOT))


# ---------------------------------------------------------------- token caches and windows


def tokenize_to_memmap(stories: list[str], tokenizer: TextTokenizer, cache_file: str | Path,
                       desc: str = "tokenizing", batch_size: int = 1024) -> np.memmap:
    """All stories as one uint16 stream, each followed by end-of-text; cached in `cache_file`."""
    if tokenizer.vocab_size > 65536:
        raise ValueError(f"{tokenizer.name} has {tokenizer.vocab_size} tokens: too many for uint16")
    cache_file = Path(cache_file)
    if not cache_file.exists():
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        with tmp.open("wb") as f, progress(total=len(stories), desc=desc, unit="story", leave=False) as bar:
            for start in range(0, len(stories), batch_size):
                chunk = stories[start:start + batch_size]
                for ids in tokenizer.encode_batch(chunk):
                    np.asarray(ids + [tokenizer.eot_id], dtype=np.uint16).tofile(f)
                bar.update(len(chunk))
        os.replace(tmp, cache_file)
    return np.memmap(cache_file, dtype=np.uint16, mode="r")


def story_spans(tokens: np.ndarray, eot_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the stories of a stream, int64; lengths exclude the end-of-text."""
    ends = np.flatnonzero(np.asarray(tokens) == eot_id)
    if len(tokens) and (len(ends) == 0 or ends[-1] != len(tokens) - 1):
        raise MalformedDataError(f"a token stream of {len(tokens)} tokens does not end with the "
                                 f"end-of-text id {eot_id}: not a stream of whole stories")
    starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64) if len(ends) else np.zeros(0, np.int64)
    return starts, (ends - starts).astype(np.int64)


def _gather(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """tokens[starts[i]: starts[i] + lengths[i]] for every i, concatenated, without a Python loop."""
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.asarray(tokens[np.repeat(starts, lengths) + offsets])


def subsample_stories(tokens: np.ndarray, eot_id: int, max_tokens: int, seed: int = 0) -> np.ndarray:
    """Whole stories in one fixed random order (seed), the fewest whose tokens (each with its
    end-of-text) reach `max_tokens`, as a new stream in that order. The order depends only on the
    number of stories and the seed, so subsets are nested: the 1 M one holds the 0.5 M one."""
    _check_positive("max_tokens", max_tokens)
    starts, lengths = story_spans(tokens, eot_id)
    if max_tokens > len(tokens):
        raise ValueError(f"max_tokens={max_tokens:,} exceeds the stream: {len(starts):,} stories hold "
                         f"{len(tokens):,} tokens (end-of-text included)")
    order = np.random.default_rng(seed).permutation(len(starts))
    taken = int(np.searchsorted(np.cumsum(lengths[order] + 1), max_tokens)) + 1
    return _gather(tokens, starts[order[:taken]], lengths[order[:taken]] + 1)


class PackedWindows:
    """Non-overlapping windows of `context_length + 1` tokens of one packed stream."""

    def __init__(self, tokens: np.ndarray, context_length: int, name: str = "tokens"):
        self.tokens, self.context_length = tokens, context_length
        self.num_rows = (len(tokens) - 1) // context_length
        if self.num_rows < 1:
            raise MalformedDataError(f"{name} holds {len(tokens)} tokens: fewer than one window of "
                                     f"context_length + 1 = {context_length + 1}")

    def rows(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets (len(indices), context_length), as torch.long."""
        c = self.context_length
        starts = np.asarray(indices, dtype=np.int64).reshape(-1, 1) * c
        block = torch.from_numpy(np.asarray(self.tokens[starts + np.arange(c + 1)], dtype=np.int64))
        return block[:, :-1], block[:, 1:]


class StoryRows:
    """One row per story, as the seed trains: the story's first `context_length + 1` tokens
    (no end-of-text), right-padded with `eot_id`; targets whose slot is padding are IGNORE_INDEX,
    so padding never reaches the loss. A one-token story has no target at all (its row is all
    IGNORE_INDEX): allowed, but a batch of only such rows has no loss (its mean is NaN)."""

    def __init__(self, tokens: np.ndarray, eot_id: int, context_length: int, name: str = "tokens"):
        self.tokens, self.eot_id, self.context_length = tokens, eot_id, context_length
        self.starts, self.lengths = story_spans(tokens, eot_id)
        self.num_rows = len(self.starts)
        if self.num_rows < 1:
            raise MalformedDataError(f"{name} holds no stories ({len(tokens)} tokens): nothing to "
                                     "make story rows of")

    def rows(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets (len(indices), context_length), as torch.long; targets
        are IGNORE_INDEX where their slot is padding. Vectorised: it is called every step."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        width = np.arange(self.context_length + 1)
        real = width < np.minimum(self.lengths[indices], self.context_length + 1)[:, None]
        positions = np.minimum(self.starts[indices][:, None] + width, len(self.tokens) - 1)
        block = np.where(real, np.asarray(self.tokens[positions], dtype=np.int64), self.eot_id)
        targets = np.where(real[:, 1:], block[:, 1:], IGNORE_INDEX)
        return torch.from_numpy(np.ascontiguousarray(block[:, :-1])), torch.from_numpy(targets)


class ShuffledBatches:
    """Global batch `step` as a pure function of (seed, step): every row (PackedWindows or
    StoryRows) once per epoch, in an order reshuffled each epoch. Resuming at a step needs no
    other data state, and with several processes rank r takes its own slice of the same global batch."""

    def __init__(self, windows: PackedWindows | StoryRows, global_batch: int, seed: int):
        self.windows, self.global_batch, self.seed = windows, global_batch, seed
        self._epoch, self._order = None, None

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.windows.num_rows)
        return self._order

    def indices(self, step: int) -> list[int]:
        n = self.windows.num_rows
        flat = range(step * self.global_batch, (step + 1) * self.global_batch)
        return [int(self._order_of(i // n)[i % n]) for i in flat]

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        per_rank = self.global_batch // world_size
        return self.windows.rows(self.indices(step)[rank * per_rank:(rank + 1) * per_rank])


@dataclass
class TokenizedText:
    """Both splits as token streams; `counts` holds train/validation stories and tokens as used
    (after `train_tokens`) beside the Stories counts."""
    train: np.ndarray
    validation: np.ndarray
    tokenizer: TextTokenizer
    sources: dict[str, str]
    counts: dict = field(default_factory=dict)


def prepare_tinystories(path: str | Path | list | None = None, tokenizer: str = "gpt2",
                        bpe_vocab_size: int = 4096, source: str = "auto", train_stories: int | None = None,
                        validation_stories: int | None = None, validation_holdout: int | None = None,
                        train_tokens: int | None = None) -> TokenizedText:
    """Stories -> tokenizer -> cached uint16 streams for both splits (see the module docstring);
    `train_stories` / `validation_stories` / `validation_holdout` as in `load_tinystories`;
    `train_tokens` keeps whole training stories up to that many tokens (`subsample_stories`, seed 0).
    Prints one line saying what was used and dropped."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    _check_positive("train_tokens", train_tokens)
    stories = load_tinystories(path, source, train_stories=train_stories,
                               validation_stories=validation_stories, validation_holdout=validation_holdout)
    key = hashlib.sha1(repr((CLEANING, sorted(stories.sources.items()))).encode()).hexdigest()[:16]
    cache = cache_dir("tinystories") / key
    if tokenizer == "gpt2":
        folder = path if isinstance(path, (str, Path)) and Path(path).is_dir() else None
        text_tokenizer = gpt2_tokenizer(folder)
    else:
        text_tokenizer = train_bpe_tokenizer(stories.train, bpe_vocab_size,
                                             cache / f"bpe{bpe_vocab_size}.json")
    streams = {split: tokenize_to_memmap(getattr(stories, split), text_tokenizer,
                                         cache / f"{split}.{text_tokenizer.name}.uint16",
                                         desc=f"tokenizing {split}")
               for split in SPLITS}
    sources = dict(stories.sources)
    all_train_tokens = len(streams["train"])
    if train_tokens is not None:
        streams["train"] = subsample_stories(streams["train"], text_tokenizer.eot_id, train_tokens)
        sources["train"] = f"random whole stories (seed 0) reaching {train_tokens} tokens of {sources['train']}"
    eot = text_tokenizer.eot_id
    counts = {**stories.counts,
              "train_stories": int(np.count_nonzero(np.asarray(streams["train"]) == eot)),
              "train_tokens": len(streams["train"]),
              "validation_stories": int(np.count_nonzero(np.asarray(streams["validation"]) == eot)),
              "validation_tokens": len(streams["validation"])}
    print(_summary_line(counts, all_train_tokens), flush=True)
    return TokenizedText(streams["train"], streams["validation"], text_tokenizer, sources, counts)


def _summary_line(counts: dict, all_train_tokens: int) -> str:
    """A few lines: the stories and tokens used per split, where from, and what was dropped."""
    names = " + ".join(Path(f).name if not f.startswith("hub:") else f for f in counts["files"])
    train = f"{counts['train_stories']:,} training stories ({counts['train_tokens']:,} tokens)"
    if counts["train_tokens"] < all_train_tokens:
        train = (f"{train[:-1]}; drawn at random, seed 0, from {counts['kept']:,} stories / "
                 f"{all_train_tokens:,} tokens)")
    train += f" from {names}"
    if counts["unsampled"]:
        train += f" (the first {counts['kept']:,} kept)"
    dropped = (f"{counts['duplicates']:,} duplicates and {counts['validation_repeats']:,} "
               f"validation repeats dropped")
    n, unit = counts["validation_stories"], counts["validation_unit"]
    if counts["validation_file"] is not None:
        name = counts["validation_file"]
        validation = f"{n:,} {unit} of {name if name.startswith('hub:') else Path(name).name}"
    elif counts["validation_from"] == "last stories":
        validation = f"the last {n:,} stories held out"
    else:
        validation = f"{n:,} stories held out at random, seed {HOLDOUT_SEED}"
    text = (f"TinyStories: {train}, {dropped}; validation: {validation} "
            f"({counts['validation_tokens']:,} tokens)")
    return textwrap.fill(text, 79, subsequent_indent="  ", break_on_hyphens=False)  # fits a page


__all__ = ["DataNotFoundError", "MalformedDataError", "Stories", "TextTokenizer", "PackedWindows",
           "StoryRows", "ShuffledBatches", "TokenizedText", "IGNORE_INDEX", "load_tinystories",
           "gpt2_tokenizer", "train_bpe_tokenizer", "tokenize_to_memmap", "prepare_tinystories",
           "split_stories", "read_stories", "drop_validation_repeats", "story_spans", "subsample_stories"]
