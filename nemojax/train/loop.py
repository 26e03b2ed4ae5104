"""The training loop: set up (data, tokenizer, model, state: fresh, fine-tuned or resumed), then
step, log, evaluate and checkpoint until `num_steps`.

Everything that can fail on bad input (config, data files, --init-from) is checked before the
first compile. A run restarted on the same workdir resumes from the newest finished checkpoint
and continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from nemojax.checkpoint import orbax as orbax_model
from nemojax.checkpoint.hf import load_pretrained
from nemojax.config import ModelConfig, from_dict
from nemojax.errors import CheckpointError, ConfigError, NemojaxError
from nemojax.model import NemotronH
from nemojax.quant.master_weights import dequantize_variables
from nemojax.sharding import use_mesh
from nemojax.train.checkpointing import TrainCheckpoints
from nemojax.train.data import TokenBatches, build_tokenizer, heldout_batches, validate_data_config
from nemojax.train.memory import check_training_fits
from nemojax.train.metrics import MetricsLog, plot_loss_curve
from nemojax.train.placement import build_mesh, process_slice, put_batch, with_shardings
from nemojax.train.programs import build_programs
from nemojax.train.run_config import check_run_config, model_config, training_numerics
from nemojax.train.step import TrainState
from nemojax.train.stopping import StopSignals, TrainingStopped
from nemojax.train.tokenizer import TOKENIZER_FILENAME, save_tokenizer


class TrainingDiverged(NemojaxError):
    """Too many non-finite steps in a row; the message names the last good checkpoint."""


def _init_source(path: str) -> str:
    """"nemojax" (model dir / workdir / step dir) or "hf" (published layout); CheckpointError otherwise."""
    if orbax_model.is_nemojax_dir(path):
        return "nemojax"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise CheckpointError(f"--init-from {path}: not a checkpoint (no config.json; expected a Hugging Face "
                          "directory, a nemojax model directory or a training workdir)")


def _load_init(path: str, source: str, cfg: ml_collections.ConfigDict, dtype: str,
               mesh: Mesh | None) -> tuple[ModelConfig, dict]:
    """Model config and variables of the --init-from checkpoint (`source` from `_init_source`), in the
    run's dtypes and remat policy (and layer layout, when the run's model block sets scan_layers)."""
    scan = cfg.model.get("scan_layers")
    if source == "nemojax":
        model, variables = orbax_model.load_model(path, dtype=dtype, param_dtype=cfg.param_dtype, mesh=mesh,
                                                  scan_layers=scan)
    else:
        model, variables = load_pretrained(path, dtype=dtype, param_dtype=cfg.param_dtype, mesh=mesh,
                                           scan_layers=scan)
    config = model.config
    if config.weight_formats or config.kv_cache_quant != "none":
        formats = collections.Counter(fmt for _, fmt in config.weight_formats)
        config, variables = dequantize_variables(config, variables)
        if jax.process_index() == 0:
            print(f"--init-from {path}: quantized weights ({', '.join(f'{n} {f.upper()}' for f, n in formats.items())}"
                  f" weight tensors) dequantised to {cfg.param_dtype} master weights for fine-tuning")
    return config.replace(**training_numerics(cfg, config)), variables


def _same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    keep = dict(compute_dtype="float32", param_dtype="float32", remat="none", scan_layers=False, train_quant="none",
                train_quant_keep=())
    return a.replace(**keep) == b.replace(**keep)


def _make_workdir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--workdir {path} is a file; give a directory (it is created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--workdir {path}: cannot create it ({e.strerror or e})") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {path} is not writable")


class TrainingRun:
    """Everything a run needs before its first step: data, tokenizer, model, mesh and train state."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, init_from: str | None = None):
        # Bad input fails here, before the workdir is created and Orbax starts its background threads.
        check_run_config(cfg)
        configured = model_config(cfg)
        validate_data_config(cfg.data)
        init_source = _init_source(init_from) if init_from else None
        if not workdir:
            raise ConfigError("--workdir is empty; give a directory (it is created if missing)")
        self.cfg, self.workdir = cfg, os.path.abspath(workdir)
        self.mesh = build_mesh(cfg.mesh)
        if init_from is None:
            check_training_fits(configured, cfg)
        _make_workdir(self.workdir)
        self.checkpoints = TrainCheckpoints(self.workdir, int(cfg.keep_checkpoints))
        try:
            self._set_up(init_from, init_source)
        except BaseException:
            self.checkpoints.close()  # stops Orbax's background threads before the error propagates
            raise

    def _set_up(self, init_from: str | None, init_source: str | None) -> None:
        cfg = self.cfg
        resume_step = self.checkpoints.latest_step()
        config, variables = model_config(cfg), None
        if resume_step is not None:
            saved = from_dict(orbax_model.read_config(self.workdir)["model"])
            if not _same_architecture(saved, config) and init_from is None:
                raise ConfigError(f"{self.workdir} holds checkpoints of a different model than the config; "
                                  "use a new --workdir")
            config = saved.replace(compute_dtype=config.compute_dtype, param_dtype=config.param_dtype,
                                   **training_numerics(cfg, saved))
        elif init_from:
            config, variables = _load_init(init_from, init_source, cfg, config.compute_dtype, self.mesh)
            tokenizer_file = os.path.join(init_from, "tokenizer.json")
            if not cfg.data.tokenizer_path and os.path.isfile(tokenizer_file):
                cfg.data.tokenizer_path = tokenizer_file
        self.config, self.model = config, NemotronH(config)
        self.tokenizer = build_tokenizer(cfg.data, self.workdir)
        if self.tokenizer.get_vocab_size() > config.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tokenizer.get_vocab_size()} tokens but the model's "
                              f"vocab_size is {config.vocab_size}")
        if jax.process_index() == 0:
            orbax_model.write_config(self.workdir, config, run=cfg.to_dict())
            if not os.path.isfile(os.path.join(self.workdir, TOKENIZER_FILENAME)):
                save_tokenizer(self.tokenizer, self.workdir)  # a given tokenizer travels with the checkpoints
        self.programs = build_programs(cfg, config, self.mesh)
        slices = process_slice(self.mesh, int(cfg.batch_size))
        self.batches = TokenBatches(cfg.data, self.tokenizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                    seed=cfg.seed, **slices)
        self.eval_set = heldout_batches(cfg.data, self.tokenizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                        num_batches=cfg.eval_batches, **slices)
        self.state, self.start_step = self._initial_state(resume_step, variables)
        self.metrics = MetricsLog(self.workdir, self.start_step)

    def mesh_context(self) -> contextlib.AbstractContextManager:
        """Trace and run the model inside this (the mesh, or nothing on one device)."""
        return contextlib.nullcontext() if self.mesh is None else use_mesh(self.mesh)

    def put(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return put_batch(local_batch, self.mesh, int(self.cfg.batch_size))

    def _initial_state(self, resume_step: int | None, variables: dict | None) -> tuple[TrainState, int]:
        """(state, its step): restored (resume: the newest checkpoint that restores), built around loaded
        variables (fine-tune), or freshly initialised."""
        programs = self.programs
        if resume_step is not None:
            target = with_shardings(programs.abstract_state, programs.shardings)
            step, state, data_state = self.checkpoints.restore_newest(target)
            self.batches.restore(data_state)
            return state, step
        with self.mesh_context():
            return (programs.fresh_state() if variables is None else programs.state_from(variables)), 0

    def evaluate(self, eval_fn: Any) -> float | None:
        """Mean masked LM loss over the fixed held-out batches (None when there are none)."""
        if not self.eval_set:
            return None
        sums = [eval_fn(self.state, self.put(b)) for b in self.eval_set]
        total, count = np.sum(jax.device_get(sums), axis=0)
        return float(total / max(count, 1.0))


class _Recorder:
    """Turns each step's device metrics into the progress bar, metrics.jsonl records and the stop rule."""

    def __init__(self, run: TrainingRun):
        self.run, self.cfg = run, run.cfg
        self.tokens_per_step = int(self.cfg.batch_size) * int(self.cfg.seq_len)
        self.main = jax.process_index() == 0
        self.progress = tqdm(total=int(self.cfg.num_steps), initial=run.start_step, disable=not self.main,
                             desc="train", unit="step")
        self.window_start: float | None = None  # throughput window; opens after the first (compiling) step
        self.window_steps = 0
        self.last: dict[str, Any] = {}

    def restart_clock(self) -> None:
        """Leave evaluation and checkpoint time out of the throughput."""
        self.window_start, self.window_steps = time.perf_counter(), 0

    def __call__(self, step: int, metrics: dict, eval_loss: float | None = None) -> None:
        m = jax.device_get(metrics)
        now = time.perf_counter()
        if self.window_start is None:
            self.restart_clock()
        else:
            self.window_steps += 1
        if m["bad_steps"] > self.cfg.max_bad_steps:
            raise TrainingDiverged(
                f"{int(m['bad_steps'])} non-finite steps in a row at step {step} "
                f"(max_bad_steps={self.cfg.max_bad_steps}); stopped. The last good checkpoint is step "
                f"{self.run.checkpoints.latest_step()} in {os.path.join(self.run.workdir, 'checkpoints')}")
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{float(m['loss']):.3f}")
        if m["skipped"]:
            self.progress.write(f"step {step}: non-finite loss or gradient, update skipped "
                                f"({int(m['bad_steps'])} in a row)")
        if step % self.cfg.log_every and step != self.cfg.num_steps and not m["skipped"] and eval_loss is None:
            return
        throughput = self.window_steps * self.tokens_per_step / (now - self.window_start) if self.window_steps else None
        self.window_start, self.window_steps = now, 0
        self.last = {"step": step, **{k: float(m[k]) for k in ("loss", "lm_loss", "mtp_loss", "aux_loss", "lr",
                                                                 "grad_norm")},
                     "tokens_per_second": throughput, "skipped": bool(m["skipped"]),
                     "expert_load": {k: round(float(v), 4) for k, v in m["expert_load"].items()},
                     "dropped_rows": int(m["dropped_rows"])}
        if eval_loss is not None:
            self.last["eval_loss"] = eval_loss
        if self.main:
            self.run.metrics.write(self.last)


def train(cfg: ml_collections.ConfigDict, workdir: str, init_from: str | None = None,
          stop_at: int | None = None) -> dict[str, Any]:
    """Train (or resume) into `workdir`; returns the last metrics record.

    `stop_at` ends this session after that step with a checkpoint (the schedule still spans
    num_steps), for time-sliced jobs; rerunning resumes. SIGTERM or SIGINT does the same at the next
    step (on every process alike) and then raises TrainingStopped. Metrics of step s are read while
    step s+1 runs, so the host never stalls the device except at evaluations and checkpoints.
    """
    with StopSignals(mesh=None) as signals:
        run = TrainingRun(cfg, workdir, init_from)
        signals.mesh = run.mesh
        last, stopped_at = _run_steps(run, signals, stop_at)
    if stopped_at is not None:
        signum = signals.received or signal.SIGTERM
        how = signal.Signals(signum).name if signals.received else "a signal to another process"
        raise TrainingStopped(f"stopped by {how} after step {stopped_at}, with a checkpoint in "
                              f"{run.checkpoints.directory}; rerun the same command to continue", signum)
    return last


def _run_steps(run: TrainingRun, signals: StopSignals, stop_at: int | None) -> tuple[dict[str, Any], int | None]:
    """The step loop: (last metrics record, the step a signal stopped it at, or None)."""
    cfg = run.cfg
    step_fn, eval_fn = run.programs.train_step, run.programs.eval_step
    num_steps = int(cfg.num_steps)
    last_step = num_steps if stop_at is None else min(num_steps, stop_at)
    record = _Recorder(run)
    stopped_at = None
    try:
        with run.mesh_context():
            pending, previous = None, None
            for step in range(run.start_step + 1, last_step + 1):
                run.state, metrics = step_fn(run.state, run.put(next(run.batches)), signals.votes())
                if pending is not None:
                    record(*pending)
                stop = signals.should_stop(previous)
                pending, previous = (step, metrics), metrics
                evaluate_now = step % cfg.eval_every == 0 or step == num_steps
                if stop or evaluate_now or step % cfg.checkpoint_every == 0 or step == last_step:
                    record(step, metrics, run.evaluate(eval_fn) if evaluate_now else None)
                    pending = None
                    run.checkpoints.save(step, run.state, run.batches.state())
                    record.restart_clock()
                if stop:
                    stopped_at = step
                    break
    finally:
        record.progress.close()
        run.checkpoints.wait()
        run.checkpoints.close()
    if record.main:
        plot_loss_curve(run.workdir)
    return record.last, stopped_at
