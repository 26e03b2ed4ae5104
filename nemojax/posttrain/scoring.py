"""Scoring rollouts: teachers' logits per domain (MOPD), or rewards, advantages and reference log-probs (GRPO).

Rows come grouped by source (domain or environment), each source the same number of rows every step,
so every teacher runs on fixed-shape slices of the batch. Rewards are plug-ins (`nemojax.train.rewards`)
scored in a thread pool (unit tests run in subprocesses); one that raises, times out or returns a
non-finite value scores 0 and is counted in `reward_errors`, and the run goes on.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from nemojax.model import NemotronH
from nemojax.posttrain.objectives import forward_logits, forward_logprobs
from nemojax.posttrain.rollouts import Rollouts
from nemojax.train.policy_losses import group_advantages
from nemojax.train.rewards import RewardResult, normalize_per_environment, score


class Teacher(NamedTuple):
    model: NemotronH
    variables: dict


class MopdScorer:
    """Teacher logits of each domain's rows, in row order."""

    def __init__(self, teachers: Sequence[Teacher]):
        self.teachers = list(teachers)

    def teacher_logits(self, inputs_nt: jax.Array, rows_per_domain: int) -> jax.Array:
        parts = []
        for d, teacher in enumerate(self.teachers):
            rows = inputs_nt[d * rows_per_domain:(d + 1) * rows_per_domain]
            parts.append(forward_logits(teacher.model.config)(teacher.variables, rows))
        return jax.numpy.concatenate(parts, axis=0)


class GrpoScores(NamedTuple):
    rewards: np.ndarray        # [n] raw rewards
    advantages: np.ndarray     # [n] per-environment normalised, then group-relative
    errors: list[str | None]   # why a reward is 0 (a failing plug-in), per row


class GrpoScorer:
    """Rewards of completions, normalised per environment, turned into group-relative advantages; and the
    reference model's log-probs of the sampled tokens."""

    def __init__(self, reference: Teacher, workers: int):
        self.reference = reference
        self._ref_logprobs = forward_logprobs(reference.model.config)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)

    def rewards(self, texts: Sequence[str], records: Sequence[dict[str, Any]], reward_names: Sequence[str]
                ) -> list[RewardResult]:
        jobs = [self.pool.submit(score, name, text, record)
                for text, record, name in zip(texts, records, reward_names, strict=True)]
        return [job.result() for job in jobs]

    def advantages(self, results: Sequence[RewardResult], environments: Sequence[str], group_size: int,
                   scale: bool) -> GrpoScores:
        rewards = np.asarray([r.value for r in results], np.float32)
        normalised = normalize_per_environment(rewards, environments)
        advantages = np.asarray(group_advantages(normalised, group_size, scale=scale))
        return GrpoScores(rewards, advantages, [r.error for r in results])

    def reference_logprobs(self, rollouts_inputs: jax.Array, rollouts_targets: jax.Array) -> jax.Array:
        return self._ref_logprobs(self.reference.variables, rollouts_inputs, rollouts_targets)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def completion_texts(rollouts: Rollouts, tokenizer: Any, eos_id: int) -> list[str]:
    """Each completion as text, without its end-of-sequence id."""
    return [tokenizer.decode([t for t in ids if t != eos_id], skip_special_tokens=False)
            for ids in rollouts.completions]
