"""Training runs end to end on a small model: the loss falls, resuming (clean stop or kill -9) repeats
the uninterrupted losses exactly, fine-tuning starts from the checkpoint's exact logits, repeated
non-finite steps stop the run with its checkpoint intact, and bad input exits 2 before compiling."""

import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_runs import SMALL_MODEL_ARGS

from nemojax.checkpoint.hf import save_pretrained
from nemojax.checkpoint.orbax import latest_step, load_model, save_model
from nemojax.model import NemotronH, init_variables
from nemojax.train.loop import TrainingDiverged, TrainingRun, train
from nemojax.train.metrics import read_metrics
from nemojax.train.run_config import load_run_config, model_config

# One worker runs this module, so its module fixtures are built once under `pytest -n 2 --dist loadgroup`.
pytestmark = pytest.mark.xdist_group("train_runs")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
NUM_STEPS = 24
# The tiny config's layer pattern (every layer kind and the MTP block) at smaller widths.
SMALL = SMALL_MODEL_ARGS + [
    "--config.batch_size=4", "--config.seq_len=64", f"--config.num_steps={NUM_STEPS}", "--config.log_every=1",
    "--config.eval_every=8", "--config.eval_batches=2", "--config.checkpoint_every=8",
    "--config.optimizer.learning_rate=3e-3", "--config.optimizer.warmup_steps=4",
    "--config.mesh.fsdp=1",  # one device unless a test asks for a mesh (the default, fsdp=-1, uses all 8)
]


def small_config(*extra):
    return load_run_config(TINY, SMALL + list(extra))


