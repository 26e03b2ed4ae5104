"""Training batches: data config, tokenizer set-up, packing, and a resumable, seeded batch iterator.

Documents (see corpus.py) are tokenized piece by piece, joined with `</s>` into one token stream per
split, and cut into rows of seq_len + 1 tokens (neighbouring rows share one token, so every token is a
target once). The train split visits its rows in a fresh seeded permutation each epoch, forever; the
held-out split is one fixed pass. Each process takes its slice of the global batch, so any number of
processes sees exactly the rows of a single-process run.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
import numpy as np
from tokenizers import Tokenizer

from nemojax.chat import EOS
from nemojax.errors import ConfigError, DataError
from nemojax.train import corpus
from nemojax.train.tokenizer import (
    NUM_RESERVED_IDS,
    TOKENIZER_FILENAME,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

SPLITS = ("train", "heldout")
HELDOUT_ORDER_SEED = 0  # the held-out rows' order never depends on the run's seed
_STREAM_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_STREAM_CACHE_SIZE = 8


def default_data_config() -> ml_collections.ConfigDict:
    """The `config.data` block: the embedded standard-library corpus unless `source="files"`."""
    return ml_collections.ConfigDict(
        dict(
            source="stdlib",  # "stdlib" (embedded default) or "files"
            paths=(),  # files, directories or globs; a tuple so `--config.data.paths=a.jsonl` works
            format="auto",  # "auto" | "text" | "jsonl" (a `text` field) | "chat" (a `messages` list)
            heldout_fraction=0.05,
            tokenizer_path="",  # an existing tokenizer.json; empty: reuse workdir's, or train one
            vocab_size=4096,
            max_corpus_bytes=8_000_000,  # cap on the stdlib corpus (about 2.3M tokens)
        )
    )


def validate_data_config(cfg: Mapping[str, Any]) -> None:
    """Read and check every data file and field now, so a bad path fails before any compile."""
    if not 0 <= cfg["heldout_fraction"] < 1:
        raise DataError(f"data.heldout_fraction must be in [0, 1), got {cfg['heldout_fraction']}")
    if cfg["tokenizer_path"] and not os.path.exists(cfg["tokenizer_path"]):
        raise DataError(f"data.tokenizer_path not found: {cfg['tokenizer_path']}")
    if cfg["tokenizer_path"]:
        load_tokenizer(cfg["tokenizer_path"])  # an unreadable file fails now, not after the workdir is set up
    if not cfg["tokenizer_path"] and cfg["vocab_size"] < NUM_RESERVED_IDS + 256:
        raise DataError(f"data.vocab_size must be at least {NUM_RESERVED_IDS + 256} (reserved ids and 256 bytes)")
    _split(cfg)


def build_tokenizer(cfg: Mapping[str, Any], workdir: str) -> Tokenizer:
    """`cfg.tokenizer_path`, else `workdir/tokenizer.json` (a resumed run), else one trained on the train split.

    A freshly trained tokenizer is saved to `workdir/tokenizer.json`, next to the checkpoints.
    """
    if cfg["tokenizer_path"]:
        return load_tokenizer(cfg["tokenizer_path"])
    saved = os.path.join(workdir, TOKENIZER_FILENAME)
    if os.path.exists(saved):
        return load_tokenizer(saved)
    train, _ = _split(cfg)
    tokenizer = train_tokenizer((doc.text for doc in train), cfg["vocab_size"])
    save_tokenizer(tokenizer, workdir)
    return tokenizer


class TokenBatches(Iterator[dict[str, np.ndarray]]):
    """This process's rows of each global batch: `inputs`, `targets` (int32 [B, T]) and `loss_mask` (float32).

    B = batch_size // process_count. `loss_mask` is 0 where the target is not trained (chat prompts,
    padding). `state()` / `restore()` resume exactly where an uninterrupted iterator would continue.
    """

    def __init__(
        self,
        cfg: Mapping[str, Any],
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        split: str = "train",
        process_index: int = 0,
        process_count: int = 1,
    ):
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        if seq_len < 1 or batch_size < 1:
            raise ConfigError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if batch_size % process_count or not 0 <= process_index < process_count:
            raise ConfigError(
                f"batch_size {batch_size} must split evenly over {process_count} processes "
                f"(process_index {process_index})"
            )
        self.split, self.seed, self.seq_len = split, seed, seq_len
        self.global_batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self._local_start = process_index * self.local_batch_size
        self.tokens, self.mask = packed_stream(cfg, tokenizer, split)
        self.num_rows = max(1, -(-(len(self.tokens) - 1) // seq_len))
        eos_id = tokenizer.token_to_id(EOS)
        self.tokens, self.mask = _pad_to(self.tokens, self.mask, self.num_rows * seq_len + 1, eos_id)
        self._epoch, self._position = 0, 0
        self._order = self._epoch_order(0)

    def __next__(self) -> dict[str, np.ndarray]:
        if self.split == "heldout" and self._position >= self.num_rows:
            raise StopIteration
        rows = self._take_global_rows()
        local = rows[self._local_start : self._local_start + self.local_batch_size]
        return self._batch(local)

    def state(self) -> dict[str, int | str]:
        """Where the iterator stands (JSON-serialisable)."""
        return {"split": self.split, "epoch": self._epoch, "position": self._position, "num_rows": self.num_rows}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state()`; the data must be the same as when it was taken."""
        if state.get("num_rows", self.num_rows) != self.num_rows or state.get("split", self.split) != self.split:
            raise DataError(
                f"the data changed since this iterator state was saved: {state.get('split')} split with "
                f"{state.get('num_rows')} rows then, {self.split} split with {self.num_rows} rows now"
            )
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self._epoch)

    def _take_global_rows(self) -> np.ndarray:
        """The next global batch's row indices; held-out batches past the end are padded with -1."""
        rows = []
        while len(rows) < self.global_batch_size:
            if self._position == self.num_rows:
                if self.split == "heldout":
                    rows.extend([-1] * (self.global_batch_size - len(rows)))
                    break
                self._epoch, self._position = self._epoch + 1, 0
                self._order = self._epoch_order(self._epoch)
            take = min(self.global_batch_size - len(rows), self.num_rows - self._position)
            rows.extend(self._order[self._position : self._position + take].tolist())
            self._position += take
        return np.asarray(rows, dtype=np.int64)

    def _batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        index_bt = np.maximum(rows, 0)[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        tokens_bt, mask_bt = self.tokens[index_bt], self.mask[index_bt]
        mask_bt = np.where(rows[:, None] >= 0, mask_bt, 0.0).astype(np.float32)
        return {"inputs": tokens_bt[:, :-1], "targets": tokens_bt[:, 1:], "loss_mask": mask_bt[:, 1:]}

    def _epoch_order(self, epoch: int) -> np.ndarray:
        seed = HELDOUT_ORDER_SEED if self.split == "heldout" else self.seed
        return np.random.default_rng([seed, epoch]).permutation(self.num_rows)


def heldout_batches(
    cfg: Mapping[str, Any],
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    num_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """The fixed held-out evaluation set: the first `num_batches` batches of the held-out pass (all if None)."""
    batches = TokenBatches(
        cfg,
        tokenizer,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=HELDOUT_ORDER_SEED,
        split="heldout",
        process_index=process_index,
        process_count=process_count,
    )
    out = []
    for batch in batches:
        if num_batches is not None and len(out) == num_batches:
            break
        out.append(batch)
    return out


def packed_stream(cfg: Mapping[str, Any], tokenizer: Tokenizer, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [N], trained float32 [N]) of a split: documents each followed by `</s>`.

    Cached per process by data fields and tokenizer content; the arrays are read-only.
    """
    key = (_data_key(cfg), hashlib.sha1(tokenizer.to_str().encode()).hexdigest(), split)
    if key not in _STREAM_CACHE:
        train, heldout = _split(cfg)
        documents = train if split == "train" else heldout
        if not documents:
            raise DataError(f"the {split} split is empty (data.heldout_fraction={cfg['heldout_fraction']})")
        tokens, mask = tokenize_documents(documents, tokenizer)
        tokens.setflags(write=False)
        mask.setflags(write=False)
        if len(_STREAM_CACHE) >= _STREAM_CACHE_SIZE:
            _STREAM_CACHE.pop(next(iter(_STREAM_CACHE)))
        _STREAM_CACHE[key] = (tokens, mask)
    return _STREAM_CACHE[key]


def tokenize_documents(documents: list[corpus.Document], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Encode each piece separately (so the mask is exact), then join documents with `</s>`.

    The `</s>` after a document is trained when the document's last piece is (plain text), not after
    a chat, whose assistant turns already end in `<|im_end|>`.
    """
    eos_id = tokenizer.token_to_id(EOS)
    pieces = [segment for doc in documents for segment in doc.segments]
    encodings = iter(tokenizer.encode_batch([text for text, _ in pieces], add_special_tokens=False))
    token_parts, mask_parts = [], []
    for doc in documents:
        for (_, trained), encoding in zip(doc.segments, encodings, strict=False):
            token_parts.append(np.asarray(encoding.ids, dtype=np.int32))
            mask_parts.append(np.full(len(encoding.ids), float(trained), dtype=np.float32))
        token_parts.append(np.asarray([eos_id], dtype=np.int32))
        mask_parts.append(np.asarray([float(doc.segments[-1][1])], dtype=np.float32))
    if not token_parts:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    return np.concatenate(token_parts), np.concatenate(mask_parts)


def _split(cfg: Mapping[str, Any]) -> tuple[list[corpus.Document], list[corpus.Document]]:
    source, paths, data_format, max_corpus_bytes, heldout_fraction, template_dir = _data_key(cfg)
    documents = corpus.load_documents(source, paths, data_format, max_corpus_bytes, template_dir)
    return corpus.split_documents(documents, heldout_fraction)


def _data_key(cfg: Mapping[str, Any]) -> tuple:
    paths = cfg["paths"]
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p]
    template_dir = os.path.dirname(os.path.abspath(cfg["tokenizer_path"])) if cfg["tokenizer_path"] else None
    return (cfg["source"], tuple(paths), cfg["format"], int(cfg["max_corpus_bytes"]), float(cfg["heldout_fraction"]),
            template_dir)


def _pad_to(tokens: np.ndarray, mask: np.ndarray, length: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Extend with untrained `</s>` so the last row is whole."""
    extra = length - len(tokens)
    return (
        np.concatenate([tokens, np.full(extra, eos_id, np.int32)]),
        np.concatenate([mask, np.zeros(extra, np.float32)]),
    )
