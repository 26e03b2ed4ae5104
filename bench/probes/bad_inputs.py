"""Bad inputs, tried as a new user would, against every CLI and the public loading API; counts per outcome.

    PYTHONPATH=. python bench/probes/bad_inputs.py [--label after] [--only serve,line,train,plan,load]

Each probe states what should happen: a bad input is refused (exit status 2, a message naming the
input, no traceback, before any work is lost), a valid input is served, and work already done is kept.
The outcome is classed as one of: refused cleanly, served (valid input handled), traceback, OOM,
silently wrong, valid refused, lost work, refused without naming the input, timeout. serve.py,
train.py and load_pretrained run in this process (their `main(argv)`); the planner, and probes that
could exhaust memory, run in subprocesses under a 6 GB address-space limit. Writes
bench/results/bad_inputs_<label>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "nemojax-probe-xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

import fixtures  # noqa: E402
from fixtures import CONTEXT, REPO, SMALL_TRAIN, TINY_CONFIG, Fixtures  # noqa: E402

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


def _count_generate() -> None:
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
    def limit():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    environ = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, preexec_fn=limit, cwd=REPO,
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


# ----------------------------------------------------------------------------------------------- serve.py
def serve_main(argv: list[str]) -> Result:
    from nemojax.cli.serve import main
    return in_process(main, argv + ["--no-progress"])


def serve_args(fx: Fixtures, prompts: str, output: str, *extra: str, checkpoint: str | None = None) -> list[str]:
    return ["--checkpoint", checkpoint or fx.model, "--prompts", prompts, "--output", output,
            "--max-new-tokens", "3", "--batch-size", "2", *extra]


def prompts_file(fx: Fixtures, name: str, content: bytes) -> tuple[str, str]:
    d = fx.scratch(name)
    path = os.path.join(d, "in.jsonl")
    with open(path, "wb") as f:
        f.write(content)
    return path, os.path.join(d, "out.jsonl")


def read_records(path: str) -> list[dict] | None:
    """The complete records of a JSONL file (a line cut short by a failed write is left out)."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        content = f.read()
    return [json.loads(line) for line in content[:content.rfind(b"\n") + 1].split(b"\n") if line]


def _served(record: dict) -> bool:
    return "output_ids" in record and "error" not in record


def serve_flag_probe(name: str, extra: list[str], named: list[str], checkpoint: str | None = None,
                     lines: bytes = b"\n".join(GOOD) + b"\n", output: str | None = None,
                     isolated: bool = False) -> None:
    """`isolated`: run in a memory-limited subprocess (the input could exhaust memory)."""
    @probe("serve", name)
    def run(fx: Fixtures) -> tuple[str, str]:
        prompts, out = prompts_file(fx, name, lines)
        args = serve_args(fx, prompts, output(fx, prompts, out) if callable(output) else out, *extra,
                          checkpoint=checkpoint(fx) if callable(checkpoint) else checkpoint)
        if isolated:
            code = f"import sys; from nemojax.cli.serve import main; sys.exit(main({args + ['--no-progress']!r}))"
            return judge_refusal(subprocess_run([sys.executable, "-c", code]), *named)
        return judge_refusal(serve_main(args), *named, work_started_is_lost=True)


def serve_valid_probe(name: str, extra: list[str], checkpoint=None, expect_warning: str | None = None,
                      lines: bytes = b"\n".join(GOOD) + b"\n") -> None:
    @probe("serve", name)
    def run(fx: Fixtures) -> tuple[str, str]:
        prompts, out = prompts_file(fx, name, lines)
        r = serve_main(serve_args(fx, prompts, out, *extra,
                                  checkpoint=checkpoint(fx) if callable(checkpoint) else checkpoint))

        def check():
            records = read_records(out)
            if not records or len(records) != 2 or not all(_served(x) for x in records):
                return f"records {records}"
            if expect_warning and expect_warning not in r.err:
                return f"no warning naming {expect_warning!r}"
            return None
        return judge_valid(r, check)


@probe("serve", "prompts file missing")
def _prompts_missing(fx):
    out = os.path.join(fx.scratch("nopath"), "out.jsonl")
    return judge_refusal(serve_main(serve_args(fx, "/nonexistent.jsonl", out)), "/nonexistent.jsonl")


@probe("serve", "prompts is a directory")
def _prompts_dir(fx):
    d = fx.scratch("promptsdir")
    return judge_refusal(serve_main(serve_args(fx, d, os.path.join(os.path.dirname(d), "out.jsonl"))), d)


serve_flag_probe("output in a missing directory", [], ["missing-dir"],
                 output=lambda fx, p, o: os.path.join(os.path.dirname(o), "missing-dir", "out.jsonl"))
serve_flag_probe("output under a file", [], ["in.jsonl/out.jsonl"],
                 output=lambda fx, p, o: os.path.join(p, "out.jsonl"))
serve_flag_probe("output is a directory", [], ["--output"], output=lambda fx, p, o: os.path.dirname(o))
serve_flag_probe("output is the prompts file", [], ["--output"], output=lambda fx, p, o: p)
serve_flag_probe("stats in a missing directory", ["--stats", "/nonexistent-dir/stats.json"], ["/nonexistent-dir"])
serve_flag_probe("checkpoint missing", [], ["/nonexistent-ckpt"], checkpoint="/nonexistent-ckpt")
serve_flag_probe("checkpoint is a file", [], ["tokenizer.json"], checkpoint=lambda fx: fx.tokenizer)
serve_flag_probe("batch size 0", ["--batch-size", "0"], ["--batch-size"])
serve_flag_probe("max new tokens -1", ["--max-new-tokens", "-1"], ["--max-new-tokens"])
serve_flag_probe("temperature nan", ["--temperature", "nan"], ["temperature"])
serve_flag_probe("temperature -1", ["--temperature", "-1"], ["temperature"])
serve_flag_probe("top-k beyond int32", ["--top-k", "10000000000000"], ["top"])
serve_flag_probe("top-p 0", ["--top-p", "0"], ["top"])
serve_flag_probe("top-p nan", ["--top-p", "nan"], ["top"])
serve_flag_probe("min-p 2", ["--min-p", "2"], ["min"])
serve_flag_probe("empty stop string", ["--stop", ""], ["stop"])
serve_flag_probe("stop string without a tokenizer", ["--stop", "x"], ["stop", "tokenizer"],
                 checkpoint=lambda fx: fx.model_no_tokenizer)
