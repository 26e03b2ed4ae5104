"""Several hosts: train.py run as 2 processes x 4 CPU devices, joined by jax.distributed (gloo), each
process tokenising only its data shard and loading its rows of the global batch, logs the same losses
as 1 process x 8 devices, both without mesh flags (the default mesh, fsdp over every device) and on a
(data, tensor, expert) = (2, 2, 2) mesh: sharded params, expert parallelism, AdamW, the balance loss
and the multi-process checkpoint all take part. serve.py the same way, on a sharded checkpoint. Plus
the flag checks and global batches."""

import argparse
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from small_runs import SMALL_MODEL_ARGS

from nemojax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
# Mamba, attention and MoE layers at small widths, no MTP (three compiles must stay cheap); 8 devices needed.
RUN = [
    "--config", os.path.join(REPO, "configs", "tiny.py"), "--compilation-cache", "",
    "--config.model.hybrid_override_pattern=M*E", "--config.model.num_nextn_predict_layers=0",
    "--config.model.mtp_hybrid_override_pattern=",
    *SMALL_MODEL_ARGS, "--config.batch_size=8",
    "--config.seq_len=32", f"--config.num_steps={STEPS}", "--config.log_every=1", "--config.eval_every=100",
    "--config.eval_batches=1", "--config.checkpoint_every=100",
    "--config.data.shards=2",  # the same batches for 1 and 2 processes; each of 2 tokenises its half
    # no warm-up and a large rate, so that 3 steps lower the loss on any Python's standard library
    "--config.optimizer.warmup_steps=1", "--config.optimizer.learning_rate=1e-2",
]
MESH = ["--config.mesh.data=2", "--config.mesh.tensor=2", "--config.mesh.expert=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train(workdir: str, devices: int, *extra: str, mesh: bool = True) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    command = [sys.executable, os.path.join(REPO, "train.py"), "--workdir", workdir, *RUN, *(MESH if mesh else ())]
    return subprocess.Popen(command + list(extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _joined(i: int, port: int) -> list[str]:
    return ["--coordinator-address", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def _shared_tokenizer(directory: str) -> str:
    """A small BPE tokenizer (trained here, so that the three runs can start at once)."""
    from nemojax.train.tokenizer import save_tokenizer, train_tokenizer

    with open(argparse.__file__) as f:
        return save_tokenizer(train_tokenizer([f.read()], 512), directory)


def test_train_py_two_processes_match_one_process(tmp_path):
    """1 process x 8 devices without mesh flags (fsdp=8) = 2 processes x 4 devices on a (2, 2, 2) mesh
    = 2 processes x 4 devices without mesh flags (fsdp=8 over both)."""
    one, two, default = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "default")
    tokenizer = f"--config.data.tokenizer_path={_shared_tokenizer(str(tmp_path))}"
    port, default_port = _free_port(), _free_port()
    runs = [_train(one, 8, tokenizer, mesh=False)] + [_train(two, 4, tokenizer, *_joined(i, port)) for i in range(2)]
    for run in runs:
        _finish(run)  # a (2, 2, 2) mesh on 4 local devices only works if the processes joined
    for run in [_train(default, 4, tokenizer, *_joined(i, default_port), mesh=False) for i in range(2)]:
        _finish(run)
    want = read_metrics(os.path.join(one, "metrics.jsonl"))
    for got in (read_metrics(os.path.join(d, "metrics.jsonl")) for d in (two, default)):
        assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
        for key in ("loss", "aux_loss", "grad_norm"):
            np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-5, err_msg=key)
    assert want[-1]["loss"] < want[0]["loss"]


def _serve(checkpoint: str, prompts: str, output: str, devices: int, *extra: str, mesh: bool = True
           ) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    command = [sys.executable, os.path.join(REPO, "serve.py"), "--checkpoint", checkpoint, "--prompts", prompts,
               "--output", output, "--max-new-tokens", "6", "--ignore-eos", "--batch-size", "4", "--no-progress",
               "--prefix-block", "4",
               *(["--mesh", "data=2,tensor=2,expert=2"] if mesh else []), *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_py_two_processes_match_one_process(tmp_path):
    """serve.py on 2 processes x 4 devices (sharded weights and caches, expert parallelism) writes the
    same completions as 1 process x 8 devices without --mesh (the default: fsdp over all 8); so do 2
    processes x 4 devices without --mesh. The last line restores 8 tokens from the prefix cache (sharded
    caches copied out and back, the same schedule on every process)."""
    import jax

    from nemojax.checkpoint.orbax import save_model
    from nemojax.config import from_hf_config
    from nemojax.model import init_variables

    config = from_hf_config(dict(vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E", num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8,
                                 ssm_state_size=8, n_groups=2, chunk_size=8, intermediate_size=32,
                                 n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                 moe_shared_expert_intermediate_size=16, eos_token_id=2, compute_dtype="float32"))
    checkpoint = str(tmp_path / "model")
    save_model(checkpoint, config, init_variables(config, jax.random.key(0)))
    prompts = tmp_path / "in.jsonl"
    rng = np.random.default_rng(0)
    lines = [{"input_ids": rng.integers(3, 64, n).tolist()} for n in (3, 11, 6, 9, 4)]
    lines[2]["temperature"], lines[2]["seed"] = 0.9, 5
    lines[4]["input_ids"] = lines[1]["input_ids"][:8] + lines[4]["input_ids"]  # waits for a slot, then a prefix hit
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    one, two, default = (str(tmp_path / f"{name}.jsonl") for name in ("one", "two", "default"))
    port, default_port = _free_port(), _free_port()
    stats = [str(tmp_path / f"stats{i}.json") for i in range(2)]
    runs = [_serve(checkpoint, str(prompts), one, 8, "--stats", stats[0], mesh=False)] + [
        _serve(checkpoint, str(prompts), two, 4, "--stats", stats[1], *_joined(i, port)) for i in range(2)]
    for run in runs:
        _finish(run)
    for run in [_serve(checkpoint, str(prompts), default, 4, *_joined(i, default_port), mesh=False) for i in range(2)]:
        _finish(run)
    want = [json.loads(line) for line in open(one)]
    assert len(want) == 5 and all(len(r["output_ids"]) == 6 for r in want)
    assert [json.loads(line) for line in open(two)] == want
    assert [json.loads(line) for line in open(default)] == want
    assert [json.load(open(path))["cached_tokens"] for path in stats] == [8, 8]


def test_cluster_detection_and_flag_checks(monkeypatch):
    from nemojax import distributed
    from nemojax.errors import ConfigError

    assert distributed.cluster_detected({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})
    assert not distributed.cluster_detected({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})
    assert distributed.cluster_detected({"OMPI_COMM_WORLD_SIZE": "2"})
    assert not distributed.cluster_detected({"HOME": "/root"})
    parser = distributed.add_distributed_flags(argparse.ArgumentParser())
    for argv, message in ((["--num-processes", "2"], "together"),
                          (["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"], "0..1"),
                          (["--coordinator-address", "h", "--num-processes", "2", "--process-id", "0"], "HOST:PORT")):
        with pytest.raises(ConfigError, match=message):
            distributed.initialize(parser.parse_args(argv))
    for name in ("SLURM_JOB_ID", "JAX_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE", "JOBSET_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize(parser.parse_args([])) is False  # a single machine: nothing to join


def test_global_batch_on_one_process():
    from nemojax import distributed, sharding

    mesh = sharding.make_mesh(data=2, tensor=2, expert=2)
    rows = np.arange(8 * 3).reshape(8, 3)
    assert distributed.local_batch_rows(mesh, 8) == slice(0, 8)
    batch = distributed.global_batch(mesh, rows, 8)
    assert batch.sharding == sharding.batch_sharding(mesh, 8) and batch.addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(batch), rows)
