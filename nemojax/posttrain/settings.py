"""The `posttrain` block of a run config: which method, how many rollouts, and its domains or environments.

A config file that sets `posttrain` makes `train.py` run the on-policy loop instead of pretraining.
Every field is checked here, before any model is loaded, so bad input exits 2 with the field's name.
"""

from __future__ import annotations

import math
import os

import ml_collections

from nemojax.errors import ConfigError
from nemojax.posttrain.prompts import TASKS
from nemojax.train.rewards import REWARDS

METHODS = ("mopd", "grpo")


def default_posttrain_config() -> ml_collections.ConfigDict:
    """Every field of the block with its default; `domains` (MOPD) or `environments` (GRPO) come from the file."""
    return ml_collections.ConfigDict(dict(
        method="mopd",
        prompts_per_source=2,     # prompts per domain (MOPD) or environment (GRPO) each step
        group_size=1,             # rollouts per prompt (GRPO: the group of the advantages)
        prompt_tokens=16,         # MOPD: prompt length, a window of the domain's text
        max_new_tokens=16,
        temperature=1.0,
        clip_eps=0.2,             # GRPO: policy-ratio clip
        kl_coef=0.05,             # GRPO: weight of the k3 KL to the reference model
        scale_advantages=True,    # GRPO: divide by the group's reward std
        reward_workers=4,         # threads scoring rewards (unit tests run in subprocesses)
        domains=ml_collections.ConfigDict(),       # name -> {teacher: checkpoint, paths: (text/jsonl files,)}
        environments=ml_collections.ConfigDict(),  # name -> {task: str, reward: str, ...task settings}
    ))


def merged_posttrain_config(block: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The defaults with the file's `posttrain` block on top (domains and environments replaced whole)."""
    merged = default_posttrain_config()
    for key, value in block.items():
        if key not in merged:
            raise ConfigError(f"config field `posttrain.{key}`: unknown (known: {sorted(merged.keys())})")
        merged[key] = value
    return merged


def check_posttrain_config(post: ml_collections.ConfigDict) -> None:
    """ConfigError naming the first bad field of the `posttrain` block."""
    if post.method not in METHODS:
        raise ConfigError(f"config field `posttrain.method`: expected one of {METHODS}, got {post.method!r}")
    for name in ("prompts_per_source", "group_size", "prompt_tokens", "max_new_tokens", "reward_workers"):
        value = post[name]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 2**20:
            raise ConfigError(f"config field `posttrain.{name}`: must be an integer in [1, 2**20], got {value!r}")
    for name, low, high in (("temperature", 0.0, 100.0), ("clip_eps", 0.0, 1.0), ("kl_coef", 0.0, math.inf)):
        value = post[name]
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
            raise ConfigError(f"config field `posttrain.{name}`: must be a finite number in [{low}, {high}], "
                              f"got {value!r}")
    if post.temperature == 0 and post.method == "grpo" and post.group_size > 1:
        raise ConfigError("config field `posttrain.temperature`: 0 (greedy) gives every rollout of a group the "
                          "same tokens, so GRPO advantages are all zero; use a temperature > 0")
    if post.method == "mopd":
        _check_domains(post.domains)
    else:
        _check_environments(post.environments)


def _check_domains(domains: ml_collections.ConfigDict) -> None:
    if not domains:
        raise ConfigError("config field `posttrain.domains`: MOPD needs at least one domain "
                          "({name: {teacher: checkpoint, paths: (files,)}})")
    for name, domain in domains.items():
        where = f"posttrain.domains.{name}"
        if not isinstance(domain, (ml_collections.ConfigDict, dict)):
            raise ConfigError(f"config field `{where}`: expected a block {{teacher, paths}}, got {domain!r}")
        teacher = domain.get("teacher", "")
        if not teacher or not os.path.isfile(os.path.join(teacher, "config.json")):
            raise ConfigError(f"config field `{where}.teacher`: {teacher!r} is not a checkpoint directory "
                              "(a nemojax model directory or a training workdir with config.json)")
        paths = domain.get("paths", ())
        if isinstance(paths, str) or not paths:
            raise ConfigError(f"config field `{where}.paths`: expected a non-empty tuple of text or jsonl files")


def _check_environments(environments: ml_collections.ConfigDict) -> None:
    if not environments:
        raise ConfigError("config field `posttrain.environments`: GRPO needs at least one environment "
                          "({name: {task, reward}})")
    for name, env in environments.items():
        where = f"posttrain.environments.{name}"
        if not isinstance(env, (ml_collections.ConfigDict, dict)):
            raise ConfigError(f"config field `{where}`: expected a block {{task, reward}}, got {env!r}")
        if env.get("task") not in TASKS:
            raise ConfigError(f"config field `{where}.task`: expected one of {sorted(TASKS)}, got {env.get('task')!r}")
        if env.get("reward") not in REWARDS:
            raise ConfigError(f"config field `{where}.reward`: expected a registered reward {sorted(REWARDS)}, "
                              f"got {env.get('reward')!r}")
        if env.get("task") == "jsonl" and not os.path.isfile(env.get("path", "")):
            raise ConfigError(f"config field `{where}.path`: {env.get('path', '')!r} is not a file")
