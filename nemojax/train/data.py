"""Training batches: data config, tokenizer set-up, packing, and a resumable, seeded batch iterator.

Documents (see corpus.py) are tokenized piece by piece, joined with `</s>` into token streams and cut
into rows of seq_len + 1 tokens (neighbouring rows share one token, so every token is a target once).
The train split visits its rows in a fresh seeded permutation each epoch, forever; the held-out split
is one fixed pass. The train split is cut into `data.shards` streams (default: one per process) and
each process tokenises only its own; the batches depend on the shard count, not on the process count.
With `document_masking` (fine-tuning on packed chats) each batch also carries the document ids of its
inputs (`segments`, see `nemojax.model.documents`) and a target that starts another document is not
trained, so a row's documents train as if each were alone.
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
from nemojax.config import INT32_MAX
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
            shards=0,  # train streams; each process tokenises only its own (0: one per process; 1: one for all)
            document_masking=False,  # batches carry `segments`: packed documents do not see each other
        )
    )


def validate_data_config(cfg: Mapping[str, Any]) -> None:
    """Read and check every data file and field now, so a bad path fails before any compile."""
    shards = cfg.get("shards", 0)
    if not isinstance(shards, int) or isinstance(shards, bool) or not 0 <= shards <= 2**31 - 1:
        raise DataError(f"data.shards must be an integer >= 0 (0: one per process), got {shards!r}")
    if not isinstance(cfg.get("document_masking", False), bool):
        raise DataError(f"data.document_masking must be true or false, got {cfg['document_masking']!r}")
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
    """This process's rows of each global batch: `inputs`, `targets` (int32 [B, T]) and `loss_mask` (float32),
    and with `document_masking` the inputs' document ids `segments` (int32 [B, T]).

    B = batch_size // process_count. `loss_mask` is 0 where the target is not trained (chat prompts,
    padding, and with `document_masking` a target that starts another document). `state()` / `restore()`
    resume exactly where an uninterrupted iterator would continue.

    The train split is cut into `data.shards` streams (0: one per process): documents are assigned to a
    shard by a hash of their key, each shard is packed and ordered on its own, and every global batch
    takes batch_size / shards rows from each shard, the shards in order. A process tokenises and packs
    only its own shards, and the batches do not depend on the number of processes. One shard (a single
    process by default) is the single stream of the whole split, which every process tokenises whole and
    slices. The held-out split is small and every process evaluates the same batches: it is always one
    stream.
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
        self.split, self.seq_len = split, seq_len
        self.global_batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.shards = num_shards(cfg, split, batch_size, process_count)
        eos_id = tokenizer.token_to_id(EOS)
        masking = bool(cfg.get("document_masking", False))
        if self.shards == 1:
            order_seed = HELDOUT_ORDER_SEED if split == "heldout" else seed
            self._streams = [_Rows(*packed_stream(cfg, tokenizer, split), seq_len, eos_id, (order_seed,),
                                  masking)]
            self._rows_per_stream = batch_size
            self._local = slice(process_index * self.local_batch_size, (process_index + 1) * self.local_batch_size)
        else:
            per_process = self.shards // process_count
            owned = range(process_index * per_process, (process_index + 1) * per_process)
            self._streams = [_Rows(*packed_stream(cfg, tokenizer, split, (shard, self.shards)), seq_len, eos_id,
                                   (seed, shard), masking) for shard in owned]
            self._rows_per_stream = batch_size // self.shards
            self._local = slice(None)
        self._batches = 0

    @property
    def num_rows(self) -> int:
        """Rows (of seq_len + 1 tokens) of the streams this process reads."""
        return sum(stream.num_rows for stream in self._streams)

    def __next__(self) -> dict[str, np.ndarray]:
        wrap = self.split == "train"
        if not wrap and all(stream.exhausted for stream in self._streams):
            raise StopIteration
        parts = [stream.batch(stream.take(self._rows_per_stream, wrap)[self._local]) for stream in self._streams]
        self._batches += 1
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def state(self) -> dict[str, int | str]:
        """Where the iterator stands (JSON-serialisable; the same on every process)."""
        if self.shards == 1:
            stream = self._streams[0]
            return {"split": self.split, "epoch": stream.epoch, "position": stream.position,
                    "num_rows": stream.num_rows}
        return {"split": self.split, "shards": self.shards, "batches": self._batches}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state()`; the data must be the same as when it was taken."""
        shards = int(state.get("shards", 1))
        rows = state.get("num_rows", self.num_rows) if shards == 1 else self.num_rows
        if rows != self.num_rows or state.get("split", self.split) != self.split or shards != self.shards:
            raise DataError(
                f"the data changed since this iterator state was saved: {state.get('split')} split with "
                f"{state.get('num_rows')} rows in {shards} shards then, {self.split} split with {self.num_rows} "
                f"rows in {self.shards} shards now"
            )
        if shards == 1:
            self._streams[0].seek(int(state["epoch"]), int(state["position"]))
            return
        self._batches = int(state["batches"])
        for stream in self._streams:  # every epoch of a stream is all its rows once: position by arithmetic
            epoch, position = divmod(self._batches * self._rows_per_stream, stream.num_rows)
            stream.seek(epoch, position)


def num_shards(cfg: Mapping[str, Any], split: str, batch_size: int, process_count: int) -> int:
    """How many streams the split is cut into (see `TokenBatches`); ConfigError when they do not fit."""
    if split == "heldout":
        return 1
    shards = int(cfg.get("shards", 0)) or process_count
    if shards != 1 and (shards % process_count or batch_size % shards):
        raise ConfigError(f"data.shards={shards}: must be 1 (every process reads the whole split), or a multiple "
                          f"of the {process_count} processes that divides batch_size={batch_size}")
    return shards


class _Rows:
    """One packed stream cut into rows of seq_len + 1 tokens (neighbours share a token), visited in a fresh
    seeded order each epoch; with `document_masking` its batches carry the inputs' document ids."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, documents: np.ndarray, seq_len: int, eos_id: int,
                 seed: tuple[int, ...], document_masking: bool = False):
        self.seq_len, self.seed, self.document_masking = seq_len, seed, document_masking
        self.num_rows = max(1, -(-(len(tokens) - 1) // seq_len))
        self.tokens, self.mask, self.documents = _pad_to(tokens, mask, documents, self.num_rows * seq_len + 1, eos_id)
        self.seek(0, 0)

    @property
    def exhausted(self) -> bool:
        return self.position >= self.num_rows

    def seek(self, epoch: int, position: int) -> None:
        self.epoch, self.position = epoch, position
        self.order = np.random.default_rng([*self.seed, epoch]).permutation(self.num_rows)

    def take(self, count: int, wrap: bool) -> np.ndarray:
        """The next `count` row indices; past the end a new epoch starts (`wrap`) or -1 pads."""
        rows = []
        while len(rows) < count:
            if self.position == self.num_rows:
                if not wrap:
                    rows.extend([-1] * (count - len(rows)))
                    break
                self.seek(self.epoch + 1, 0)
            take = min(count - len(rows), self.num_rows - self.position)
            rows.extend(self.order[self.position : self.position + take].tolist())
            self.position += take
        return np.asarray(rows, dtype=np.int64)

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        index_bt = np.maximum(rows, 0)[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        tokens_bt, mask_bt = self.tokens[index_bt], self.mask[index_bt]
        mask_bt = np.where(rows[:, None] >= 0, mask_bt, 0.0).astype(np.float32)
        batch = {"inputs": tokens_bt[:, :-1], "targets": tokens_bt[:, 1:], "loss_mask": mask_bt[:, 1:]}
        if self.document_masking:
            documents_bt = self.documents[index_bt]
            batch["loss_mask"] = batch["loss_mask"] * (documents_bt[:, 1:] == documents_bt[:, :-1])
            batch["segments"] = documents_bt[:, :-1]
        return batch


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


def packed_stream(cfg: Mapping[str, Any], tokenizer: Tokenizer, split: str,
                  shard: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens int32 [N], trained float32 [N], document ids int32 [N]) of a split: documents each followed
    by `</s>`. With `shard` = (index, count) only that shard's documents (`shard_of`) are tokenised.

    Cached per process by data fields, tokenizer content and shard; the arrays are read-only.
    """
    key = (_data_key(cfg), hashlib.sha1(tokenizer.to_str().encode()).hexdigest(), split, shard)
    if key not in _STREAM_CACHE:
        train, heldout = _split(cfg)
        documents = train if split == "train" else heldout
        if not documents:
            raise DataError(f"the {split} split is empty (data.heldout_fraction={cfg['heldout_fraction']})")
        if shard is not None:
            documents = [doc for doc in documents if shard_of(doc.key, shard[1]) == shard[0]]
            if not documents:
                raise DataError(f"shard {shard[0]} of {shard[1]} of the {split} split has no documents: "
                                "use fewer data.shards (or more documents)")
        arrays = tokenize_documents(documents, tokenizer)
        for array in arrays:
            array.setflags(write=False)
        if len(_STREAM_CACHE) >= _STREAM_CACHE_SIZE:
            _STREAM_CACHE.pop(next(iter(_STREAM_CACHE)))
        _STREAM_CACHE[key] = arrays
    return _STREAM_CACHE[key]


def shard_of(key: str, shards: int) -> int:
    """The shard of a document, from a hash of its key (independent of the held-out split's hash)."""
    return int.from_bytes(hashlib.sha1(f"shard/{key}".encode()).digest()[:8], "big") * shards >> 64


def tokenize_documents(documents: list[corpus.Document],
                       tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode each piece separately (so the mask is exact), then join documents with `</s>`.

    The `</s>` after a document is trained when the document's last piece is (plain text), not after
    a chat, whose assistant turns already end in `<|im_end|>`. Returns (tokens, trained, document ids):
    ids count documents from 1 (0 is padding) and include the document's `</s>`.
    """
    eos_id = tokenizer.token_to_id(EOS)
    pieces = [segment for doc in documents for segment in doc.segments]
    encodings = iter(tokenizer.encode_batch([text for text, _ in pieces], add_special_tokens=False))
    token_parts, mask_parts, lengths = [], [], []
    for doc in documents:
        length = 1
        for (_, trained), encoding in zip(doc.segments, encodings, strict=False):
            token_parts.append(np.asarray(encoding.ids, dtype=np.int32))
            mask_parts.append(np.full(len(encoding.ids), float(trained), dtype=np.float32))
            length += len(encoding.ids)
        token_parts.append(np.asarray([eos_id], dtype=np.int32))
        mask_parts.append(np.asarray([float(doc.segments[-1][1])], dtype=np.float32))
        lengths.append(length)
    if not token_parts:
        return np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int32)
    ids = 1 + np.arange(len(lengths), dtype=np.int64) % (INT32_MAX - 1)  # neighbours always differ, never 0
    return np.concatenate(token_parts), np.concatenate(mask_parts), np.repeat(ids, lengths).astype(np.int32)


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


def _pad_to(tokens: np.ndarray, mask: np.ndarray, documents: np.ndarray, length: int,
            eos_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Extend with untrained `</s>` (document id 0: padding) so the last row is whole."""
    extra = length - len(tokens)
    return (
        np.concatenate([tokens, np.full(extra, eos_id, np.int32)]),
        np.concatenate([mask, np.zeros(extra, np.float32)]),
        np.concatenate([documents, np.zeros(extra, np.int32)]),
    )
