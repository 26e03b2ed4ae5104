"""On-policy post-training runs end to end on a micro model: MOPD scores each domain's rollouts with its
own teacher (one of another size), GRPO mixes environments and survives reward functions that raise or
time out, and a run killed with SIGKILL resumes to the same metrics. (That the losses' gradients move a
student toward its teacher is tested in test_policy_losses.py; bench/mopd_demo.py measures it in a run.)"""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from nemojax.checkpoint.orbax import latest_step, load_model, save_model
from nemojax.errors import ConfigError
from nemojax.generate.engine import Engine
from nemojax.generate.requests import Request
from nemojax.generate.scheduler import Ticket
from nemojax.model import NemotronH, init_variables
from nemojax.posttrain import prompts
from nemojax.posttrain.loop import train_onpolicy
from nemojax.posttrain.objectives import forward_logits, forward_logprobs
from nemojax.posttrain.rollouts import pack
from nemojax.posttrain.scoring import MopdScorer, Teacher
from nemojax.train import rewards
from nemojax.train.metrics import read_metrics
from nemojax.train.run_config import load_run_config, model_config
from nemojax.train.tokenizer import save_tokenizer, train_tokenizer

pytestmark = pytest.mark.xdist_group("posttrain_runs")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every layer kind but MTP, at micro widths, so a run compiles in seconds.
MICRO = ["--config.model.vocab_size=320", "--config.model.hidden_size=32", "--config.model.hybrid_override_pattern=M*E",
         "--config.model.num_attention_heads=2", "--config.model.num_key_value_heads=1", "--config.model.head_dim=16",
         "--config.model.mamba_num_heads=2", "--config.model.mamba_head_dim=16", "--config.model.ssm_state_size=8",
         "--config.model.n_groups=1", "--config.model.chunk_size=16", "--config.model.num_nextn_predict_layers=0",
         "--config.model.intermediate_size=64", "--config.model.n_routed_experts=4",
         "--config.model.num_experts_per_tok=2", "--config.model.moe_intermediate_size=16",
         "--config.model.moe_shared_expert_intermediate_size=32", "--config.model.moe_latent_size=16",
         "--config.model.n_group=1", "--config.model.topk_group=1", "--config.log_every=1"]
CODE = "def f(x):\n    return x + 1\n\nfor i in range(10):\n    print(f(i))\n"
PROSE = "The quick brown fox jumps over the lazy dog. A sentence of plain words, then another one.\n"