serve_flag_probe("thinking budget -5", ["--thinking-budget", "-5"], ["thinking"])
serve_flag_probe("thinking budget beyond int32", ["--thinking-budget", "10000000000000"], ["thinking"])
serve_flag_probe("a million draft tokens", ["--speculative", "mtp", "--num-draft-tokens", "1000000"],
                 ["--num-draft-tokens"], isolated=True)
serve_flag_probe("dtype int8", ["--dtype", "int8"], ["int8"])
serve_flag_probe("dtype nonsense", ["--dtype", "float99"], ["float99"])
serve_flag_probe("mesh of a million devices", ["--mesh", "tensor=1000000"], ["mesh"])
serve_flag_probe("mesh not dividing the devices", ["--mesh", "tensor=3"], ["mesh"])
serve_flag_probe("prefill chunk 0", ["--prefill-chunk", "0"], ["--prefill-chunk"])
serve_flag_probe("speculation without an MTP block", ["--speculative", "mtp"], ["MTP"],
                 checkpoint=lambda fx: fx.hf)
serve_flag_probe("mesh axis typo", ["--mesh", "tensr=2"], ["tensr"])
serve_valid_probe("seed beyond 64 bits", ["--seed", str(10**30)])
serve_valid_probe("Hugging Face checkpoint (no tokenizer: token ids)", [], checkpoint=lambda fx: fx.hf,
                  lines=GOOD[1] + b"\n" + GOOD[1] + b"\n")
serve_valid_probe("training workdir", [], checkpoint=lambda fx: fx.workdir)


def _corrupt_newest(fx: Fixtures) -> str:
    path = fx.workdir_copy("corrupt-newest")
    fixtures.corrupt_step(path, 3)
    return path


serve_valid_probe("workdir whose newest checkpoint is corrupt", [], checkpoint=_corrupt_newest,
                  expect_warning="3")


@probe("serve", "every checkpoint of a workdir corrupt")
def _all_corrupt(fx):
    path = fx.workdir_copy("all-corrupt")
    for step in (1, 2, 3):
        fixtures.corrupt_step(path, step)
    prompts, out = prompts_file(fx, "allcorrupt", GOOD[0] + b"\n")
    return judge_refusal(serve_main(serve_args(fx, prompts, out, checkpoint=path)), "workdir")


@probe("serve", "prompts from a pipe")
def _pipe(fx):
    import threading

    d = fx.scratch("pipe")
    fifo = os.path.join(d, "in.fifo")
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "wb") as f:
            f.write(b"\n".join(GOOD) + b"\n")

    threading.Thread(target=feed, daemon=True).start()
    out = os.path.join(d, "out.jsonl")
    r = serve_main(serve_args(fx, fifo, out))
    return judge_valid(r, lambda: None if len(read_records(out) or []) == 2 and all(
        _served(x) for x in read_records(out)) else f"records {read_records(out)}")


serve_flag_probe("empty output path", [], ["--output"], output=lambda fx, p, o: "")


@probe("serve", "chat template that does not parse")
def _bad_template(fx):
    import shutil

    path = os.path.join(fx.scratch("template"), "model")
    shutil.copytree(fx.model, path)
    write(os.path.join(path, "tokenizer_config.json"), json.dumps({"chat_template": "{% for m in %}"}).encode())
    prompts, out = prompts_file(fx, "template", GOOD[0] + b"\n")
    return judge_refusal(serve_main(serve_args(fx, prompts, out, checkpoint=path)), "tokenizer_config.json")


def _hf_variant(name: str, edit: Callable[[str], None], named: Callable[[str], list[str]]) -> None:
    @probe("serve", f"HF checkpoint: {name}")
    def run(fx):
        path = fx.hf_copy(name.replace(" ", "-"))
        edit(path)
        prompts, out = prompts_file(fx, "hf", GOOD[0] + b"\n")
        return judge_refusal(serve_main(serve_args(fx, prompts, out, checkpoint=path)), *named(path))


