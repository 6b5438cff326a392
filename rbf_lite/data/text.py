"""TinyStories as packed token windows: local text files or the Hugging Face hub, two tokenizers.

Stories are read from local files when found (an explicit path, $RBF_LITE_DATA, ../shared/data),
else from the hub (`roneneldan/TinyStories`). A sample (the first N stories of a split) is streamed
from the hub, so it needs neither the full 1.9 GB download nor its tokenization. Files may use the official layout (stories separated
by `<|endoftext|>` lines), blank-line-separated paragraphs, or (if neither occurs) one story per
line. A file with no validation companion gives up its last stories as the validation split.

Tokenizers: the GPT-2 / GPT-Neo byte-level BPE (50,257 tokens) from `encoder.json` + `vocab.bpe`
or the hub, or a small byte-level BPE trained on the training stories: with only a few MB of text,
most of GPT-2's 50k embeddings would never be trained. Token ids are cached as uint16 memmaps.

Packing, not padding: every story is followed by `<|endoftext|>` and the whole split becomes one
token stream, cut into non-overlapping windows of `context_length + 1` tokens (inputs and shifted
targets). No compute is spent on padding and no loss mask is needed; a window may start mid-story
and cross story boundaries, and the end-of-text token tells the model where one story ends.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import DataNotFoundError, cache_dir, find_local, not_found
from ..runs import progress

HUB_DATASET = "roneneldan/TinyStories"
SPLITS = ("train", "validation")
EOT = "<|endoftext|>"
LOCAL_FILES = {
    "train": ("tinystories/TinyStories-train.txt", "tinystories/train-sample.txt",
              "TinyStories-train.txt", "train-sample.txt"),
    "validation": ("tinystories/TinyStories-valid.txt", "tinystories/valid-sample.txt",
                   "TinyStories-valid.txt", "valid-sample.txt"),
}
HOW_TO_PROVIDE = (f"download TinyStories-train.txt and TinyStories-valid.txt from the hub dataset "
                  f"{HUB_DATASET} (or any text file of stories) and pass --data PATH, or go online "
                  f"with `pip install datasets` so the hub can be used")
TOKENIZERS = ("gpt2", "bpe")


class MalformedDataError(ValueError):
    """Raised for data that exists but cannot be used: not UTF-8, empty, or too short."""


# ---------------------------------------------------------------- stories


def split_stories(text: str, source: str | Path) -> list[str]:
    """Stories of one text: split on `<|endoftext|>`, else on blank lines, else one per line."""
    if EOT in text:
        parts = text.split(EOT)
    elif re.search(r"\n[ \t]*\n", text):
        parts = re.split(r"\n[ \t]*\n", text)
    else:
        parts = text.splitlines()
    stories = [p.strip() for p in parts if p.strip()]
    if not stories:
        raise MalformedDataError(f"{source} holds no text; expected stories separated by "
                                 f"'{EOT}' lines or blank lines")
    return stories


def read_stories(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MalformedDataError(f"{path} is not UTF-8 text ({e}); expected stories separated by "
                                 f"'{EOT}' lines or blank lines") from None
    return split_stories(text, path)


@dataclass
class Stories:
    """Both splits as lists of stories, and where each came from (for caches and summaries)."""
    train: list[str]
    validation: list[str]
    sources: dict[str, str] = field(default_factory=dict)


def _file_identity(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _find_split(split: str, path: str | Path | None) -> Path | None:
    """An explicit path is the only place searched: a typo must not silently pick other data."""
    if path is not None:
        path = Path(path).expanduser()
        if path.is_file():
            return path if split == "train" else None
        hits = [path / relative for relative in LOCAL_FILES[split] if (path / relative).is_file()]
        return hits[0] if hits else None
    for relative in LOCAL_FILES[split]:
        hit = find_local(relative, path)
        if hit is not None and hit.is_file():
            return hit
    return None


def _check_sample_sizes(sizes: dict[str, int | None]) -> None:
    for split, n in sizes.items():
        if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            raise ValueError(f"{split}_stories must be a positive integer or None (the whole split), "
                             f"got {n!r}")


def _first_stories(stories: Stories, sizes: dict[str, int | None]) -> Stories:
    """Keep the first N stories of each split whose size is given; the sources say so."""
    for split, n in sizes.items():
        kept = getattr(stories, split)
        if n is not None and n < len(kept):
            setattr(stories, split, kept[:n])
            stories.sources[split] = f"first {n} stories of {stories.sources[split]}"
    return stories


def load_tinystories(path: str | Path | None = None, source: str = "auto",
                     validation_fraction: float = 0.05, train_stories: int | None = None,
                     validation_stories: int | None = None) -> Stories:
    """TinyStories train/validation stories from local files (source 'local'), the hub ('hub'),
    or local when found and the hub otherwise ('auto').

    `path` may be a text file (its last `validation_fraction` of stories become the validation
    split) or a folder holding the files named in LOCAL_FILES; without it, RBF_LITE_DATA and
    ../shared/data are searched. `train_stories` / `validation_stories` keep only the first N
    stories of that split (None: all of it); from the hub only those N are downloaded.
    """
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"source must be 'auto', 'local' or 'hub', got {source!r}")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction}")
    sizes = {"train": train_stories, "validation": validation_stories}
    _check_sample_sizes(sizes)
    train_file = _find_split("train", path) if source != "hub" else None
    if train_file is not None:
        train = read_stories(train_file)
        sources = {"train": _file_identity(train_file)}
        valid_file = _find_split("validation", path)
        if valid_file is not None:
            validation = read_stories(valid_file)
            sources["validation"] = _file_identity(valid_file)
        else:
            held_out = max(1, int(len(train) * validation_fraction))
            if held_out >= len(train):
                raise MalformedDataError(f"{train_file} holds {len(train)} stories: too few to hold "
                                         "out a validation split; provide a validation file")
            train, validation = train[:-held_out], train[-held_out:]
            sources["validation"] = f"last {held_out} stories of {sources['train']}"
        return _first_stories(Stories(train, validation, sources), sizes)
    if path is not None:
        raise DataNotFoundError(f"TinyStories text not found at {path}: expected a text file, or a "
                                f"folder holding one of {', '.join(LOCAL_FILES['train'])}. "
                                f"Fix --data, or set RBF_LITE_DATA instead; {HOW_TO_PROVIDE}")
    if source == "local":
        raise not_found("TinyStories text", LOCAL_FILES["train"][0], None, HOW_TO_PROVIDE)
    return _load_from_hub(sizes)


def _hub_split(split: str, n: int | None) -> list[str]:
    """One split from the hub: all of it, or its first n non-empty stories, streamed (a sample then
    costs a few MB of download, not the whole split)."""
    from datasets import load_dataset
    if n is None:
        return [text.strip() for text in load_dataset(HUB_DATASET, split=split)["text"] if text.strip()]
    rows = load_dataset(HUB_DATASET, split=split, streaming=True)
    return list(itertools.islice((text for row in rows if (text := row["text"].strip())), n))


def _load_from_hub(sizes: dict[str, int | None]) -> Stories:
    try:
        stories = {split: _hub_split(split, sizes[split]) for split in SPLITS}
    except Exception as e:  # offline, no `datasets`, or the hub refused: say where we looked
        raise not_found(f"TinyStories text (the hub dataset {HUB_DATASET} failed too: "
                        f"{type(e).__name__}: {str(e)[:200]})", LOCAL_FILES["train"][0], None,
                        HOW_TO_PROVIDE) from e
    for split in SPLITS:
        if not stories[split]:
            raise MalformedDataError(f"the hub dataset {HUB_DATASET} returned no text for {split!r}")
    return Stories(stories["train"], stories["validation"], sources={
        s: f"hub:{HUB_DATASET}:{s}" + (f"[:{sizes[s]}]" if sizes[s] is not None else "") for s in SPLITS})


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


class PackedWindows:
    """Non-overlapping windows of `context_length + 1` tokens of one packed stream."""

    def __init__(self, tokens: np.ndarray, context_length: int, name: str = "tokens"):
        self.tokens, self.context_length = tokens, context_length
        self.num_windows = (len(tokens) - 1) // context_length
        if self.num_windows < 1:
            raise MalformedDataError(f"{name} holds {len(tokens)} tokens: fewer than one window of "
                                     f"context_length + 1 = {context_length + 1}")

    def rows(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets (len(indices), context_length), as torch.long."""
        c = self.context_length
        block = np.stack([np.asarray(self.tokens[i * c: i * c + c + 1], dtype=np.int64) for i in indices])
        block = torch.from_numpy(block)
        return block[:, :-1], block[:, 1:]