def _write_jsonl(path, text, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"{i} {text}"}) + "\n")


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Two domains' text files and their teachers, sharing a tokenizer: for code, the student's own initial
    weights with a 30x lm_head (far sharper, in a direction the student reaches in a few steps); for prose,
    a narrower model sharpened alike (a teacher of another size)."""
    root = tmp_path_factory.mktemp("mopd")
    _write_jsonl(root / "code.jsonl", CODE, 40)
    _write_jsonl(root / "prose.jsonl", PROSE, 40)
    tokenizer = train_tokenizer([CODE, PROSE], 320)
    config = model_config(load_run_config("mopd_tiny", MICRO))
    teachers = {}
    for name, width in (("code", 32), ("prose", 16)):
        teacher_config = config.replace(hidden_size=width)
        variables = init_variables(teacher_config, jax.random.key(0))  # the student's init (seed 0)
        variables["params"]["lm_head"]["kernel"] = 30.0 * variables["params"]["lm_head"]["kernel"]
        save_model(root / f"teacher_{name}", teacher_config, variables)
        save_tokenizer(tokenizer, str(root / f"teacher_{name}"))
        teachers[name] = str(root / f"teacher_{name}")
    return root, teachers


def mopd_args(root, teachers, steps=4):
    return MICRO + [
        f"--config.num_steps={steps}", "--config.checkpoint_every=2", "--config.optimizer.learning_rate=1e-2",
        "--config.optimizer.warmup_steps=0", "--config.posttrain.prompts_per_source=2",
        "--config.posttrain.prompt_tokens=8", "--config.posttrain.max_new_tokens=8",
        f"--config.posttrain.domains.code.teacher={teachers['code']}",
        f"--config.posttrain.domains.code.paths={root / 'code.jsonl'}",
        f"--config.posttrain.domains.prose.teacher={teachers['prose']}",
        f"--config.posttrain.domains.prose.paths={root / 'prose.jsonl'}"]


@pytest.fixture(scope="module")
def mopd_run(domains, tmp_path_factory):
    root, teachers = domains
    workdir = str(tmp_path_factory.mktemp("mopd_run"))
    train_onpolicy(load_run_config("mopd_tiny", mopd_args(root, teachers)), workdir)
    return workdir


def _comparable(workdir):
    """Metrics records without the wall-clock fields."""
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")}
            for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))]


def test_mopd_run_scores_each_domain_with_its_teacher(domains, mopd_run):
    records = read_metrics(os.path.join(mopd_run, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 5))
    for key in ("loss", "kl", "kl/code", "kl/prose", "entropy", "rollout_len_mean", "rollout_len_max", "grad_norm"):
        assert key in records[-1]
    for r in records:  # equal rollout lengths: the loss is the mean of the domains' KLs
        assert r["loss"] == pytest.approx((r["kl/code"] + r["kl/prose"]) / 2, rel=1e-4)
        assert r["kl/code"] > 0.5 and r["kl/prose"] > 0 and r["rollout_len_max"] <= 8
    assert latest_step(os.path.join(mopd_run, "checkpoints")) == 4
    # Each domain's rows go to its own teacher (the two have different sizes and weights); the run's shapes.
    _, teachers = domains
    loaded = [Teacher(*load_model(teachers[name])) for name in ("code", "prose")]
    inputs = jax.random.randint(jax.random.key(5), (4, 16), 0, 320)
    got = MopdScorer(loaded).teacher_logits(inputs, 2)
    alone = [forward_logits(t.model.config)(t.variables, inputs[2 * d:2 * d + 2]) for d, t in enumerate(loaded)]
    np.testing.assert_array_equal(got, np.concatenate(alone))
    assert not np.allclose(alone[0], forward_logits(loaded[1].model.config)(loaded[1].variables, inputs[:2]),
                           atol=1e-2)


def test_rollout_packing_masks_only_generated_targets():
    rollouts = pack([[5, 6, 7], [8]], [[9, 2], [10, 11, 12]], 6, 0, ["stop", "length"])
    np.testing.assert_array_equal(rollouts.inputs_nt, [[5, 6, 7, 9, 2], [8, 10, 11, 12, 0]])
    np.testing.assert_array_equal(rollouts.targets_nt, [[6, 7, 9, 2, 0], [10, 11, 12, 0, 0]])
    np.testing.assert_array_equal(rollouts.mask_nt, [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]])


def test_training_logprobs_of_rollouts_equal_the_engines_sampling_logprobs():
    """The GRPO loss scores the tokens the engine drew, at the positions it drew them: log p(token) of the
    packed rollouts (right-padded rows of different prompt lengths, first generated token included) under
    the training forward equals the log-probability the engine sampled it with at temperature 1."""
    config = model_config(load_run_config("grpo_tiny", MICRO))
    variables = jax.jit(init_variables, static_argnums=0)(config, jax.random.key(3))
    prompt_ids = [[40, 41, 42, 43, 44], [50], [60, 61, 62], [70, 71]]
    engine = Engine(NemotronH(config), variables, eos_ids=(2,))
    scheduler = engine.scheduler(4, 12)
    tickets = [scheduler.submit(Ticket(Request(i, tuple(p), 5, 1.0, 0, 1.0, 0.0, 11, (), False, None),
                                       logprobs=True)) for i, p in enumerate(prompt_ids)]
    scheduler.run_until_idle()
    rollouts = pack(prompt_ids, [t.output_ids for t in tickets], 13, 2, [t.finish_reason for t in tickets])
    logp = np.asarray(forward_logprobs(config)(variables, rollouts.inputs_nt, rollouts.targets_nt))
    for row, ticket in enumerate(tickets):
        assert len(ticket.output_ids) >= 1
        np.testing.assert_allclose(logp[row][rollouts.mask_nt[row] > 0], ticket.token_logprobs, atol=1e-4)


def test_prompts_depend_only_on_seed_step_and_source():
    draw = lambda *key: [prompts.arithmetic(prompts.step_rng(*key), {"max_operand": 99}) for _ in range(4)]
    assert draw(0, 3, 1) == draw(0, 3, 1)
    assert draw(0, 3, 1) != draw(0, 4, 1) and draw(0, 3, 1) != draw(0, 3, 0)
    for _ in range(20):
        prefix = prompts.brackets(np.random.default_rng(_), {"length": 5})["prompt"]
        depths = np.cumsum([1 if c == "(" else -1 for c in prefix])
        assert depths.min() >= 0 and depths[-1] > 0  # never closes too much, something left to close


def _raises(completion, example):
    raise RuntimeError("plug-in bug")


def _hanging_tests(completion, example):
    """The unit-test reward on tests that never end (the completion's own code is left out: random tokens
    would fail to compile before the tests run)."""
    return rewards.unit_tests("", example)


def test_grpo_mixes_environments_and_failing_rewards_score_zero(tmp_path):
    for name, fn in (("test_raises", _raises), ("test_hangs", _hanging_tests)):
        if name not in rewards.REWARDS:
            rewards.register(name, fn)
    tasks = tmp_path / "hang.jsonl"
    tasks.write_text(json.dumps({"prompt": "1+1=", "tests": "while True:\n    pass\n", "timeout_s": 0.5}) + "\n")
    cfg = load_run_config("grpo_tiny", MICRO + [
        "--config.num_steps=2", "--config.posttrain.prompts_per_source=1", "--config.posttrain.group_size=2",
        "--config.posttrain.max_new_tokens=3"])
    cfg.posttrain.environments.update(hang=dict(task="jsonl", path=str(tasks), reward="test_hangs"),
                                      broken=dict(task="arithmetic", reward="test_raises"))
    workdir = str(tmp_path / "grpo")
    begin = time.perf_counter()
    last = train_onpolicy(cfg, workdir)
    print(f"grpo run: {time.perf_counter() - begin:.1f} s")
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert len(records) == 2 and last["step"] == 2
    for r in records:
        assert r["reward/hang"] == 0.0 and r["reward/broken"] == 0.0
        assert r["reward_errors"] == 4  # 2 timed out + 2 raised each step
        assert {"reward/arithmetic", "reward/brackets", "kl", "entropy"} <= set(r)
        assert np.isfinite(r["loss"])


def test_bad_posttrain_config_exits_2(domains, tmp_path, capsys):
    from nemojax.cli.train import main

    root, teachers = domains
    args = ["--config", "mopd_tiny", "--workdir", str(tmp_path / "w"), *mopd_args(root, teachers),
            "--config.posttrain.domains.prose.teacher=/nonexistent"]
    assert main(args) == 2
    assert "posttrain.domains.prose.teacher" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="posttrain.environments.arithmetic.reward"):
        train_onpolicy(load_run_config("grpo_tiny", ["--config.posttrain.environments.arithmetic.reward=nope"]),
                       str(tmp_path / "g"))


def test_mopd_resume_after_kill_9_is_exact(domains, mopd_run, tmp_path):
    root, teachers = domains
    workdir = str(tmp_path / "killed")
    command = [sys.executable, os.path.join(REPO, "train.py"), "--config", "mopd_tiny", "--workdir", workdir,
               *mopd_args(root, teachers), "--compilation-cache", str(tmp_path / "xla")]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 180
    while latest_step(os.path.join(workdir, "checkpoints")) is None and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    killed_at = latest_step(os.path.join(workdir, "checkpoints"))
    assert killed_at is not None and killed_at < 4
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _comparable(workdir) == _comparable(mopd_run)