def _truncate(path: str) -> None:
    f = os.path.join(path, "model.safetensors")
    os.truncate(f, os.path.getsize(f) // 2)


_hf_variant("truncated safetensors", _truncate, lambda p: ["model.safetensors"])
_hf_variant("config.json not JSON", lambda p: open(os.path.join(p, "config.json"), "w").write("{oops"),
            lambda p: ["config.json"])
_hf_variant("pattern is a number", lambda p: json.dump({**json.load(open(os.path.join(p, "config.json"))),
                                                        "hybrid_override_pattern": 5},
                                                       open(os.path.join(p, "config.json") + ".new", "w"))
            or os.replace(os.path.join(p, "config.json.new"), os.path.join(p, "config.json")),
            lambda p: ["hybrid_override_pattern"])


# ------------------------------------------------------------------------------------- serve.py, per line
def line_probe(name: str, line: bytes, expect: str, *named: str) -> None:
    """A prompts file [good, PROBE, good]: the probe line gets its own record (an error naming line 2 and
    `named`, or a completion), the good lines around it are served."""
    @probe("line", name)
    def run(fx: Fixtures) -> tuple[str, str]:
        prompts, out = prompts_file(fx, "line", GOOD[0] + b"\n" + line + b"\n" + GOOD[1] + b"\n")
        r = serve_main(serve_args(fx, prompts, out))
        if r.status == "exception" or "Traceback" in r.err:
            return (LOST if r.generate_calls else TRACEBACK), r.err.strip().splitlines()[-1][:200]
        if r.status != 0:
            return VALID_REFUSED, r.err.strip()[-200:]
        records = read_records(out) or []
        if len(records) != 3:
            return WRONG, f"{len(records)} output lines for 3 input lines"
        if not (_served(records[0]) and _served(records[2])):
            return VALID_REFUSED, "a good line around it was not served"
        mine = records[1]
        if expect == "valid":
            return (SERVED, "") if _served(mine) else (VALID_REFUSED, mine.get("error", "")[:200])
        if _served(mine):
            return WRONG, f"served: {json.dumps(mine)[:150]}"
        message = mine.get("error", "")
        missing = [n for n in ("line 2", *named) if n.lower() not in message.lower()]
        return (UNNAMED, f"missing {missing}: {message[:150]}") if missing else (REFUSED, message[:150])


def j(**record) -> bytes:
    return json.dumps(record).encode()


line_probe("not JSON", b"{not json", "refuse", "JSON")
line_probe("JSON array", b"[1, 2]", "refuse", "object")
line_probe("JSON string", b'"hello"', "refuse", "object")
line_probe("JSON null", b"null", "refuse", "object")
line_probe("blank line", b"", "refuse", "blank")
line_probe("whitespace-only line", b"   \t", "refuse", "blank")
line_probe("deeply nested JSON", b"[" * 100000 + b"]" * 100000, "refuse", "nested")
line_probe("non-UTF-8 byte", b'{"prompt": "caf\xe9"}', "refuse", "UTF-8")
line_probe("U+2028 inside a prompt", json.dumps({"prompt": "one\u2028two"}, ensure_ascii=False).encode(), "valid")
line_probe("U+0085 inside a prompt", json.dumps({"prompt": "one\u0085two"}, ensure_ascii=False).encode(), "valid")
line_probe("U+2029 and form feed inside a prompt", json.dumps({"prompt": "a\u2029b\x0cc"},
                                                               ensure_ascii=False).encode(), "valid")
line_probe("CRLF line ending", j(prompt="hello") + b"\r", "valid")
line_probe("top_k beyond int32", j(prompt="hi", top_k=10**13), "refuse", "top_k")
line_probe("thinking_budget beyond int32", j(prompt="hi", thinking_budget=10**13), "refuse", "thinking_budget")
line_probe("max_new_tokens beyond int32", j(prompt="hi", max_new_tokens=10**13), "valid")
line_probe("seed beyond 64 bits", j(prompt="hi", seed=10**30, temperature=0.5), "valid")
line_probe("negative seed", j(prompt="hi", seed=-1, temperature=0.5), "valid")
line_probe("temperature NaN", b'{"prompt": "hi", "temperature": NaN}', "refuse", "temperature")
line_probe("temperature Infinity", b'{"prompt": "hi", "temperature": Infinity}', "refuse", "temperature")
line_probe("temperature -Infinity", b'{"prompt": "hi", "temperature": -Infinity}', "refuse", "temperature")
line_probe("top_p NaN", b'{"prompt": "hi", "top_p": NaN}', "refuse", "top_p")
line_probe("min_p NaN", b'{"prompt": "hi", "min_p": NaN}', "refuse", "min_p")
line_probe("empty stop string", j(prompt="hi", stop=""), "refuse", "stop")
line_probe("empty stop list", j(prompt="hi", stop=[]), "valid")
line_probe("stop list with an empty string", j(prompt="hi", stop=["a", ""]), "refuse", "stop")
line_probe("stop is a number", j(prompt="hi", stop=5), "refuse", "stop")
line_probe("misspelt setting temprature", j(prompt="hi", temprature=0.5), "refuse", "temprature")
line_probe("unknown setting max_tokens", j(prompt="hi", max_tokens=5), "refuse", "max_tokens")
line_probe("prompt and input_ids", j(prompt="hi", input_ids=[5]), "refuse", "prompt")
line_probe("no prompt", j(text="hi"), "refuse", "prompt")
line_probe("prompt is a number", j(prompt=5), "refuse", "prompt")
line_probe("prompt is empty", j(prompt=""), "refuse", "empty")
line_probe("input_ids with a float", j(input_ids=[5, 6.5]), "refuse", "input_ids")
line_probe("input_ids with a bool", j(input_ids=[5, True]), "refuse", "input_ids")
line_probe("negative input id", j(input_ids=[5, -1]), "refuse", "-1")
line_probe("input id beyond 64 bits", j(input_ids=[5, 10**30]), "refuse", str(10**30))
line_probe("nested input_ids", j(input_ids=[[5, 6]]), "refuse", "input_ids")
line_probe("empty input_ids", j(input_ids=[]), "refuse", "empty")
line_probe("prompt longer than the context", j(input_ids=list(range(20, 20 + CONTEXT))), "refuse", str(CONTEXT))
line_probe("messages not a list", j(messages="hi"), "refuse", "messages")
line_probe("message with an unknown role", j(messages=[{"role": "robot", "content": "hi"}]), "refuse", "robot")
line_probe("message content a number", j(messages=[{"role": "user", "content": 5}]), "refuse", "content")
line_probe("message without content", j(messages=[{"role": "user"}]), "refuse", "content")
line_probe("lone surrogate in a prompt", b'{"prompt": "a\\ud800b"}', "refuse", "prompt")
line_probe("reasoning maybe", j(messages=[{"role": "user", "content": "hi"}], reasoning="maybe"), "refuse",
           "reasoning")
line_probe("ignore_eos a string", j(prompt="hi", ignore_eos="yes"), "refuse", "ignore_eos")
line_probe("max_new_tokens 0", j(prompt="hi", max_new_tokens=0), "refuse", "max_new_tokens")
line_probe("max_new_tokens 1.5", j(prompt="hi", max_new_tokens=1.5), "refuse", "max_new_tokens")
line_probe("top_k -1", j(prompt="hi", top_k=-1), "refuse", "top_k")
line_probe("thinking_budget -1", j(prompt="hi", thinking_budget=-1), "refuse", "thinking_budget")
line_probe("a megabyte prompt", j(prompt="x " * 500_000), "refuse", "context")
line_probe("top_k larger than the vocabulary", j(prompt="hi", top_k=100000, temperature=0.7), "valid")


@probe("serve", "a bad line at the end of a long file")
def _late_bad_line(fx):
    content = b"".join(GOOD[i % 2] + b"\n" for i in range(6)) + j(prompt="hi", top_k=10**13) + b"\n"
    prompts, out = prompts_file(fx, "late", content)
    r = serve_main(serve_args(fx, prompts, out))
    records = read_records(out) or []
    if r.status == 0 and len(records) == 7 and all(_served(x) for x in records[:6]) and "error" in records[6]:
        return SERVED, ""
    if not records or len(records) < 6:
        return LOST, f"{len(records)} records on disk after exit {r.status}"
    return WRONG, f"exit {r.status}, {len(records)} records"


@probe("serve", "output disk fills up mid-run")
def _disk_full(fx):
    """RLIMIT_FSIZE makes writes past 600 bytes fail (EFBIG), as a full disk would; the finished lines must
    stay on disk and --resume must finish the file."""
    content = b"".join(GOOD[i % 2] + b"\n" for i in range(12))
    prompts, out = prompts_file(fx, "diskfull", content)
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600)); from nemojax.cli.serve import main; "
            f"sys.exit(main({serve_args(fx, prompts, out, '--no-progress')!r}))")
    first = subprocess_run([sys.executable, "-c", code])
    kept = [p for p in (out, out + ".partial") if os.path.isfile(p)]
    lines = sum(len(read_records(p) or []) for p in kept)
    if first.status == 0:
        return WRONG, "exit 0 although the output could not be written"
    if lines == 0:
        return LOST, f"nothing kept (exit {first.status}): {first.err.strip()[-150:]}"
    second = serve_main(serve_args(fx, prompts, out, "--resume"))
    records = read_records(out) or []
    if second.status == 0 and len(records) == 12 and all(_served(x) for x in records):
        return SERVED, f"{lines} lines kept, resumed"
    return LOST, f"resume: exit {second.status}, {len(records)} records"


