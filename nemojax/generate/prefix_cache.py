"""Block-level prefix cache: a prompt's leading whole blocks of tokens -> the caches after them, so a
request whose prompt starts like an earlier one prefills only the rest.

A prompt is cut into blocks of `block_size` tokens; block j's key is a chained digest of every token
up to its end (so equal keys mean equal prefixes). An entry holds the block's KV entries of every
attention layer (`span`) and, at the block boundaries where the scheduler snapshotted them, the
Mamba conv and SSM states and write positions after exactly the block's last token (`states`): the
scheduler ends its prefill segments at block boundaries, so these are the states an uninterrupted
prefill would carry, not an approximation. With MTP speculation the key also holds the token after
the block: the MTP block's entry at the block's last position was computed from it.

A hit at depth N (a multiple of the block size, below the prompt's length so that at least one token
is prefilled and the first logits are computed) needs every block up to N and the states at N. The
entries are device arrays; least recently used entries go when the byte budget is exceeded (a hit or
an insertion makes a chain's shallow blocks the most recent, so the deepest blocks go first; a block
is never stored without its parents, nor are its parents evicted to make room for it, so a prompt
longer than the budget keeps its shallowest blocks).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

Key = tuple[bytes, int]  # (chained digest of the tokens up to the block's end, next token or -1)


@dataclasses.dataclass
class Entry:
    span: tuple[Any, ...]  # the block's positions of every cache leaf with a sequence axis
    states: tuple[Any, ...] | None = None  # every other cache leaf after the block's last token

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.span + (self.states or ()))


@dataclasses.dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0
    evictions: int = 0


class PrefixCache:
    """Entries keyed by block chains, within `budget_bytes` of device memory."""

    def __init__(self, budget_bytes: int, block_size: int, with_next_token: bool = False) -> None:
        if budget_bytes < 0 or block_size < 1:
            raise ValueError(f"prefix cache: budget {budget_bytes} bytes and block size {block_size} must be "
                             "non-negative and positive")
        self.budget_bytes, self.block_size, self.with_next_token = budget_bytes, block_size, with_next_token
        self.entries: collections.OrderedDict[Key, Entry] = collections.OrderedDict()
        self.nbytes = 0
        self.stats = PrefixStats()

    def keys(self, prompt_ids: Sequence[int]) -> list[Key]:
        """Keys of the prompt's whole blocks that end before its last token (the ones a hit may use)."""
        b = self.block_size
        keys, digest = [], b""
        for end in range(b, len(prompt_ids), b):
            block = np.asarray(prompt_ids[end - b:end], np.int64).tobytes()
            digest = hashlib.blake2b(digest + block, digest_size=16).digest()
            keys.append((digest, int(prompt_ids[end]) if self.with_next_token else -1))
        return keys

    def lookup(self, keys: Sequence[Key]) -> list[Entry]:
        """The entries of the deepest cached prefix (blocks 0..n-1 present, states at block n-1); empty
        on a miss. Counts the lookup and marks the prefix as recently used."""
        self.stats.lookups += 1
        present = 0
        while present < len(keys) and keys[present] in self.entries:
            present += 1
        depth = present
        while depth and self.entries[keys[depth - 1]].states is None:
            depth -= 1
        if depth:
            self.stats.hits += 1
            self.stats.hit_tokens += depth * self.block_size
            self.touch(keys[:depth])
        return [self.entries[k] for k in keys[:depth]]

    def missing(self, keys: Sequence[Key]) -> list[int]:
        """Indices of the blocks among `keys` without an entry."""
        return [j for j, k in enumerate(keys) if k not in self.entries]

    def has_states(self, key: Key) -> bool:
        entry = self.entries.get(key)
        return entry is not None and entry.states is not None

    def add_span(self, keys: Sequence[Key], j: int, span: tuple[Any, ...]) -> None:
        """Store block `j` of the chain `keys` (kept only while blocks 0..j-1 are: a block without its
        parents could never be used)."""
        if keys[j] not in self.entries and (j == 0 or keys[j - 1] in self.entries):
            self._store(keys[j], Entry(span), protected=keys[:j])

    def add_states(self, keys: Sequence[Key], states: tuple[Any, ...]) -> None:
        """Record the states after the chain's last block (whose span must be stored already)."""
        entry = self.entries.get(keys[-1])
        if entry is not None and entry.states is None:
            self.nbytes -= entry.nbytes
            del self.entries[keys[-1]]
            self._store(keys[-1], Entry(entry.span, states), protected=keys[:-1])

    def touch(self, keys: Sequence[Key]) -> None:
        """Mark a chain as just used: its shallowest block becomes the most recent."""
        for key in reversed(keys):
            if key in self.entries:
                self.entries.move_to_end(key)

    def _store(self, key: Key, entry: Entry, protected: Sequence[Key]) -> None:
        """Insert, evicting least recently used entries other than the new entry's parents (`protected`);
        nothing is stored (or evicted) when that cannot make room."""
        size, keep = entry.nbytes, set(protected)
        victims, freed = [], 0
        for old_key, old in self.entries.items():
            if self.nbytes - freed + size <= self.budget_bytes:
                break
            if old_key not in keep:
                victims.append(old_key)
                freed += old.nbytes
        if self.nbytes - freed + size > self.budget_bytes:
            return
        for old_key in victims:
            self.nbytes -= self.entries.pop(old_key).nbytes
            self.stats.evictions += 1
        self.entries[key] = entry
        self.nbytes += size
