"""The machinery of the bad-input probes: a registry, running a CLI in this process or in a memory-limited
subprocess, and judging what happened (see bad_inputs.py for the outcome classes)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import traceback
import warnings
from collections.abc import Callable

from fixtures import REPO, Fixtures

REFUSED, SERVED, TRACEBACK, OOM = "refused cleanly", "served", "traceback", "OOM"
WRONG, VALID_REFUSED, LOST, UNNAMED, TIMEOUT = ("silently wrong", "valid refused", "lost work",
                                                "refused, input not named", "timeout")
MEMORY_LIMIT = 6 << 30
GOOD = [b'{"prompt": "hello world"}', b'{"input_ids": [20, 21, 22], "max_new_tokens": 2}']


@dataclasses.dataclass
class Result:
    status: int | str  # exit status, or "exception"
    err: str
    out: str = ""
    exception: BaseException | None = None
    generate_calls: int = 0


@dataclasses.dataclass
class Probe:
    group: str
    name: str
    run: Callable[[Fixtures], tuple[str, str]]  # -> (outcome, detail)


PROBES: list[Probe] = []


def probe(group: str, name: str):
    def register(fn):
        PROBES.append(Probe(group, name, fn))
        return fn
    return register


_GENERATE_CALLS = [0]


def count_generate_calls() -> None:
    from nemojax.generate import engine

    original = engine.Engine.generate

    def counted(self, *args, **kwargs):
        _GENERATE_CALLS[0] += 1
        return original(self, *args, **kwargs)

    engine.Engine.generate = counted


def in_process(main: Callable[[list[str]], int], argv: list[str]) -> Result:
    """Run a CLI's main(argv) here, capturing stderr and any escaping exception."""
    err, out = io.StringIO(), io.StringIO()
    _GENERATE_CALLS[0] = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("always")
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001 - a probe records whatever escapes
            return Result("exception", err.getvalue() + traceback.format_exc(), out.getvalue(), e,
                          _GENERATE_CALLS[0])
    return Result(status, err.getvalue(), out.getvalue(), None, _GENERATE_CALLS[0])


def subprocess_run(args: list[str], timeout: float = 300, env: dict | None = None) -> Result:
    """Run a command under the memory limit; a kill or MemoryError is OOM."""
    environ = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
    try:
        done = subprocess.run(["prlimit", f"--as={MEMORY_LIMIT}", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO,
                              env=environ)
    except subprocess.TimeoutExpired:
        return Result("timeout", "")
    oom = any(s in done.stderr for s in ("MemoryError", "bad_alloc", "RESOURCE_EXHAUSTED", "Out of memory",
                                          "Cannot allocate memory", "out of memory"))
    if done.returncode < 0 or oom:
        return Result("oom", done.stderr, done.stdout)
    return Result(done.returncode, done.stderr, done.stdout)


def judge_refusal(r: Result, *named: str, work_started_is_lost: bool = False) -> tuple[str, str]:
    tail = r.err.strip().splitlines()[-1][:200] if r.err.strip() else ""
    if r.status == "oom":
        return OOM, tail
    if r.status == "timeout":
        return TIMEOUT, ""
    if r.status == "exception":
        if isinstance(r.exception, MemoryError):
            return OOM, tail
        return (LOST if work_started_is_lost and r.generate_calls else TRACEBACK), tail
    if r.status == 0:
        return WRONG, "exit 0"
    if "Traceback" in r.err:
        return TRACEBACK, tail
    if r.status != 2:
        return f"exit {r.status}", tail
    if work_started_is_lost and r.generate_calls:
        return LOST, tail
    missing = [n for n in named if n.lower() not in r.err.lower()]
    return (UNNAMED, f"missing {missing}: {tail}") if missing else (REFUSED, tail)


def judge_valid(r: Result, check: Callable[[], str | None] = lambda: None) -> tuple[str, str]:
    tail = r.err.strip().splitlines()[-1][:200] if r.err.strip() else ""
    if r.status in ("oom", "timeout"):
        return (OOM if r.status == "oom" else TIMEOUT), tail
    if r.status == "exception" or "Traceback" in r.err:
        return (OOM if isinstance(r.exception, MemoryError) else TRACEBACK), tail
    if r.status != 0:
        return VALID_REFUSED, tail
    problem = check()
    return (WRONG, problem) if problem else (SERVED, tail)


def read_records(path: str) -> list[dict] | None:
    """The complete records of a JSONL file (a line cut short by a failed write is left out)."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        content = f.read()
    return [json.loads(line) for line in content[:content.rfind(b"\n") + 1].split(b"\n") if line]


def served(record: dict) -> bool:
    return "output_ids" in record and "error" not in record


def truncate_safetensors(path: str) -> None:
    f = os.path.join(path, "model.safetensors")
    os.truncate(f, os.path.getsize(f) // 2)


def j(**record) -> bytes:
    return json.dumps(record).encode()


def write(path: str, content: bytes) -> str:
    with open(path, "wb") as f:
        f.write(content)
    return path