@probe("serve", "killed mid-run, then --resume")
def _killed(fx):
    content = b"".join(GOOD[i % 2] + b"\n" for i in range(16))
    prompts, out = prompts_file(fx, "killed", content)
    args = serve_args(fx, prompts, out, "--no-progress", "--batch-size", "1")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-c", f"from nemojax.cli.serve import main; main({args!r})"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    partial = out + ".partial"
    while proc.poll() is None and time.time() < deadline:
        if os.path.isfile(partial) and open(partial, "rb").read().count(b"\n") >= 3:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    kept = len(read_records(partial) or []) if os.path.isfile(partial) else 0
    if kept == 0:
        return LOST, "nothing on disk when killed"
    second = serve_main(serve_args(fx, prompts, out, "--resume"))
    records = read_records(out) or []
    if second.status == 0 and len(records) == 16 and all(_served(x) for x in records):
        return SERVED, f"{kept} lines kept, resumed"
    return LOST, f"resume: exit {second.status}, {len(records)} records"


# ------------------------------------------------------------------------------------------------ train.py
def train_main(argv: list[str]) -> Result:
    from nemojax.cli.train import main
    return in_process(main, argv)


def train_args(fx: Fixtures, workdir: str, *extra: str) -> list[str]:
    return ["--config", TINY_CONFIG, "--workdir", workdir, *SMALL_TRAIN,
            f"--config.data.tokenizer_path={fx.train_tokenizer}/tokenizer.json", *extra]


def train_refuse(name: str, extra: list[str] | Callable, named: list[str] | Callable, workdir=None) -> None:
    @probe("train", name)
    def run(fx):
        d = fx.scratch("train")
        args = extra(fx, d) if callable(extra) else extra
        w = workdir(fx, d) if callable(workdir) else os.path.join(d, "w")
        r = train_main(train_args(fx, w, *args))
        return judge_refusal(r, *(named(fx, d) if callable(named) else named))


def write(path: str, content: bytes) -> str:
    with open(path, "wb") as f:
        f.write(content)
    return path


def data_args(path: str) -> list[str]:
    return ["--config.data.source=files", f"--config.data.paths={path}"]


train_refuse("config file missing", ["--config", "/nonexistent.py"], ["/nonexistent.py"])
train_refuse("config file raises", lambda fx, d: ["--config", write(os.path.join(d, "c.py"), b"1/0\n")], ["c.py"])
train_refuse("config file without get_config", lambda fx, d: ["--config", write(os.path.join(d, "c.py"), b"x=1\n")],
             ["get_config"])
train_refuse("get_config returns None",
             lambda fx, d: ["--config", write(os.path.join(d, "c.py"), b"def get_config():\n    return None\n")],
             ["get_config"])