def losses(workdir):
    return [(r["step"], r["loss"], r.get("eval_loss")) for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    train(small_config(), workdir)
    return workdir


def test_loss_falls_and_run_outputs(uninterrupted):
    records = read_metrics(os.path.join(uninterrupted, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    first, last = np.mean([r["lm_loss"] for r in records[:4]]), np.mean([r["lm_loss"] for r in records[-4:]])
    assert first > np.log(512) - 0.3  # starts near uniform
    assert last < first - 0.5, (first, last)  # about 1 nat on Python 3.11's and 3.12's standard library
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    for key in ("loss", "lm_loss", "mtp_loss", "lr", "grad_norm", "tokens_per_second", "expert_load"):
        assert key in records[-1]
    assert records[-1]["loss"] == pytest.approx(records[-1]["lm_loss"] + 0.3 * records[-1]["mtp_loss"], rel=1e-5)
    assert set(records[-1]["expert_load"]) == {"backbone/layers_1/mixer", "backbone/layers_5/mixer",
                                               "mtp/layers_1/block/mixer"}
    for name in ("config.json", "tokenizer.json", "loss_curve.png"):
        assert os.path.isfile(os.path.join(uninterrupted, name))
    assert latest_step(os.path.join(uninterrupted, "checkpoints")) == NUM_STEPS
    # The load-balancing buffers moved, and serve/convert can read the workdir as a model.
    model, variables = load_model(uninterrupted)
    bias = variables["buffers"]["backbone"]["layers_1"]["mixer"]["gate"]["e_score_correction_bias"]
    assert float(jnp.max(jnp.abs(bias))) > 0
    assert model.config.hidden_size == 64


def reuse_tokenizer(workdir):
    """Runs in new workdirs load the first run's tokenizer instead of training the same one again."""
    return f"--config.data.tokenizer_path={os.path.join(workdir, 'tokenizer.json')}"


def test_resume_after_clean_stop_is_exact(uninterrupted, tmp_path):
    workdir = str(tmp_path / "resumed")
    cfg = small_config(reuse_tokenizer(uninterrupted))
    train(cfg, workdir, stop_at=11)  # stops between checkpoints: saves step 11
    assert latest_step(os.path.join(workdir, "checkpoints")) == 11
    train(cfg, workdir)
    assert losses(workdir) == losses(uninterrupted)


@pytest.mark.parametrize("layout", [
    # 8 devices: params over fsdp x tensor, experts over expert, batch rows over all but tensor.
    ("--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.mesh.expert=2"),
    # Two micro-batches per step, each split over data x fsdp: the same gradient as the whole batch.
    ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.grad_accum_steps=2"),
    ("--config.mesh.fsdp=-1",),  # the default mesh: every device
], ids=["fsdp-tensor-expert", "data-fsdp-tensor-accum2", "all-devices-default"])
def test_training_on_a_mesh_matches_one_device(uninterrupted, tmp_path, layout):
    workdir = str(tmp_path / "mesh")
    cfg = small_config(reuse_tokenizer(uninterrupted), *layout)
    train(cfg, workdir, stop_at=3)
    got, want = losses(workdir), losses(uninterrupted)[:3]
    assert [s for s, _, _ in got] == [s for s, _, _ in want]
    np.testing.assert_allclose([loss for _, loss, _ in got], [loss for _, loss, _ in want], rtol=2e-5)


def _train_command(workdir, *extra):
    return [sys.executable, os.path.join(REPO, "train.py"), "--config", TINY, "--workdir", workdir, *SMALL, *extra]


def test_resume_after_kill_9_is_exact(uninterrupted, tmp_path):
    workdir = str(tmp_path / "killed")
    command = _train_command(workdir, reuse_tokenizer(uninterrupted), "--compilation-cache", str(tmp_path / "xla"))
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while latest_step(os.path.join(workdir, "checkpoints")) is None and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.kill()  # SIGKILL, possibly while the next checkpoint or a metrics line is being written
    proc.wait()
    killed_at = latest_step(os.path.join(workdir, "checkpoints"))
    assert killed_at is not None and killed_at < NUM_STEPS
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert losses(workdir) == losses(uninterrupted)


@functools.cache
def _logits_fn(config):
    """One compiled forward per model config, shared by the parametrized cases."""
    return jax.jit(NemotronH(config).apply)


@pytest.mark.parametrize("layout", ["hf", "orbax"])
def test_fine_tune_starts_from_checkpoint_logits(uninterrupted, tmp_path, layout):
    cfg = small_config(reuse_tokenizer(uninterrupted))
    config = model_config(cfg)
    variables = init_variables(config, jax.random.key(7))
    source = str(tmp_path / "source")
    (save_pretrained if layout == "hf" else save_model)(source, config, variables)
    run = TrainingRun(cfg, str(tmp_path / "workdir"), init_from=source)
    run.checkpoints.close()
    assert os.path.isfile(str(tmp_path / "workdir" / "tokenizer.json"))  # the given tokenizer is copied in
    ids = jnp.asarray(run.eval_set[0]["inputs"])
    logits = _logits_fn(run.config)
    expected = logits(variables, ids)
    got = logits({"params": run.state["params"], "buffers": run.state["buffers"]}, ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert int(run.state["step"]) == 0


def test_non_finite_steps_are_skipped_then_stop_the_run(uninterrupted, tmp_path):
    # Start from a checkpoint with one NaN weight: every loss is non-finite, each update (parameters,
    # optimizer and balancing buffers) is skipped, and the third bad step in a row stops the run.
    cfg = small_config(reuse_tokenizer(uninterrupted), "--config.max_bad_steps=2", "--config.checkpoint_every=1")
    _, poisoned = load_model(uninterrupted)
    poisoned["params"]["lm_head"]["kernel"] = poisoned["params"]["lm_head"]["kernel"].at[0, 0].set(jnp.nan)
    source, workdir = str(tmp_path / "poisoned"), str(tmp_path / "diverged")
    save_model(source, model_config(cfg), poisoned)
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row at step 3"):
        train(cfg, workdir, init_from=source)
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [(r["step"], r["skipped"], r["loss"]) for r in records] == [(1, True, None), (2, True, None)]
    assert records[0]["lr"] == records[1]["lr"]  # a skipped update does not advance the schedule
    assert latest_step(os.path.join(workdir, "checkpoints")) == 2
    _, saved = load_model(workdir)  # the newest checkpoint restores and holds the untouched variables
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(poisoned), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("args, message", [
    (["--config.data.source=files", "--config.data.paths=/nonexistent/corpus.jsonl"], "/nonexistent/corpus.jsonl"),
    (["--config.num_stepz=3"], "num_stepz"),
    (["--init-from", "/nonexistent/checkpoint"], "/nonexistent/checkpoint"),
])
def test_bad_input_exits_2_without_traceback(tmp_path, args, message):
    done = subprocess.run(_train_command(str(tmp_path / "w")) + args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not os.path.exists(os.path.join(str(tmp_path / "w"), "checkpoints", "1"))


def test_config_json_records_model_and_run(uninterrupted):
    with open(os.path.join(uninterrupted, "config.json")) as f:
        saved = json.load(f)
    assert saved["model"]["hidden_size"] == 64 and saved["run"]["num_steps"] == NUM_STEPS
    assert saved["run"]["optimizer"]["learning_rate"] == pytest.approx(3e-3)
