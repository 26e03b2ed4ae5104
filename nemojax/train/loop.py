"""The training loop: set up (data, tokenizer, model, state: fresh, fine-tuned or resumed), then
step, log, evaluate and checkpoint until `num_steps`.

Everything that can fail on bad input (config, data files, --init-from) is checked before the
first compile. A run restarted on the same workdir resumes from the newest finished checkpoint
and continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from nemojax.checkpoint import orbax as orbax_model
from nemojax.config import ModelConfig, from_dict
from nemojax.errors import CheckpointError, ConfigError, NemojaxError
from nemojax.model import NemotronH, init_variables
from nemojax.train.checkpointing import TrainCheckpoints
from nemojax.train.data import TokenBatches, build_tokenizer, heldout_batches, validate_data_config
from nemojax.train.metrics import MetricsLog, plot_loss_curve
from nemojax.train.optimizer import make_optimizer, make_schedule
from nemojax.train.run_config import model_config
from nemojax.train.step import TrainState, init_state, make_eval_step, make_train_step


class TrainingDiverged(NemojaxError):
    """Too many non-finite steps in a row; the message names the last good checkpoint."""


def _check_run_config(cfg: ml_collections.ConfigDict) -> None:
    for name in ("num_steps", "batch_size", "seq_len", "grad_accum_steps", "log_every", "eval_every",
                 "checkpoint_every", "keep_checkpoints", "max_bad_steps"):
        if int(cfg[name]) < (0 if name in ("num_steps", "max_bad_steps") else 1):
            raise ConfigError(f"config field `{name}`: must be positive, got {cfg[name]}")
    if cfg.batch_size % cfg.grad_accum_steps:
        raise ConfigError(f"config field `batch_size`: {cfg.batch_size} is not divisible by "
                          f"grad_accum_steps={cfg.grad_accum_steps}")


def _init_source(path: str) -> str:
    """"nemojax" (model dir / workdir / step dir) or "hf" (published layout); CheckpointError otherwise."""
    if orbax_model.is_nemojax_dir(path):
        return "nemojax"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise CheckpointError(f"--init-from {path}: not a checkpoint (no config.json; expected a Hugging Face "
                          "directory, a nemojax model directory or a training workdir)")


def _load_init(path: str, cfg: ml_collections.ConfigDict, dtype: str) -> tuple[ModelConfig, dict]:
    """Model config and variables of the --init-from checkpoint, in the run's dtypes and remat policy."""
    if _init_source(path) == "nemojax":
        model, variables = orbax_model.load_model(path, dtype=dtype, param_dtype=cfg.param_dtype)
    else:
        from nemojax.checkpoint.hf import load_pretrained
        model, variables = load_pretrained(path, dtype=dtype, param_dtype=cfg.param_dtype)
    return model.config.replace(remat=cfg.remat), variables


def _same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    keep = dict(dtype="float32", param_dtype="float32", remat="none")
    return a.replace(**keep) == b.replace(**keep)


