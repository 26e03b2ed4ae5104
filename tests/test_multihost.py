"""Several hosts: 2 processes x 4 CPU devices joined by jax.distributed (gloo) train a sharded model for
a few steps on one global batch, each process feeding only its rows; the losses equal 1 process x 8
devices. The model (attention + expert-parallel MoE) is small to keep three compiles cheap. Run as a
script, this file is one of the worker processes."""

import argparse
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

SMALL = dict(vocab_size=64, hidden_size=32, hybrid_override_pattern="*E", num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
             n_groups=2, chunk_size=4, intermediate_size=48, n_routed_experts=8, num_experts_per_tok=3,
             moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, moe_latent_size=12, n_group=2,
             topk_group=1, routed_scaling_factor=2.5, dtype="float32", param_dtype="float32")
BATCH, LENGTH, STEPS = 8, 10, 3


def sharded_training_losses() -> list[float]:
    """AdamW steps of a next-token loss on a (data, tensor, expert) = (2, 2, 2) mesh over every process's
    devices; this process loads only its rows of the global batch."""
    import jax
    import jax.numpy as jnp
    import optax

    from nemojax import distributed, sharding
    from nemojax.config import from_hf_config
    from nemojax.model import NemotronH, init_variables

    cfg = from_hf_config(SMALL)
    model = NemotronH(cfg)
    mesh = sharding.make_mesh(data=2, tensor=2, expert=2)
    variables = sharding.shard_variables(jax.jit(lambda k: init_variables(cfg, k))(jax.random.key(0)), cfg, mesh)
    all_ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (BATCH, LENGTH), dtype=np.int32)
    ids = distributed.global_batch(mesh, all_ids[distributed.local_batch_rows(mesh, BATCH)], BATCH)
    tx = optax.adamw(1e-2)

    def loss_fn(params, ids):
        logits = model.apply({"params": params, "buffers": variables["buffers"]}, ids[:, :-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]))

    @jax.jit
    def step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return loss, optax.apply_updates(params, updates), opt_state

    losses = []
    with sharding.use_mesh(mesh):
        params = variables["params"]
        opt_state = jax.jit(tx.init)(params)
        for _ in range(STEPS):
            loss, params, opt_state = step(params, opt_state, ids)
            losses.append(float(loss))
    return losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process():
    import jax

    assert jax.process_count() == 1 and jax.device_count() == 8
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    workers = [subprocess.Popen([sys.executable, __file__, "--coordinator-address", f"localhost:{port}",
                                 "--num-processes", "2", "--process-id", str(i)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    expected = sharded_training_losses()
    results = []
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["process_count"] == 2 and r["device_count"] == 8 and r["local_device_count"] == 4
        assert r["rows"][1] - r["rows"][0] == BATCH // 2
        np.testing.assert_allclose(r["losses"], expected, rtol=1e-5)
    assert sorted(r["rows"][0] for r in results) == [0, BATCH // 2]
    assert expected[-1] < expected[0]


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


def _worker() -> None:
    from nemojax import distributed

    args = distributed.add_distributed_flags(argparse.ArgumentParser()).parse_args()
    assert distributed.initialize(args)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from nemojax import sharding

    rows = distributed.local_batch_rows(sharding.make_mesh(data=2, tensor=2, expert=2), BATCH)
    losses = sharded_training_losses()
    print(json.dumps(dict(process_count=jax.process_count(), device_count=jax.device_count(),
                          local_device_count=jax.local_device_count(), rows=[rows.start, rows.stop],
                          losses=losses)))


if __name__ == "__main__":
    _worker()