train_refuse("run field typo", ["--config.num_stepz=3"], ["num_stepz"])
train_refuse("model field typo", ["--config.model.hiden_size=64"], ["hiden_size"])
train_refuse("batch size 0", ["--config.batch_size=0"], ["batch_size"])
train_refuse("batch size not a number", ["--config.batch_size=abc"], ["batch_size"])
train_refuse("negative seq_len", ["--config.seq_len=-1"], ["seq_len"])
train_refuse("num_steps beyond int32", ["--config.num_steps=10000000000000"], ["num_steps"])
train_refuse("seed beyond 64 bits", [f"--config.seed={10**30}"], ["seed"])
train_refuse("learning rate nan", ["--config.optimizer.learning_rate=nan"], ["learning_rate"])
train_refuse("learning rate inf", ["--config.optimizer.learning_rate=inf"], ["learning_rate"])
train_refuse("unknown schedule", ["--config.optimizer.schedule=bogus"], ["schedule"])
train_refuse("data path missing", data_args("/nonexistent/corpus.jsonl"), ["/nonexistent/corpus.jsonl"])
train_refuse("data file not UTF-8", lambda fx, d: data_args(write(os.path.join(d, "c.txt"), b"caf\xe9\n")),
             ["c.txt"])
train_refuse("data jsonl line not JSON",
             lambda fx, d: data_args(write(os.path.join(d, "c.jsonl"), b'{"text": "a"}\n\n{oops\n')),
             ["c.jsonl:3"])
train_refuse("data jsonl line after a U+2028 line",
             lambda fx, d: data_args(write(os.path.join(d, "c.jsonl"), json.dumps(
                 {"text": "a\u2028b"}, ensure_ascii=False).encode() + b'\n{"text": 5}\n')), ["c.jsonl:2"])
train_refuse("data jsonl deeply nested line",
             lambda fx, d: data_args(write(os.path.join(d, "c.jsonl"), b'{"text": "a"}\n' + b"[" * 100000 + b"\n")),
             ["c.jsonl:2"])
train_refuse("chat data with an unknown role",
             lambda fx, d: data_args(write(os.path.join(d, "c.jsonl"),
                                           j(messages=[{"role": "robot", "content": "x"}]) + b"\n")), ["c.jsonl:1"])
train_refuse("heldout fraction 1.5", ["--config.data.heldout_fraction=1.5"], ["heldout_fraction"])
train_refuse("data format xml", ["--config.data.source=files", f"--config.data.paths={TINY_CONFIG}",
                                 "--config.data.format=xml"], ["format"])
train_refuse("tokenizer path missing", ["--config.data.tokenizer_path=/nonexistent/tok.json"],
             ["/nonexistent/tok.json"])
train_refuse("tokenizer file corrupt",
             lambda fx, d: [f"--config.data.tokenizer_path={write(os.path.join(d, 'tok.json'), b'{oops')}"],
             ["tok.json"])
train_refuse("workdir is a file", [], ["w"], workdir=lambda fx, d: write(os.path.join(d, "w"), b"x"))
train_refuse("workdir under a file", [], ["w/run"],
             workdir=lambda fx, d: os.path.join(write(os.path.join(d, "w"), b"x"), "run"))
train_refuse("init-from missing", ["--init-from", "/nonexistent/ckpt"], ["/nonexistent/ckpt"])
train_refuse("init-from directory without a checkpoint", lambda fx, d: ["--init-from", d], ["init-from"])
train_refuse("init-from truncated safetensors",
             lambda fx, d: ["--init-from", (lambda p: (_truncate(p), p)[1])(fx.hf_copy("initfrom"))],
             ["model.safetensors"])
train_refuse("stop-at 0", ["--stop-at", "0"], ["--stop-at"])
train_refuse("stop-at -3", ["--stop-at", "-3"], ["--stop-at"])
train_refuse("mesh not dividing the devices", ["--config.mesh.tensor=3"], ["mesh"])
train_refuse("mesh of 100 data shards", ["--config.mesh.data=100"], ["mesh"])
train_refuse("vocab beyond int32", ["--config.model.vocab_size=3000000000"], ["vocab_size"])
train_refuse("keep 0 checkpoints", ["--config.keep_checkpoints=0"], ["keep_checkpoints"])
train_refuse("batch not divisible by accumulation", ["--config.grad_accum_steps=3"], ["grad_accum_steps"])
train_refuse("remat bogus", ["--config.remat=bogus"], ["remat"])
train_refuse("compute dtype int8", ["--config.compute_dtype=int8"], ["compute_dtype"])
train_refuse("workdir holding another model", ["--config.model.hidden_size=48"], ["workdir"],
             workdir=lambda fx, d: fx.workdir_copy("othermodel"))
train_refuse("distributed flags incomplete", ["--num-processes", "2"], ["--coordinator-address"])


train_refuse("empty workdir path", [], ["--workdir"], workdir=lambda fx, d: "")
train_refuse("config whose model is a number",
             lambda fx, d: ["--config", write(os.path.join(d, "c.py"), b"import ml_collections\ndef get_config():\n"
                                              b"    return ml_collections.ConfigDict(dict(model=5))\n")],
             ["model"])


@probe("train", "init-from a workdir whose newest checkpoint is corrupt")
def _init_from_corrupt(fx):
    source = fx.workdir_copy("initcorrupt")
    fixtures.corrupt_step(source, 3)
    d = fx.scratch("initcorrupt-run")
    r = train_main(train_args(fx, os.path.join(d, "w"), "--init-from", source, "--config.num_steps=1"))
    return judge_valid(r, lambda: None if "checkpoints/3" in r.err else "the corrupt step is not named")


@probe("train", "hidden size of a million (would exhaust memory)")
def _train_huge(fx):
    d = fx.scratch("huge")
    args = train_args(fx, os.path.join(d, "w"), "--config.model.hidden_size=1000000")
    code = f"import sys; from nemojax.cli.train import main; sys.exit(main({args!r}))"
    return judge_refusal(subprocess_run([sys.executable, "-c", code], env={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}), "hidden_size")


