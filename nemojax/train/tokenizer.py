"""Byte-level BPE tokenizers trained with the `tokenizers` library, special tokens at the Nemotron ids.

Ids 0..15 are reserved: `<unk>` 0, `<s>` 1, `</s>` 2, `<|im_start|>` 10, `<|im_end|>` 11, `<think>` 12,
`</think>` 13, and `<SPECIAL_i>` fillers elsewhere, so chat and end-of-text ids match the published
models. Byte-level means every string encodes and decodes back to itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nemojax.chat import BOS, EOS, IM_END, IM_START, THINK_END, THINK_START, UNK
from nemojax.errors import DataError

NUM_RESERVED_IDS = 16
NAMED_SPECIAL_IDS = {UNK: 0, BOS: 1, EOS: 2, IM_START: 10, IM_END: 11, THINK_START: 12, THINK_END: 13}
TOKENIZER_FILENAME = "tokenizer.json"
_NUM_BYTES = 256


def special_tokens() -> list[str]:
    """The reserved tokens in id order (fillers named `<SPECIAL_i>`)."""
    by_id = {i: s for s, i in NAMED_SPECIAL_IDS.items()}
    return [by_id.get(i, f"<SPECIAL_{i}>") for i in range(NUM_RESERVED_IDS)]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (reserved ids, 256 bytes, then merges) on `texts`."""
    if vocab_size < NUM_RESERVED_IDS + _NUM_BYTES:
        raise DataError(f"vocab_size must be at least {NUM_RESERVED_IDS + _NUM_BYTES}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: str) -> str:
    """Write `directory/tokenizer.json` atomically and return its path.

    A crash never leaves half a file, and processes saving the same tokenizer at once do not collide.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, TOKENIZER_FILENAME)
    partial = f"{path}.{os.getpid()}.tmp"
    tokenizer.save(partial)
    os.replace(partial, path)
    return path


def load_tokenizer(path: str) -> Tokenizer:
    """Load a `tokenizer.json` (or a directory holding one): ours, or a published model's."""
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILENAME)
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file not found: {path}")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as error:  # the library raises a bare Exception on malformed JSON
        raise DataError(f"cannot read tokenizer {path}: {error}") from error
    check_special_tokens(tokenizer, path)
    return tokenizer


def check_special_tokens(tokenizer: Tokenizer, where: str) -> None:
    """Raise DataError unless the tokens packing and chat rely on (`</s>`, `<|im_start|>`, `<|im_end|>`) exist.

    Their ids are read from the tokenizer, so a published tokenizer with other ids still works.
    """
    for token in (EOS, IM_START, IM_END):
        if tokenizer.token_to_id(token) is None:
            raise DataError(f"{where}: the tokenizer has no {token} token")
