"""The on-policy loop shared by MOPD and GRPO: set up (student, teachers or reference, tokenizer, prompts),
then each step sample, score, update, log and checkpoint until `num_steps`.

The student starts from `--init-from` (a checkpoint) or the model config's seeded random init; its train
state, optimizer and Orbax checkpoints are the training loop's (`nemojax.train`), so a workdir restarted
after kill -9 resumes from its newest checkpoint and repeats the uninterrupted run: prompts and rollout
randomness are functions of (seed, step), and the frozen models are reloaded from where they came from.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tokenizers import Tokenizer

from nemojax import sharding
from nemojax.chat import EOS
from nemojax.checkpoint import orbax as orbax_model
from nemojax.config import ModelConfig
from nemojax.errors import ConfigError
from nemojax.model import NemotronH, init_variables
from nemojax.posttrain import prompts as prompt_sources
from nemojax.posttrain.objectives import grpo_objective, make_update, mopd_objective
from nemojax.posttrain.rollouts import RolloutSampler, rollout_seed
from nemojax.posttrain.scoring import GrpoScorer, MopdScorer, Teacher, completion_texts
from nemojax.posttrain.settings import check_posttrain_config, merged_posttrain_config
from nemojax.sharding.placement import shard_variables
from nemojax.train.checkpointing import TrainCheckpoints
from nemojax.train.loop import TrainingDiverged, _init_source, _load_init, _make_workdir
from nemojax.train.metrics import MetricsLog
from nemojax.train.placement import build_mesh, with_shardings
from nemojax.train.programs import build_programs
from nemojax.train.run_config import check_run_config, model_config
from nemojax.train.stopping import StopSignals, TrainingStopped
from nemojax.train.tokenizer import TOKENIZER_FILENAME, load_tokenizer, save_tokenizer, train_tokenizer

WIDTH_MULTIPLE = 16  # rollout widths are rounded up to this, so few shapes compile
TOKENIZER_SAMPLES = 2000


class OnPolicyRun:
    """Everything a run needs before its first step."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, init_from: str | None = None):
        check_run_config(cfg)
        self.post = merged_posttrain_config(cfg.posttrain)
        check_posttrain_config(self.post)
        init_source = _init_source(init_from) if init_from else None
        if not workdir:
            raise ConfigError("--workdir is empty; give a directory (it is created if missing)")
        self.cfg, self.workdir = cfg, os.path.abspath(workdir)
        self.mesh = build_mesh(cfg.mesh)
        _make_workdir(self.workdir)
        self.checkpoints = TrainCheckpoints(self.workdir, int(cfg.keep_checkpoints))
        try:
            self._set_up(init_from, init_source)
        except BaseException:
            self.checkpoints.close()
            raise

    def _set_up(self, init_from: str | None, init_source: str | None) -> None:
        cfg, post = self.cfg, self.post
        config = model_config(cfg)
        if init_from:
            config, variables = _load_init(init_from, init_source, cfg, config.compute_dtype, self.mesh)
        else:
            variables = jax.jit(init_variables, static_argnums=0)(config, jax.random.key(int(cfg.seed)))
        self.config, self.model = config, NemotronH(config)
        self.tokenizer = self._tokenizer(init_from)
        if self.tokenizer.get_vocab_size() > config.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tokenizer.get_vocab_size()} tokens but the model's "
                              f"vocab_size is {config.vocab_size}")
        self.eos_id = self.tokenizer.token_to_id(EOS)
        self.sources = list((post.domains if post.method == "mopd" else post.environments).keys())
        if post.method == "mopd":
            self.domain_prompts = [prompt_sources.DomainPrompts(tuple(post.domains[d].paths), self.tokenizer,
                                                                post.prompt_tokens) for d in self.sources]
            self.mopd = MopdScorer([self._teacher(post.domains[d].teacher, d) for d in self.sources])
        else:
            self.tasks = [prompt_sources.task_fn(post.environments[e]) for e in self.sources]
            # The reference is the student as it started (reloaded the same way on resume).
            reference = variables if self.mesh is None else shard_variables(variables, config, self.mesh)
            self.grpo = GrpoScorer(Teacher(self.model, reference), int(post.reward_workers))
        if jax.process_index() == 0:
            orbax_model.write_config(self.workdir, config, run=cfg.to_dict())
        self.programs = build_programs(cfg, config, self.mesh)
        self.update = _update_program(post.method, config, float(post.clip_eps), float(post.kl_coef),
                                      self.programs.tx, self.programs.schedule)
        resume_step = self.checkpoints.latest_step()
        if resume_step is not None:
            target = with_shardings(self.programs.abstract_state, self.programs.shardings)
            self.start_step, self.state, _ = self.checkpoints.restore_newest(target)
        else:
            with self.mesh_context():
                self.state, self.start_step = self.programs.state_from(variables), 0
        self.sampler = RolloutSampler(self.model, self.variables(), self.eos_id, self.eos_id, self.mesh)
        self.metrics = MetricsLog(self.workdir, self.start_step)

    def _tokenizer(self, init_from: str | None) -> Tokenizer:
        """data.tokenizer_path, else the workdir's (resume), the init checkpoint's, the first teacher's, or
        (GRPO) one trained on samples of the environments' prompts and answers (saved in the workdir)."""
        post, data = self.post, self.cfg.data
        candidates = [data.tokenizer_path, os.path.join(self.workdir, TOKENIZER_FILENAME)]
        if init_from:
            candidates.append(os.path.join(init_from, TOKENIZER_FILENAME))
        if post.method == "mopd":
            candidates.append(os.path.join(next(iter(post.domains.values())).teacher, TOKENIZER_FILENAME))
        found = next((p for p in candidates if p and os.path.isfile(p)), None)
        if found is not None:
            tokenizer = load_tokenizer(found)
        elif post.method == "mopd":
            raise ConfigError("MOPD needs the teachers' tokenizer: set data.tokenizer_path (no tokenizer.json in "
                              "the first teacher's directory or --init-from)")
        else:
            texts = []
            for index, name in enumerate(post.environments):
                rng, task = prompt_sources.step_rng(int(self.cfg.seed), 0, index), prompt_sources.task_fn(
                    post.environments[name])
                records = [task(rng, post.environments[name]) for _ in range(TOKENIZER_SAMPLES)]
                texts += [r["prompt"] + str(r.get("answer", "")) for r in records]
            tokenizer = train_tokenizer(texts, int(data.vocab_size))
        if jax.process_index() == 0 and not os.path.isfile(os.path.join(self.workdir, TOKENIZER_FILENAME)):
            save_tokenizer(tokenizer, self.workdir)
        return tokenizer

    def _teacher(self, path: str, domain: str) -> Teacher:
        model, variables = orbax_model.load_model(path, mesh=self.mesh)
        if model.config.vocab_size != self.config.vocab_size:
            raise ConfigError(f"posttrain.domains.{domain}.teacher {path}: vocab_size {model.config.vocab_size} "
                              f"differs from the student's {self.config.vocab_size} (they must share a tokenizer)")
        return Teacher(model, variables)

    def mesh_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.mesh is None else sharding.use_mesh(self.mesh)

    def variables(self) -> dict:
        return {"params": self.state["params"], "buffers": self.state["buffers"]}

    def put(self, value: np.ndarray) -> jax.Array:
        """A host array every process holds alike, replicated over the mesh."""
        if self.mesh is None:
            return jax.device_put(value)
        return sharding.place(value, NamedSharding(self.mesh, PartitionSpec()))

    # ---------------------------------------------------------------- one step
    def step(self, step: int, votes: jax.Array) -> dict[str, Any]:
        """Sample, score and update once; returns the step's metrics record (host values)."""
        post = self.post
        group, per_source = int(post.group_size), int(post.prompts_per_source)
        begin = time.perf_counter()
        records: list[dict] = []
        prompt_ids: list[list[int]] = []
        for index in range(len(self.sources)):
            rng = prompt_sources.step_rng(int(self.cfg.seed), step, index)
            if post.method == "mopd":
                prompt_ids += [p for p in self.domain_prompts[index].sample(rng, per_source) for _ in range(group)]
            else:
                env = post.environments[self.sources[index]]
                for record in (self.tasks[index](rng, env) for _ in range(per_source)):
                    ids = self.tokenizer.encode(record["prompt"], add_special_tokens=False).ids
                    records += [record] * group
                    prompt_ids += [ids] * group
        needed = max(len(p) for p in prompt_ids) + int(post.max_new_tokens)
        width = -(-needed // WIDTH_MULTIPLE) * WIDTH_MULTIPLE + 1
        rollouts = self.sampler.sample(self.variables(), prompt_ids, int(post.max_new_tokens),
                                       float(post.temperature), rollout_seed(int(self.cfg.seed), step), width)
        sampled = time.perf_counter()
        rows = per_source * group
        source_of_row = [name for name in self.sources for _ in range(rows)]
        batch = {"inputs": self.put(rollouts.inputs_nt), "targets": self.put(rollouts.targets_nt),
                 "mask": self.put(rollouts.mask_nt)}
        extra: dict[str, Any] = {}
        with self.mesh_context():
            if post.method == "mopd":
                batch["teacher_logits"] = self.mopd.teacher_logits(batch["inputs"], rows)
            else:
                texts = completion_texts(rollouts, self.tokenizer, self.eos_id)
                results = self.grpo.rewards(texts, records, [post.environments[s].reward for s in source_of_row])
                scores = self.grpo.advantages(results, source_of_row, group, bool(post.scale_advantages))
                batch["advantages"] = self.put(scores.advantages)
                batch["ref_logp"] = self.grpo.reference_logprobs(batch["inputs"], batch["targets"])
                extra = {"reward": float(np.mean(scores.rewards)),
                         "reward_errors": sum(e is not None for e in scores.errors),
                         **{f"reward/{s}": float(np.mean(scores.rewards[i * rows:(i + 1) * rows]))
                            for i, s in enumerate(self.sources)}}
            scored = time.perf_counter()
            self.state, metrics = self.update(self.state, batch, votes)
            m = jax.device_get(metrics)
        lengths = np.asarray([len(c) for c in rollouts.completions])
        kl_rows = np.asarray(m["kl_rows"])
        record = {
            "step": step, "loss": float(m["loss"]), "kl": float(kl_rows.mean()),
            "entropy": float(np.mean(m["entropy_rows"])), "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
            "rollout_len_mean": float(lengths.mean()), "rollout_len_max": int(lengths.max()),
            "eos_fraction": float(np.mean([r == "stop" for r in rollouts.finish_reasons])),
            "skipped": bool(m["skipped"]), "bad_steps": int(m["bad_steps"]), "stop": bool(m["stop"]),
            "rollout_seconds": sampled - begin, "score_seconds": scored - sampled,
            "update_seconds": time.perf_counter() - scored, **extra,
        }
        if post.method == "mopd":
            record.update({f"kl/{s}": float(kl_rows[i * rows:(i + 1) * rows].mean())
                           for i, s in enumerate(self.sources)})
        return record

    def close(self) -> None:
        if self.post.method == "grpo":
            self.grpo.close()
        self.checkpoints.wait()
        self.checkpoints.close()


@functools.lru_cache(maxsize=4)
def _update_program(method: str, config: ModelConfig, clip_eps: float, kl_coef: float,
                    tx: optax.GradientTransformation, schedule: optax.Schedule) -> Any:
    """The jitted update (donating the state), once per process for each objective, model and optimizer
    (`build_programs` returns the same optimizer for the same settings)."""
    model = NemotronH(config)
    objective = mopd_objective(model) if method == "mopd" else grpo_objective(model, clip_eps, kl_coef)
    return jax.jit(_with_stop_votes(make_update(objective, tx, schedule)), donate_argnums=0)


def _with_stop_votes(update: Any) -> Any:
    """The update taking the processes' stop votes and returning `stop` = any vote (see train/stopping.py)."""
    def update_with_votes(state: dict, batch: dict, votes: jax.Array) -> tuple[dict, dict]:
        state, metrics = update(state, batch)
        return state, {**metrics, "stop": jax.numpy.any(votes)}
    return update_with_votes


def is_posttrain_config(cfg: ml_collections.ConfigDict) -> bool:
    return "posttrain" in cfg


def train_onpolicy(cfg: ml_collections.ConfigDict, workdir: str, init_from: str | None = None,
                   stop_at: int | None = None) -> dict[str, Any]:
    """Run (or resume) MOPD or GRPO into `workdir`; returns the last metrics record ({} when already done)."""
    with StopSignals(mesh=None) as signals:
        run = OnPolicyRun(cfg, workdir, init_from)
        signals.mesh = run.mesh
        num_steps = int(cfg.num_steps)
        last_step = num_steps if stop_at is None else min(num_steps, stop_at)
        last: dict[str, Any] = {}
        stopped_at = None
        try:
            for step in range(run.start_step + 1, last_step + 1):
                record = run.step(step, signals.votes())
                if record["bad_steps"] > int(cfg.max_bad_steps):
                    raise TrainingDiverged(f"{record['bad_steps']} non-finite steps in a row at step {step}; the "
                                           f"last good checkpoint is step {run.checkpoints.latest_step()}")
                stop = signals.should_stop({"stop": record["stop"]})
                if step % int(cfg.log_every) == 0 or step == last_step or stop:
                    run.metrics.write(record)
                    if jax.process_index() == 0:
                        print(_summary(record), flush=True)
                last = record
                if stop or step % int(cfg.checkpoint_every) == 0 or step == last_step:
                    run.checkpoints.save(step, run.state, {"step": step})
                if stop:
                    stopped_at = step
                    break
        finally:
            run.close()
    if stopped_at is not None:
        raise TrainingStopped(f"stopped after step {stopped_at}, with a checkpoint in {run.checkpoints.directory}; "
                              "rerun the same command to continue", signals.received or 15)
    return last


def _summary(record: dict[str, Any]) -> str:
    keys = ("loss", "kl", "reward", "entropy", "rollout_len_mean")
    return f"step {record['step']}: " + ", ".join(f"{k}={record[k]:.4f}" for k in keys if k in record)
