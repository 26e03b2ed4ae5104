"""Verifiable rewards for RL post-training: plug-in reward functions that never crash the run.

A reward function takes (completion text, example record) and returns a float. Built-ins, by name:
- "exact_match": 1.0 when the completion's final answer (the text after the last `</think>`, stripped
  and with whitespace runs collapsed) equals `example["answer"]`;
- "format": 1.0 when the completion matches the regular expression `example["pattern"]` (fullmatch);
- "balanced_brackets": 1.0 when `example["prompt"]` followed by the completion's final answer is a
  balanced string of round brackets (nothing else);
- "unit_tests": 1.0 when `example["tests"]` (Python source run after the completion's code) exits 0 in
  a separate interpreter (`python -I`, empty environment, a fresh temporary working directory, its own
  session) under a wall-clock timeout and CPU, memory, file-size and process-count limits.
The unit-test runner is a subprocess with resource limits, not a security boundary: it does not block
the network or reads of the file system. Run untrusted code only inside a container as well.

`score` runs any registered function and turns an exception or a non-finite value into reward 0.0
with the error kept for the metrics; `register` adds a function (several environments can be mixed
in one run, each naming its reward). `normalize_per_environment` rescales rewards within each
environment so that environments with different reward scales weigh alike.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from nemojax.chat import THINK_END
from nemojax.errors import ConfigError

RewardFn = Callable[[str, Mapping[str, Any]], float]


class RewardResult(NamedTuple):
    value: float
    error: str | None  # why the reward is 0.0 when the function failed (None: it ran)


def final_answer(completion: str) -> str:
    """The text after the last `</think>`, stripped, whitespace runs collapsed to one space."""
    return " ".join(completion.rsplit(THINK_END, 1)[-1].split())


def exact_match(completion: str, example: Mapping[str, Any]) -> float:
    return float(final_answer(completion) == " ".join(str(example["answer"]).split()))


def format_match(completion: str, example: Mapping[str, Any]) -> float:
    return float(re.fullmatch(example["pattern"], completion, flags=re.DOTALL) is not None)


def balanced_brackets(completion: str, example: Mapping[str, Any]) -> float:
    text = example["prompt"] + final_answer(completion)
    depth = 0
    for char in text:
        if char not in "()":
            return 0.0
        depth += 1 if char == "(" else -1
        if depth < 0:
            return 0.0
    return float(depth == 0)


class SandboxLimits(NamedTuple):
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 512 * 2**20
    file_bytes: int = 16 * 2**20
    processes: int = 64


_BOOTSTRAP = """import resource, runpy
for kind, value in {limits!r}:
    resource.setrlimit(getattr(resource, kind), (value, value))
runpy.run_path("solution.py", run_name="__main__")
"""


DEFAULT_LIMITS = SandboxLimits()


def run_python(source: str, limits: SandboxLimits = DEFAULT_LIMITS) -> tuple[int | None, str]:
    """Run `source` in a separate, limited interpreter (its own session: a timeout kills everything it
    started). Returns (exit code, or None on timeout; the end of its stderr)."""
    rlimits = [("RLIMIT_CPU", limits.cpu_s), ("RLIMIT_AS", limits.memory_bytes),
               ("RLIMIT_FSIZE", limits.file_bytes), ("RLIMIT_NPROC", limits.processes)]
    with tempfile.TemporaryDirectory(prefix="nemojax-reward-") as workdir:
        with open(os.path.join(workdir, "solution.py"), "w") as f:
            f.write(source)
        process = subprocess.Popen([sys.executable, "-I", "-c", _BOOTSTRAP.format(limits=rlimits)], cwd=workdir,
                                   env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return None, f"timed out after {limits.timeout_s} s"
    return process.returncode, stderr.decode(errors="replace")[-2000:]


def unit_tests(completion: str, example: Mapping[str, Any]) -> float:
    """1.0 when the completion's code followed by `example["tests"]` exits 0 (`example["timeout_s"]`, if
    given, replaces the default wall-clock limit); TimeoutError when it runs past the limit."""
    limits = DEFAULT_LIMITS._replace(timeout_s=float(example.get("timeout_s", DEFAULT_LIMITS.timeout_s)))
    code, message = run_python(final_answer_code(completion) + "\n\n" + example["tests"], limits)
    if code is None:
        raise TimeoutError(message)  # `score` turns it into reward 0 with the reason kept
    return float(code == 0)


def final_answer_code(completion: str) -> str:
    """The code of a completion: its last ```python fenced block after `</think>`, else the whole answer."""
    answer = completion.rsplit(THINK_END, 1)[-1]
    blocks = re.findall(r"```(?:python)?\n(.*?)```", answer, flags=re.DOTALL)
    return blocks[-1] if blocks else answer


REWARDS: dict[str, RewardFn] = {"exact_match": exact_match, "format": format_match, "unit_tests": unit_tests,
                                "balanced_brackets": balanced_brackets}


def register(name: str, fn: RewardFn) -> None:
    """Add a reward function under `name` (an environment names its reward in its records)."""
    if name in REWARDS:
        raise ConfigError(f"reward {name!r} is already registered")
    REWARDS[name] = fn


def score(name: str, completion: str, example: Mapping[str, Any]) -> RewardResult:
    """The reward of one completion; never raises for a failing reward function (0.0 and the error)."""
    if name not in REWARDS:
        raise ConfigError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
    try:
        value = float(REWARDS[name](completion, example))
    except Exception as error:  # a reward plug-in is user code: its failure scores 0, the run goes on
        return RewardResult(0.0, f"{name}: {type(error).__name__}: {error}")
    if not math.isfinite(value):
        return RewardResult(0.0, f"{name}: non-finite reward {value}")
    return RewardResult(value, None)


def normalize_per_environment(rewards: Sequence[float], environments: Sequence[str], eps: float = 1e-6) -> np.ndarray:
    """Rewards standardised within each environment of the batch (mean 0, std 1; all-equal rewards give 0)."""
    r = np.asarray(rewards, np.float64)
    envs = np.asarray(environments)
    if r.shape != envs.shape:
        raise ConfigError(f"{r.shape[0]} rewards but {envs.shape[0]} environment names")
    out = np.zeros_like(r)
    for env in np.unique(envs):
        rows = envs == env
        out[rows] = (r[rows] - r[rows].mean()) / (r[rows].std() + eps)
    return out.astype(np.float32)
