"""Rollouts: the student's own samples, drawn with the serving engine, as fixed-shape training arrays.

One `Engine` serves the whole run (its compiled prefill/decode programs are reused every step); each
step it is pointed at the student's current variables, which have the same shapes and shardings.
A rollout's randomness comes from (run seed, step, row) alone, so a resumed run draws the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from jax.sharding import Mesh

from nemojax.generate.engine import Engine
from nemojax.generate.requests import Request
from nemojax.model import NemotronH


class Rollouts(NamedTuple):
    """n sequences `prompt + completion`, right-padded with `pad_id` to width W.

    `inputs_nt` / `targets_nt` are the sequences without their last / first token (W - 1 positions);
    `mask_nt` is 1 where the target is a token the student generated (the loss positions)."""

    inputs_nt: np.ndarray
    targets_nt: np.ndarray
    mask_nt: np.ndarray
    completions: list[list[int]]    # generated ids, end-of-sequence id included when one was drawn
    finish_reasons: list[str]


def rollout_seed(seed: int, step: int) -> int:
    """The engine seed of one step's rollouts (rows differ by their index)."""
    return (int(seed) * 1_000_003 + int(step)) % 2**31


_ENGINES: dict = {}


class RolloutSampler:
    """Samples completions of token prompts from the student with continuous batching."""

    def __init__(self, model: NemotronH, variables: dict, eos_id: int, pad_id: int, mesh: Mesh | None):
        key = (model.config, eos_id, mesh)
        if key not in _ENGINES:  # another run in this process (a test, a notebook) reuses the compiled programs
            _ENGINES.clear()
            _ENGINES[key] = Engine(model, variables, eos_ids=(eos_id,), mesh=mesh)
        self.engine = _ENGINES[key]
        self.pad_id = pad_id

    def sample(self, variables: dict, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
               seed: int, width: int) -> Rollouts:
        """Completions of `prompts` under `variables` (the student now), packed to sequences of `width`."""
        self.engine.variables = variables
        requests = [Request(index=i, prompt_ids=tuple(int(t) for t in p), max_new_tokens=max_new_tokens,
                            temperature=float(temperature), top_k=0, top_p=1.0, min_p=0.0, seed=seed, stop=(),
                            ignore_eos=False, thinking_budget=None) for i, p in enumerate(prompts)]
        done = self.engine.generate(requests)
        completions = [list(c.output_ids) for c in done]
        return pack(prompts, completions, width, self.pad_id, [c.finish_reason for c in done])


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], width: int, pad_id: int,
         finish_reasons: Sequence[str]) -> Rollouts:
    """Sequences of `width` tokens (prompt, completion, padding) and the mask of the completion's targets."""
    n = len(prompts)
    seq = np.full((n, width), pad_id, np.int32)
    generated = np.zeros((n, width), np.float32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if len(p) + len(c) > width:
            raise ValueError(f"rollout {i}: {len(p)} prompt + {len(c)} generated tokens exceed width {width}")
        seq[i, :len(p)] = p
        seq[i, len(p):len(p) + len(c)] = c
        generated[i, len(p):len(p) + len(c)] = 1.0
    return Rollouts(seq[:, :-1], seq[:, 1:], generated[:, 1:], [list(c) for c in completions], list(finish_reasons))