@probe("train", "workdir whose newest checkpoint is corrupt")
def _train_corrupt(fx):
    path = fx.workdir_copy("train-corrupt")
    fixtures.corrupt_step(path, 3)
    r = train_main(train_args(fx, path, "--config.num_steps=4"))

    def check():
        from nemojax.checkpoint.orbax import latest_step
        if latest_step(os.path.join(path, "checkpoints")) != 4:
            return "did not reach step 4"
        return None if "3" in r.err else "the corrupt step is not named"
    return judge_valid(r, check)


@probe("train", "data jsonl with U+2028 and blank lines")
def _train_u2028(fx):
    d = fx.scratch("u2028")
    lines = [json.dumps({"text": f"doc {i} one\u2028two\u0085three"}, ensure_ascii=False) for i in range(6)]
    path = write(os.path.join(d, "c.jsonl"), ("\n\n".join(lines) + "\n").encode())
    r = train_main(train_args(fx, os.path.join(d, "w"), *data_args(path), "--config.num_steps=1"))
    return judge_valid(r)


@probe("train", "unknown field in an --init-from config.json (published extras)")
def _train_extra_field(fx):
    path = fx.hf_copy("extra")
    cfg = json.load(open(os.path.join(path, "config.json")))
    json.dump({**cfg, "rope_scaling_typo": 1}, open(os.path.join(path, "config.json"), "w"))
    d = fx.scratch("extra")
    r = train_main(["--config", TINY_CONFIG, "--workdir", os.path.join(d, "w"), "--init-from", path,
                    *[a for a in SMALL_TRAIN if not a.startswith("--config.model.")],
                    "--config.num_steps=1", "--config.data.vocab_size=300"])
    return judge_valid(r, lambda: None if "rope_scaling_typo" in r.err else "the unknown field is not named")


