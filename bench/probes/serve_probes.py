"""Probes of serve.py: flags, files and checkpoints, then one bad line at a time between good ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import fixtures
from fixtures import CONTEXT, REPO, Fixtures
from runner import (
    GOOD,
    LOST,
    REFUSED,
    SERVED,
    TRACEBACK,
    UNNAMED,
    VALID_REFUSED,
    WRONG,
    Result,
    in_process,
    j,
    judge_refusal,
    judge_valid,
    probe,
    read_records,
    served,
    subprocess_run,
    truncate_safetensors,
    write,
)


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
            if not records or len(records) != 2 or not all(served(x) for x in records):
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
        served(x) for x in read_records(out)) else f"records {read_records(out)}")


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


_hf_variant("truncated safetensors", truncate_safetensors, lambda p: ["model.safetensors"])
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
        if not (served(records[0]) and served(records[2])):
            return VALID_REFUSED, "a good line around it was not served"
        mine = records[1]
        if expect == "valid":
            return (SERVED, "") if served(mine) else (VALID_REFUSED, mine.get("error", "")[:200])
        if served(mine):
            return WRONG, f"served: {json.dumps(mine)[:150]}"
        message = mine.get("error", "")
        missing = [n for n in ("line 2", *named) if n.lower() not in message.lower()]
        return (UNNAMED, f"missing {missing}: {message[:150]}") if missing else (REFUSED, message[:150])


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
    if r.status == 0 and len(records) == 7 and all(served(x) for x in records[:6]) and "error" in records[6]:
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
    if second.status == 0 and len(records) == 12 and all(served(x) for x in records):
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
    if second.status == 0 and len(records) == 16 and all(served(x) for x in records):
        return SERVED, f"{kept} lines kept, resumed"
    return LOST, f"resume: exit {second.status}, {len(records)} records"
