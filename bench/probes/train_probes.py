"""Probes of train.py: flags, config fields, data files, workdirs, checkpoints and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import fixtures
from fixtures import REPO, SMALL_TRAIN, TINY_CONFIG, Fixtures
from runner import (
    LOST,
    SERVED,
    TIMEOUT,
    TRACEBACK,
    Result,
    in_process,
    j,
    judge_refusal,
    judge_valid,
    probe,
    subprocess_run,
    truncate_safetensors,
    write,
)


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
             lambda fx, d: ["--init-from", (lambda p: (truncate_safetensors(p), p)[1])(fx.hf_copy("initfrom"))],
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
        # SIGINT gets its default handler (as in a shell's foreground job), even if this process ignores it.
        code = (f"import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                f"from nemojax.cli.train import main; sys.exit(main({args!r}))")
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
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