class _Run:
    """State of one training run between set-up and the end of the loop."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, init_from: str | None):
        _check_run_config(cfg)
        validate_data_config(cfg.data)
        self.cfg, self.workdir = cfg, os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.checkpoints = TrainCheckpoints(self.workdir, int(cfg.keep_checkpoints))
        self.start_step = self.checkpoints.latest_step()
        config = model_config(cfg)
        init_variables_ = None
        if self.start_step is not None:
            saved = from_dict(orbax_model.read_config(self.workdir)["model"])
            if not _same_architecture(saved, config) and init_from is None:
                raise ConfigError(f"{self.workdir} holds checkpoints of a different model than the config; "
                                  "use a new --workdir")
            config = saved.replace(dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat)
        elif init_from:
            config, init_variables_ = _load_init(init_from, cfg, config.dtype)
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
        self.tx = make_optimizer(cfg.optimizer, int(cfg.num_steps))
        self.schedule = make_schedule(cfg.optimizer, int(cfg.num_steps))
        self.batches = TokenBatches(cfg.data, self.tokenizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                    seed=cfg.seed, process_index=jax.process_index(),
                                    process_count=jax.process_count())
        self.eval_set = heldout_batches(cfg.data, self.tokenizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                        num_batches=cfg.eval_batches, process_index=jax.process_index(),
                                        process_count=jax.process_count())
        self.state = self._initial_state(init_variables_)
        self.metrics = MetricsLog(self.workdir, self.start_step or 0)
        self.start_step = self.start_step or 0

    def _initial_state(self, variables: dict | None) -> TrainState:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        seed = int(self.cfg.seed)

        def fresh() -> TrainState:
            return init_state(init_variables(self.config, jax.random.key(seed)), self.tx, seed)

        if self.start_step is not None:
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                    jax.eval_shape(fresh))
            state, data_state = self.checkpoints.restore(self.start_step, abstract)
            self.batches.restore(data_state)
            return state
        if variables is not None:
            return jax.jit(lambda v: init_state(v, self.tx, seed))(variables)
        return jax.jit(fresh)()

    def evaluate(self, eval_fn: Any) -> float | None:
        if not self.eval_set:
            return None
        sums = [eval_fn(self.state, jax.device_put(b)) for b in self.eval_set]
        total, count = np.sum(jax.device_get(sums), axis=0)
        return float(total / max(count, 1.0))


def train(cfg: ml_collections.ConfigDict, workdir: str, init_from: str | None = None) -> dict[str, Any]:
    """Train (or resume) into `workdir`; returns the last metrics record."""
    run = _Run(cfg, workdir, init_from)
    step_fn = jax.jit(make_train_step(run.model, run.tx, cfg, run.schedule), donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(run.model))
    num_steps, tokens_per_step = int(cfg.num_steps), int(cfg.batch_size) * int(cfg.seq_len)
    main = jax.process_index() == 0
    progress = tqdm(total=num_steps, initial=run.start_step, disable=not main, desc="train", unit="step")
    clock = {"start": None, "steps": 0}  # throughput window; starts after the first (compiling) step
    last: dict[str, Any] = {}

    def record(step: int, metrics: dict, eval_loss: float | None) -> None:
        nonlocal last
        m = jax.device_get(metrics)
        now = time.perf_counter()
        if clock["start"] is None:
            clock.update(start=now, steps=0)
        else:
            clock["steps"] += 1
        if m["bad_steps"] > cfg.max_bad_steps:
            raise TrainingDiverged(
                f"{int(m['bad_steps'])} non-finite steps in a row at step {step} (max_bad_steps={cfg.max_bad_steps}); "
                f"stopped. The last good checkpoint is step {run.checkpoints.latest_step()} in "
                f"{os.path.join(run.workdir, 'checkpoints')}")
        progress.update(1)
        progress.set_postfix(loss=f"{float(m['loss']):.3f}")
        if m["skipped"]:
            progress.write(f"step {step}: non-finite loss or gradient, update skipped ({int(m['bad_steps'])} in a row)")
        if step % cfg.log_every == 0 or step == num_steps or m["skipped"] or eval_loss is not None:
            throughput = clock["steps"] * tokens_per_step / (now - clock["start"]) if clock["steps"] else None
            clock.update(start=now, steps=0)
            last = {"step": step, **{k: float(m[k]) for k in ("loss", "lm_loss", "mtp_loss", "aux_loss", "lr",
                                                                "grad_norm")},
                    "tokens_per_second": throughput, "skipped": bool(m["skipped"]),
                    "expert_load": {k: round(float(v), 4) for k, v in m["expert_load"].items()}}
            if eval_loss is not None:
                last["eval_loss"] = eval_loss
            if main:
                run.metrics.write(last)

    try:
        pending = None
        for step in range(run.start_step + 1, num_steps + 1):
            batch = jax.device_put(next(run.batches))
            run.state, metrics = step_fn(run.state, batch)
            if pending is not None:
                record(*pending, None)
            pending = (step, metrics)
            evaluate_now = step % cfg.eval_every == 0 or step == num_steps
            if evaluate_now or step % cfg.checkpoint_every == 0:
                record(step, metrics, run.evaluate(eval_fn) if evaluate_now else None)
                pending = None
                run.checkpoints.save(step, run.state, run.batches.state())
                clock.update(start=time.perf_counter(), steps=0)
        if pending is not None:
            record(*pending, None)
    finally:
        progress.close()
        run.checkpoints.wait()
        run.checkpoints.close()
    if main:
        plot_loss_curve(run.workdir)
    return last


