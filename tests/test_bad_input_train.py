"""train.py on bad input: bad flags, config fields, data files, workdirs and checkpoints are refused before
any work (exit 2, the input named, no traceback, no checkpoint written); SIGTERM and Ctrl-C save a
checkpoint at the next step and exit cleanly, also with two processes that must agree on the step; a
newest checkpoint that cannot be restored is reported by step and the previous one is used."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from nemojax.checkpoint.hf import save_pretrained
from nemojax.checkpoint.orbax import latest_step
from nemojax.cli.train import main
from nemojax.config import from_hf_config
from nemojax.train.metrics import read_metrics

pytestmark = pytest.mark.xdist_group("bad_input_train")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
# Mamba, attention and MLP layers at small widths, no MoE or MTP: one cheap compile.
SMALL = [
    "--config.model.hybrid_override_pattern=M*-", "--config.model.num_nextn_predict_layers=0",
    "--config.model.mtp_hybrid_override_pattern=", "--config.model.vocab_size=512",
    "--config.model.hidden_size=32", "--config.model.num_attention_heads=2", "--config.model.num_key_value_heads=1",
    "--config.model.head_dim=16", "--config.model.mamba_num_heads=4", "--config.model.mamba_head_dim=8",
    "--config.model.ssm_state_size=8", "--config.model.chunk_size=16", "--config.model.intermediate_size=64",
    "--config.data.vocab_size=512", "--config.data.max_corpus_bytes=100000", "--config.batch_size=2",
    "--config.seq_len=32", "--config.log_every=1", "--config.eval_every=100000", "--config.eval_batches=1",
    "--compilation-cache", "",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tokenizer file shared by the runs (so no run trains its own)."""
    from nemojax.train.tokenizer import save_tokenizer, train_tokenizer

    with open(json.__file__) as f:
        return save_tokenizer(train_tokenizer([f.read()], 512), str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def truncated_hf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    import jax

    from nemojax.model import init_variables

    config = from_hf_config(dict(vocab_size=512, hidden_size=32, hybrid_override_pattern="M*-", num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=16, mamba_num_heads=4, mamba_head_dim=8,
                                 ssm_state_size=8, n_groups=1, chunk_size=16, intermediate_size=64))
    save_pretrained(directory, config, jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0)))
    path = directory / "model.safetensors"
    os.truncate(path, os.path.getsize(path) // 2)
    return str(directory)


def write(path, content: bytes) -> str:
    with open(path, "wb") as f:
        f.write(content)
    return str(path)


def data(path):
    return ["--config.data.source=files", f"--config.data.paths={path}"]


BAD = [  # (case, extra arguments (formatted with {d}: a scratch dir), what the message must name)
    ("config file missing", ["--config", "/nonexistent/c.py"], "/nonexistent/c.py"),
    ("config file raises", ["--config", "{raises}"], "raises.py"),
    ("get_config returns None", ["--config", "{returns_none}"], "get_config()"),
    ("model block a number", ["--config", "{model_number}"], "`model`"),
    ("run field typo", ["--config.num_stepz=3"], "num_stepz"),
    ("model field typo", ["--config.model.hiden_size=64"], "did you mean 'hidden_size'"),
    ("model block typo", ["--config.modle.hidden_size=64"], "modle"),
    ("model field without effect", ["--config.model.rope_theta=5"], "does not change the model"),
    ("batch size zero", ["--config.batch_size=0"], "batch_size"),
    ("num_steps beyond int32", [f"--config.num_steps={10**13}"], "num_steps"),
    ("seed beyond int32", [f"--config.seed={10**30}"], "seed"),
    ("negative seed", ["--config.seed=-1"], "seed"),
    ("learning rate nan", ["--config.optimizer.learning_rate=nan"], "learning_rate"),
    ("learning rate zero", ["--config.optimizer.learning_rate=0"], "learning_rate"),
    ("unknown schedule", ["--config.optimizer.schedule=bogus"], "schedule"),
    ("batch not divisible by accumulation", ["--config.grad_accum_steps=3"], "grad_accum_steps"),
    ("vocab beyond int32", ["--config.model.vocab_size=3000000000"], "vocab_size"),
    ("hidden size of a hundred million", ["--config.model.hidden_size=100000000"], "hidden_size"),
    ("a billion-token sequence", [f"--config.seq_len={10**9}"], "seq_len"),
    ("compute dtype int8", ["--config.compute_dtype=int8"], "compute_dtype"),
    ("mesh not dividing the devices", ["--config.mesh.tensor=3"], "mesh"),
    ("data path missing", data("/nonexistent/corpus.jsonl"), "/nonexistent/corpus.jsonl"),
    ("data file not UTF-8", data("{not_utf8}"), "not_utf8.txt"),
    ("bad JSON after U+2028 and blank lines", data("{u2028}"), "u2028.jsonl:4"),
    ("deeply nested JSON line", data("{nested}"), "nested.jsonl:2"),
    ("unpaired surrogate", data("{surrogate}"), "surrogate.jsonl:1"),
    ("heldout fraction 1.5", ["--config.data.heldout_fraction=1.5"], "heldout_fraction"),
    ("tokenizer file corrupt", ["--config.data.tokenizer_path={bad_tokenizer}"], "bad_tokenizer.json"),
    ("workdir is a file", ["--workdir", "{a_file}"], "a_file"),
    ("workdir empty", ["--workdir", ""], "--workdir"),
    ("workdir under a file", ["--workdir", "{a_file}/run"], "a_file/run"),
    ("init-from missing", ["--init-from", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    ("init-from truncated safetensors", ["--init-from", "{truncated_hf}"], "model.safetensors"),
    ("stop-at zero", ["--stop-at", "0"], "--stop-at"),
    ("distributed flags incomplete", ["--num-processes", "2"], "--coordinator-address"),
]


@pytest.mark.parametrize("case, extra, named", BAD, ids=[case for case, _, _ in BAD])
def test_bad_input_is_refused_before_any_work(tokenizer, truncated_hf, tmp_path, capsys, case, extra, named):
    d = tmp_path
    files = dict(
        raises=write(d / "raises.py", b"1 / 0\n"),
        returns_none=write(d / "returns_none.py", b"def get_config():\n    return None\n"),
        model_number=write(d / "model_number.py", b"import ml_collections\ndef get_config():\n"
                           b"    return ml_collections.ConfigDict(dict(model=5))\n"),
        not_utf8=write(d / "not_utf8.txt", b"caf\xe9\n"),
        u2028=write(d / "u2028.jsonl", json.dumps({"text": "a\u2028b\u0085c"}, ensure_ascii=False).encode()
                    + b'\n\n{"text": "ok"}\n{oops\n'),
        nested=write(d / "nested.jsonl", b'{"text": "a"}\n' + b"[" * 100000 + b"\n"),
        surrogate=write(d / "surrogate.jsonl", b'{"text": "a\\ud800"}\n{"text": "b"}\n'),
        bad_tokenizer=write(d / "bad_tokenizer.json", b"{oops"),
        a_file=write(d / "a_file", b"x"),
        truncated_hf=truncated_hf,
    )
    workdir = str(d / "run")
    argv = ["--config", TINY, "--workdir", workdir, *SMALL, f"--config.data.tokenizer_path={tokenizer}",
            *[a.format(**files) for a in extra]]
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's range checks exit 2 with the flag named
        status = e.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert named.format(**files) in err and "Traceback" not in err
    assert latest_step(os.path.join(workdir, "checkpoints")) is None


def _signal_when(metrics: str, steps: int, signum: int) -> threading.Thread:
    """Send `signum` to this process once `metrics` holds `steps` records."""
    def watch():
        deadline = time.time() + 300
        while len(read_metrics(metrics)) < steps and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signum)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_a_corrupt_newest_one_falls_back(tokenizer, tmp_path, capsys, request, signum):
    # A job started in the background inherits SIGINT ignored, which the run rightly keeps: handle it here.
    inherited = signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    request.addfinalizer(lambda: signal.signal(signum, inherited))
    workdir = str(tmp_path / "run")
    # 400 steps: far more than the signal needs, few enough that a missed signal fails the test, not hangs it.
    argv = ["--config", TINY, "--workdir", workdir, *SMALL, f"--config.data.tokenizer_path={tokenizer}",
            "--config.num_steps=400", "--config.checkpoint_every=2", "--config.keep_checkpoints=3"]
    before = signal.getsignal(signum)
    _signal_when(os.path.join(workdir, "metrics.jsonl"), 5, signum)
    assert main(argv) == 128 + signum
    assert signal.getsignal(signum) is before  # handlers are restored
    err = capsys.readouterr().err
    assert "Traceback" not in err and "rerun" in err
    logged = [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))]
    stopped = latest_step(os.path.join(workdir, "checkpoints"))
    assert logged == list(range(1, stopped + 1)) and stopped >= 5  # nothing logged is lost
    assert f"after step {stopped}" in err

    # The newest checkpoint is damaged: it is reported by step, set aside, and the one before it is used.
    for name in os.listdir(os.path.join(workdir, "checkpoints", str(stopped), "variables")):
        path = os.path.join(workdir, "checkpoints", str(stopped), "variables", name)
        if os.path.isfile(path):
            write(path, b"\x00garbage")
    assert main(argv + ["--stop-at", str(stopped + 1)]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint step {stopped}" in err and "Traceback" not in err
    assert os.path.isdir(os.path.join(workdir, "checkpoints", f"{stopped}.unreadable"))
    assert latest_step(os.path.join(workdir, "checkpoints")) == stopped + 1
    assert [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))] == list(range(1, stopped + 2))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tokenizer, tmp_path):
    """2 processes x 4 CPU devices (gloo), a (data=2, tensor=2, fsdp=2) mesh: SIGTERM reaches process 1
    only; both agree on the step, save one checkpoint together and exit with 143."""
    workdir = str(tmp_path / "run")
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    moe = ["--config.model.hybrid_override_pattern=*E", "--config.model.n_routed_experts=4",
           "--config.model.num_experts_per_tok=2", "--config.model.n_group=1", "--config.model.topk_group=1",
           "--config.model.moe_intermediate_size=16", "--config.model.moe_shared_expert_intermediate_size=16",
           "--config.model.moe_latent_size=16"]
    command = [sys.executable, os.path.join(REPO, "train.py"), "--config", TINY, "--workdir", workdir, *SMALL, *moe,
               f"--config.data.tokenizer_path={tokenizer}", "--config.num_steps=100000",
               "--config.checkpoint_every=100000", "--config.batch_size=4", "--config.mesh.data=2",
               "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--coordinator-address", f"localhost:{port}",
               "--num-processes", "2"]
    procs = [subprocess.Popen(command + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while len(read_metrics(metrics)) < 3 and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 143, err[-3000:]
        assert "Traceback" not in err
    stopped = latest_step(os.path.join(workdir, "checkpoints"))
    assert stopped is not None and stopped >= 3
    assert f"after step {stopped}" in outputs[0][1] and f"after step {stopped}" in outputs[1][1]
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, stopped + 1))
