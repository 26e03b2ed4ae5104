"""Prompts of on-policy steps, drawn deterministically from (seed, step, source) so a resumed run
samples exactly what the uninterrupted run would have.

- MOPD domains: a prompt is a window of `prompt_tokens` tokens of the domain's training text (files
  read like training data: text or jsonl; the held-out split of each domain is never prompted).
- GRPO environments: a prompt is a task record, `{"prompt": text, ...fields its reward reads}`, made
  by a generator (`TASKS`): `arithmetic` ("3+4=", answer "7"), `brackets` (an unclosed bracket prefix
  to complete), or `jsonl` (records of a file, each with a `prompt` field).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from nemojax.errors import DataError
from nemojax.train import corpus
from nemojax.train.data import tokenize_documents

Record = dict[str, Any]
HELDOUT_FRACTION = 0.05
MAX_DOMAIN_BYTES = 50_000_000


def step_rng(seed: int, step: int, source: int) -> np.random.Generator:
    """The random stream of one source's prompts at one step (steps count from 1; 0 is set-up)."""
    return np.random.default_rng([int(seed), int(step), int(source)])


def domain_split(paths: tuple[str, ...]) -> tuple[list[corpus.Document], list[corpus.Document]]:
    """(train, held-out) documents of a domain's files, split by key hash as training data is."""
    documents = corpus.load_documents("files", paths, "auto", MAX_DOMAIN_BYTES)
    return corpus.split_documents(documents, HELDOUT_FRACTION)


class DomainPrompts:
    """Windows of one domain's training text as prompt token ids."""

    def __init__(self, paths: tuple[str, ...], tokenizer: Tokenizer, prompt_tokens: int):
        train, _ = domain_split(tuple(paths))
        self.tokens = tokenize_documents(train, tokenizer)[0]
        self.prompt_tokens = prompt_tokens
        if len(self.tokens) <= prompt_tokens:
            raise DataError(f"{', '.join(paths)}: {len(self.tokens)} tokens of training text, fewer than one "
                            f"prompt of {prompt_tokens}")

    def sample(self, rng: np.random.Generator, n: int) -> list[list[int]]:
        starts = rng.integers(0, len(self.tokens) - self.prompt_tokens, size=n)
        return [self.tokens[s:s + self.prompt_tokens].tolist() for s in starts]


def arithmetic(rng: np.random.Generator, settings: Mapping[str, Any]) -> Record:
    """"a+b=" with operands in [0, max_operand]; the answer is the sum."""
    high = int(settings.get("max_operand", 9))
    a, b = (int(x) for x in rng.integers(0, high + 1, size=2))
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def brackets(rng: np.random.Generator, settings: Mapping[str, Any]) -> Record:
    """A prefix of a bracket string that never closes more than it opened, with at least one bracket open."""
    length = int(settings.get("length", 4))
    depth, text = 0, []
    for i in range(length):
        open_one = depth == 0 or (rng.random() < 0.6 and i < length - 1)
        depth += 1 if open_one else -1
        text.append("(" if open_one else ")")
    if depth == 0:
        text.append("(")
    return {"prompt": "".join(text)}


class JsonlTask:
    """Records of a jsonl file (each a JSON object with a string `prompt`), drawn uniformly."""

    def __init__(self, path: str):
        self.records: list[Record] = []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not JSON ({e.msg})") from e
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise DataError(f"{path}:{number}: expected an object with a string `prompt`")
                self.records.append(record)
        if not self.records:
            raise DataError(f"{path}: no records")

    def __call__(self, rng: np.random.Generator, settings: Mapping[str, Any]) -> Record:
        return dict(self.records[int(rng.integers(len(self.records)))])


TaskFn = Callable[[np.random.Generator, Mapping[str, Any]], Record]
TASKS: dict[str, TaskFn | None] = {"arithmetic": arithmetic, "brackets": brackets, "jsonl": None}


def task_fn(settings: Mapping[str, Any]) -> TaskFn:
    """The generator of an environment block ({task, reward, ...})."""
    if settings["task"] == "jsonl":
        return JsonlTask(settings["path"])
    return TASKS[settings["task"]]