def _signal_probe(sig: int) -> Callable:
    def run(fx):
        d = fx.scratch(f"signal{sig}")
        w = os.path.join(d, "w")
        args = train_args(fx, w, "--config.num_steps=400", "--config.checkpoint_every=100")
        env = dict(os.environ, PYTHONPATH=REPO)
        proc = subprocess.Popen([sys.executable, "-c", f"import sys; from nemojax.cli.train import main; "
                                 f"sys.exit(main({args!r}))"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a shell would
        metrics = os.path.join(w, "metrics.jsonl")
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            if os.path.isfile(metrics) and open(metrics).read().count("\n") >= 5:
                break
            time.sleep(0.05)
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            return TIMEOUT, "did not stop"
        from nemojax.checkpoint.orbax import latest_step
        from nemojax.train.metrics import read_metrics
        logged = max((r["step"] for r in read_metrics(metrics)), default=0)
        saved = latest_step(os.path.join(w, "checkpoints")) or 0
        if "Traceback" in err:
            return TRACEBACK if saved >= logged else LOST, err.strip().splitlines()[-1][:150]
        if saved < logged:
            return LOST, f"logged step {logged}, newest checkpoint {saved} (exit {proc.returncode})"
        return SERVED, f"checkpoint at step {saved}, exit {proc.returncode}"
    return run


probe("train", "SIGTERM mid-run")(_signal_probe(signal.SIGTERM))
probe("train", "SIGINT (Ctrl-C) mid-run")(_signal_probe(signal.SIGINT))


# --------------------------------------------------------------------------------------- python -m nemojax.plan
def plan_run(*args: str, timeout: float = 300) -> Result:
    return subprocess_run([sys.executable, "-m", "nemojax.plan", *args], timeout=timeout)


def plan_refuse(name: str, args: list[str], named: list[str]) -> None:
    probe("plan", name)(lambda fx: judge_refusal(plan_run(*args), *named))


def plan_valid(name: str, args: Callable[[Fixtures], list[str]], check: Callable[[Result], str | None]) -> None:
    @probe("plan", name)
    def run(fx):
        r = plan_run(*args(fx))
        return judge_valid(r, lambda: check(r))


plan_refuse("a million tensor shards", ["tiny", "--mesh", "tensor=1000000"], ["tensor"])
plan_refuse("devices 0", ["tiny", "--devices", "0", "--no-compile"], ["--devices"])
plan_refuse("devices -1", ["tiny", "--devices", "-1", "--no-compile"], ["--devices"])
plan_refuse("mesh not multiplying to devices", ["tiny", "--mesh", "tensor=3", "--devices", "8", "--no-compile"],
            ["--devices"])
plan_refuse("mesh axis typo", ["tiny", "--mesh", "pipeline=2", "--no-compile"], ["pipeline"])
plan_refuse("mesh size 0", ["tiny", "--mesh", "tensor=0", "--no-compile"], ["tensor"])
plan_refuse("more expert shards than experts", ["tiny", "--mesh", "expert=1024", "--no-compile"], ["expert"])
plan_refuse("more tensor shards than heads", ["tiny", "--mesh", "tensor=64", "--no-compile"], ["tensor"])
plan_refuse("batch 0", ["tiny", "--batch", "0", "--no-compile"], ["--batch"])
plan_refuse("batch beyond int32", ["tiny", "--batch", str(10**12), "--no-compile"], ["--batch"])
plan_refuse("seq-len beyond int32", ["tiny", "--seq-len", str(10**12), "--no-compile"], ["--seq-len"])
plan_refuse("prefill chunk 0", ["tiny", "--prefill-chunk", "0", "--no-compile"], ["--prefill-chunk"])
plan_refuse("fp8 weights for training", ["tiny", "--weights", "fp8", "--train", "--no-compile"], ["--weights"])
plan_refuse("unknown model", ["no-such-model", "--no-compile"], ["no-such-model"])
plan_refuse("config.json not JSON", ["/dev/null/config.json", "--no-compile"], ["config.json"])
probe("plan", "config.json garbage")(lambda fx: judge_refusal(plan_run(
    write(os.path.join(fx.scratch("plangarbage"), "config.json"), b"{oops"), "--no-compile"), "config.json"))
probe("plan", "config file without a model block")(lambda fx: judge_refusal(plan_run(
    write(os.path.join(fx.scratch("nomodel"), "c.py"), b"import ml_collections\ndef get_config():\n"
          b"    return ml_collections.ConfigDict(dict(num_steps=3))\n"), "--no-compile"), "model"))
plan_valid("nemojax model directory", lambda fx: [fx.model, "--no-compile", "--json"],
           lambda r: None if json.loads(r.out)["params_total"] > 0 else "no parameters")
plan_valid("training workdir", lambda fx: [fx.workdir, "--no-compile", "--json"],
           lambda r: None if json.loads(r.out)["params_total"] > 0 else "no parameters")
plan_valid("training step directory", lambda fx: [os.path.join(fx.workdir, "checkpoints", "2"), "--no-compile",
                                                   "--json"],
           lambda r: None if json.loads(r.out)["params_total"] > 0 else "no parameters")
plan_valid("Hugging Face directory", lambda fx: [fx.hf, "--no-compile", "--json"],
           lambda r: None if json.loads(r.out)["params_total"] > 0 else "no parameters")


@probe("plan", "config.json with an unknown field")
def _plan_extra(fx):
    d = fx.scratch("planextra")
    json.dump({**fx.hf_config, "my_extra_field": 1}, open(os.path.join(d, "config.json"), "w"))
    r = plan_run(os.path.join(d, "config.json"), "--no-compile")
    return judge_valid(r, lambda: None if "my_extra_field" in r.err else "the unknown field is not named")


# ------------------------------------------------------------------------------------------ load_pretrained
def load_probe(name: str, edit: Callable[[str], str | None], named: Callable[[str], list[str]],
               expect: str = "refuse", **kwargs) -> None:
    @probe("load", name)
    def run(fx):
        import nemojax
        from nemojax.errors import NemojaxError

        path = fx.hf_copy(name.replace(" ", "-")[:40])
        target = edit(path) or path
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                nemojax.load_pretrained(target, **kwargs)
            except NemojaxError as e:
                if expect == "valid":
                    return VALID_REFUSED, str(e)[:150]
                missing = [n for n in named(path) if n not in str(e)]
                return (UNNAMED, f"missing {missing}: {str(e)[:150]}") if missing else (REFUSED, str(e)[:150])
            except MemoryError:
                return OOM, ""
            except Exception as e:  # noqa: BLE001
                return TRACEBACK, f"{type(e).__name__}: {str(e)[:150]}"
        if expect == "refuse":
            return WRONG, "loaded"
        said = " ".join(str(w.message) for w in caught)
        missing = [n for n in named(path) if n not in said]
        return (WRONG, f"no warning naming {missing}") if missing else (SERVED, said[:150])


def edit_config(**changes):
    def edit(path):
        cfg = json.load(open(os.path.join(path, "config.json")))
        cfg.update(changes)
        json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return edit


def drop_config(*names):
    def edit(path):
        cfg = json.load(open(os.path.join(path, "config.json")))
        for n in names:
            cfg.pop(n)
        json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return edit


def header_edit(fn):
    return lambda path: fixtures.rewrite_header(os.path.join(path, "model.safetensors"), fn)


def tensor_edit(field, value):
    def fn(h):
        h[fixtures.first_tensor(h)][field] = value
        return h
    return header_edit(fn)


def index_file(content) -> Callable[[str], None]:
    def edit(path):
        blob = content if isinstance(content, bytes) else json.dumps(content).encode()
        write(os.path.join(path, "model.safetensors.index.json"), blob)
    return edit


ST = lambda p: ["model.safetensors"]  # noqa: E731
load_probe("path missing", lambda p: "/nonexistent/model", lambda p: ["/nonexistent/model"])
load_probe("path is a file", lambda p: os.path.join(p, "config.json"), lambda p: ["config.json"])
load_probe("config.json not JSON", lambda p: write(os.path.join(p, "config.json"), b"{oops") and None,
           lambda p: ["config.json"])
load_probe("config.json is a list", lambda p: write(os.path.join(p, "config.json"), b"[1]") and None,
           lambda p: ["config.json"])
load_probe("config.json not UTF-8", lambda p: write(os.path.join(p, "config.json"), b'{"a": "\xff"}') and None,
           lambda p: ["config.json"])
load_probe("pattern is a number", edit_config(hybrid_override_pattern=5), lambda p: ["hybrid_override_pattern"])
load_probe("pattern letter unknown", edit_config(hybrid_override_pattern="MX*"), lambda p: ["hybrid_override_pattern"])
load_probe("eos id a string", edit_config(eos_token_id="x"), lambda p: ["eos_token_id"])
load_probe("eos id negative", edit_config(eos_token_id=-5), lambda p: ["eos_token_id"])
load_probe("vocab size a float", edit_config(vocab_size=300.5), lambda p: ["vocab_size"])
load_probe("vocab size beyond int32", edit_config(vocab_size=3 * 10**9), lambda p: ["vocab_size"])
load_probe("hidden size missing", drop_config("hidden_size"), lambda p: ["hidden_size"])
load_probe("layer count disagrees", edit_config(num_hidden_layers=7), lambda p: ["num_hidden_layers"])
load_probe("head_dim 0", edit_config(head_dim=0), lambda p: ["head_dim"])
load_probe("layers_block_type unknown name",
           lambda p: (drop_config("hybrid_override_pattern")(p), edit_config(layers_block_type=["mamba", "rnn"])(p))
           and None, lambda p: ["rnn"])
load_probe("time_step_limit a string", edit_config(time_step_limit="big"), lambda p: ["time_step_limit"])
load_probe("MTP layer count a string", edit_config(num_nextn_predict_layers="one"), lambda p: ["num_nextn"])
load_probe("routed scaling NaN", lambda p: write(os.path.join(p, "config.json"), json.dumps(
    {**json.load(open(os.path.join(p, "config.json"))), "routed_scaling_factor": float("nan")}).encode()) and None,
           lambda p: ["routed_scaling_factor"])
load_probe("unknown config field (published configs carry extras)", edit_config(my_extra_field=1),
           lambda p: ["my_extra_field"], expect="valid")
load_probe("eos list empty", edit_config(eos_token_id=[]), lambda p: ["eos_token_id"])
load_probe("safetensors truncated", _truncate, ST)
load_probe("safetensors empty file", lambda p: write(os.path.join(p, "model.safetensors"), b"") and None, ST)
load_probe("safetensors header longer than the file", lambda p: write(
    os.path.join(p, "model.safetensors"), (10**9).to_bytes(8, "little") + b"{}") and None, ST)
load_probe("safetensors header not JSON", header_edit(lambda h: b"{not json"), ST)
load_probe("safetensors header a list", header_edit(lambda h: b"[1, 2]"), ST)
load_probe("safetensors header not UTF-8", header_edit(lambda h: b'{"\xff": 1}'), ST)
load_probe("safetensors entry without dtype", header_edit(
    lambda h: {**h, fixtures.first_tensor(h): {"shape": [1], "data_offsets": [0, 4]}}), ST)
load_probe("safetensors entry not an object", header_edit(lambda h: {**h, fixtures.first_tensor(h): 5}), ST)
load_probe("safetensors negative shape", tensor_edit("shape", [-1, 4]), ST)
load_probe("safetensors shape a string", tensor_edit("shape", "big"), ST)
load_probe("safetensors offsets of length 1", tensor_edit("data_offsets", [0]), ST)
load_probe("safetensors offsets past the end", tensor_edit("data_offsets", [0, 10**12]), ST)
load_probe("safetensors offsets reversed", tensor_edit("data_offsets", [8, 0]), ST)
load_probe("safetensors offsets disagree with the shape", tensor_edit("data_offsets", [0, 3]), ST)
load_probe("safetensors dtype unknown", tensor_edit("dtype", "F7"), ST)
load_probe("safetensors metadata not an object", header_edit(lambda h: {**h, "__metadata__": 5}), ST)
load_probe("index.json not JSON", index_file(b"{oops"), lambda p: ["model.safetensors.index.json"])
load_probe("index.json without weight_map", index_file({"metadata": {}}),
           lambda p: ["model.safetensors.index.json", "weight_map"])
load_probe("index.json weight_map a list", index_file({"weight_map": ["model.safetensors"]}),
           lambda p: ["weight_map"])
load_probe("index.json names a missing shard", index_file({"weight_map": {"lm_head.weight": "model-2.safetensors"}}),
           lambda p: ["model-2.safetensors"])
load_probe("index.json shard outside the directory", index_file({"weight_map": {"lm_head.weight": "../x.safetensors"}}),
           lambda p: ["../x.safetensors"])
load_probe("tensor mis-shaped", edit_config(hidden_size=64), lambda p: ["mis-shaped"])
load_probe("compute dtype int8", lambda p: None, lambda p: ["int8"], dtype="int8")
load_probe("compute dtype nonsense", lambda p: None, lambda p: ["float99"], dtype="float99")


@probe("load", "load_model: workdir whose newest checkpoint is corrupt")
def _load_corrupt(fx):
    from nemojax.checkpoint.orbax import load_model
    path = fx.workdir_copy("loadcorrupt")
    fixtures.corrupt_step(path, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                load_model(path)
        except Exception as e:  # noqa: BLE001
            return (VALID_REFUSED if "NemojaxError" in str(type(e).__mro__) else TRACEBACK), str(e)[:150]
    said = " ".join(str(w.message) for w in caught) + err.getvalue()
    return (SERVED, said[:150]) if "3" in said else (WRONG, "loaded without naming the corrupt step")


# ------------------------------------------------------------------------------------------------------ main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="after")
    parser.add_argument("--only", default="", help="comma-separated groups: serve,line,train,plan,load")
    parser.add_argument("--match", default="", help="run only probes whose name contains one of these ('|'-separated)")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = parser.parse_args()
    groups = set(filter(None, args.only.split(",")))
    patterns = args.match.split("|")
    chosen = [p for p in PROBES if (not groups or p.group in groups) and any(m in p.name for m in patterns)]
    _count_generate()
    started = time.time()
    with tempfile.TemporaryDirectory() as root:
        fx = Fixtures(root)
        results = []
        for p in chosen:
            begin = time.time()
            try:
                outcome, detail = p.run(fx)
            except Exception as e:  # noqa: BLE001 - a broken probe is reported, not fatal
                outcome, detail = "probe failed", f"{type(e).__name__}: {e}"
            results.append({"group": p.group, "probe": p.name, "outcome": outcome, "detail": detail,
                            "seconds": round(time.time() - begin, 1)})
            print(f"{p.group:6} {outcome:26} {p.name}  | {detail[:110]}", flush=True)
    counts = Counter(r["outcome"] for r in results)
    summary = {"label": args.label, "probes": len(results), "counts": dict(counts.most_common()),
               "seconds": round(time.time() - started), "results": results}
    os.makedirs(args.out, exist_ok=True)
    suffix = "" if not (groups or args.match) else "_partial"
    with open(os.path.join(args.out, f"bad_inputs_{args.label}{suffix}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"# Bad-input probes ({args.label}): {len(results)} probes", "", "| outcome | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.most_common()]
    lines += ["", "| group | probe | outcome | detail |", "|---|---|---|---|"]
    lines += [f"| {r['group']} | {r['probe']} | {r['outcome']} | {r['detail'][:100].replace('|', '/')} |"
              for r in results]
    with open(os.path.join(args.out, f"bad_inputs_{args.label}{suffix}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(json.dumps(summary["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