class ShuffledBatches:
    """Global batch `step` as a pure function of (seed, step): every window once per epoch, in an
    order reshuffled each epoch. Resuming at a step needs no other data state, and with several
    processes rank r takes its own slice of the same global batch."""

    def __init__(self, windows: PackedWindows, global_batch: int, seed: int):
        self.windows, self.global_batch, self.seed = windows, global_batch, seed
        self._epoch, self._order = None, None

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.windows.num_windows)
        return self._order

    def indices(self, step: int) -> list[int]:
        n = self.windows.num_windows
        flat = range(step * self.global_batch, (step + 1) * self.global_batch)
        return [int(self._order_of(i // n)[i % n]) for i in flat]

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        per_rank = self.global_batch // world_size
        return self.windows.rows(self.indices(step)[rank * per_rank:(rank + 1) * per_rank])


@dataclass
class TokenizedText:
    train: np.ndarray
    validation: np.ndarray
    tokenizer: TextTokenizer
    sources: dict[str, str]


def prepare_tinystories(path: str | Path | None = None, tokenizer: str = "gpt2",
                        bpe_vocab_size: int = 4096, source: str = "auto", train_stories: int | None = None,
                        validation_stories: int | None = None) -> TokenizedText:
    """Stories -> tokenizer -> cached uint16 streams for both splits (see the module docstring);
    `train_stories` / `validation_stories` take a sample as in `load_tinystories`."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    stories = load_tinystories(path, source, train_stories=train_stories,
                               validation_stories=validation_stories)
    key = hashlib.sha1(repr(sorted(stories.sources.items())).encode()).hexdigest()[:16]
    cache = cache_dir("tinystories") / key
    if tokenizer == "gpt2":
        text_tokenizer = gpt2_tokenizer(path if path is not None and Path(path).is_dir() else None)
    else:
        text_tokenizer = train_bpe_tokenizer(stories.train, bpe_vocab_size,
                                             cache / f"bpe{bpe_vocab_size}.json")
    streams = {split: tokenize_to_memmap(getattr(stories, split), text_tokenizer,
                                         cache / f"{split}.{text_tokenizer.name}.uint16",
                                         desc=f"tokenizing {split}")
               for split in SPLITS}
    return TokenizedText(streams["train"], streams["validation"], text_tokenizer, stories.sources)


__all__ = ["DataNotFoundError", "MalformedDataError", "Stories", "TextTokenizer", "PackedWindows",
           "ShuffledBatches", "TokenizedText", "load_tinystories", "gpt2_tokenizer",
           "train_bpe_tokenizer", "tokenize_to_memmap", "prepare_tinystories", "split_stories",
           "read_stories"]
