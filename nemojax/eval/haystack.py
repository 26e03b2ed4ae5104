"""Needle-in-a-haystack prompts of an exact token length, built from the embedded corpus.

A prompt is `prefix + filler[:p] + needle + filler[p:] + question`, token ids concatenated piece by
piece (so its length is exact): `prefix` is what the tokenizer adds to every text (a BOS id, if any),
the filler is the standard-library corpus train.py uses by default (no download), the needle is the
RULER sentence "The special magic number for KEY is VALUE." and the question ends with the answer's
lead-in, so a model that recalls the needle continues with VALUE. `p` is the requested depth (0: the
needle opens the haystack, 1: it closes it) times the filler's length, rounded.

Everything is a function of (tokenizer, length, depth, sample, seed): the filler of a length starts at
a seed-chosen corpus document, keys and values come from a generator seeded by (seed, length, depth,
sample), so a case never depends on which other lengths or depths were asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from nemojax.errors import ConfigError
from nemojax.train.corpus import load_documents

Encode = Callable[[str], list[int]]

# Words of the needles' keys (RULER draws keys from a word list; these are our own).
ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lively", "mellow", "nimble", "odd", "pale", "quiet", "rapid", "silent", "tidy", "urban", "vivid",
              "wary", "young", "zesty")
NOUNS = ("anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "river", "saddle", "tunnel",
         "umbrella", "valley", "walnut", "yacht", "zephyr")
VALUE_DIGITS = 7
CORPUS_BYTES_PER_TOKEN = 8  # stdlib bytes loaded per filler token wanted (the corpus repeats if short)
MIN_CORPUS_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class NeedleCase:
    """One prompt: `prompt_ids` has exactly `length` tokens; the needle's tokens start at `needle_at`."""

    length: int
    depth: float
    sample: int
    key: str
    value: str
    prompt_ids: tuple[int, ...]
    needle_at: int
    needle_tokens: int


def needle_text(key: str, value: str) -> str:
    return f"\nThe special magic number for {key} is {value}.\n"


def question_text(key: str) -> str:
    return f"\nWhat is the special magic number for {key}? The special magic number for {key} is"


def filler_ids(encode: Encode, count: int, seed: int) -> list[int]:
    """`count` token ids of corpus text: the stdlib documents in order from a seed-chosen one (cycling)."""
    documents = load_documents("stdlib", [], "auto", max(MIN_CORPUS_BYTES, CORPUS_BYTES_PER_TOKEN * count))
    start = int(np.random.default_rng(seed).integers(len(documents)))
    ids: list[int] = []
    position = start
    while len(ids) < count:
        ids.extend(encode(documents[position % len(documents)].text))
        position += 1
        if position - start > 4 * len(documents) and not ids:
            raise ConfigError("the tokenizer encodes the corpus to no tokens")
    return ids[:count]


def key_and_value(seed: int, length: int, depth_index: int, sample: int) -> tuple[str, str]:
    rng = np.random.default_rng([seed, length, depth_index, sample])
    key = f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"
    value = str(int(rng.integers(10 ** (VALUE_DIGITS - 1), 10 ** VALUE_DIGITS)))
    return key, value


def overhead_tokens(encode: Encode, prefix: Sequence[int], key: str, value: str) -> int:
    """Tokens of a prompt that are not filler (prefix, needle, question)."""
    return len(prefix) + len(encode(needle_text(key, value))) + len(encode(question_text(key)))


def build_case(encode: Encode, prefix: Sequence[int], filler: Sequence[int], length: int, depth: float,
               sample: int, key: str, value: str) -> NeedleCase:
    """The prompt of `length` tokens with the needle at `depth` of the filler; ConfigError when the
    needle and question alone do not fit."""
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth must be in [0, 1], got {depth}")
    needle, question = encode(needle_text(key, value)), encode(question_text(key))
    room = length - len(prefix) - len(needle) - len(question)
    if room < 0:
        raise ConfigError(f"length {length} is too short: the needle and question alone take "
                          f"{length - room} tokens")
    if len(filler) < room:
        raise ConfigError(f"{len(filler)} filler tokens given, {room} needed for length {length}")
    at = round(depth * room)
    ids = [*prefix, *filler[:at], *needle, *filler[at:room], *question]
    return NeedleCase(length, depth, sample, key, value, tuple(ids), len(prefix) + at, len(needle))


def make_cases(encode: Encode, prefix: Sequence[int], lengths: Sequence[int], depths: Sequence[float],
               samples: int, seed: int) -> list[NeedleCase]:
    """Every (length, depth, sample) case, lengths outermost."""
    cases = []
    for length in lengths:
        filler = filler_ids(encode, length, seed)
        for d, depth in enumerate(depths):
            for sample in range(samples):
                key, value = key_and_value(seed, length, d, sample)
                cases.append(build_case(encode, prefix, filler, length, depth, sample, key, value))
    return cases
