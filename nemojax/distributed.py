"""Several hosts through JAX's multi-controller runtime: command-line flags, start-up, global batches.

Every process runs the same program. `initialize(args)` joins them (explicit flags, or JAX's own
detection on SLURM/Open MPI/... clusters; nothing on a single machine). Afterwards `jax.devices()`
lists every process's devices, a mesh spans them all, and each process feeds only its own rows of
the global batch (`local_batch_rows`, `global_batch`). `agree(value)` hands process 0's decision to
every process, so that all of them stop at the same point.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
from jax.sharding import Mesh

from nemojax.errors import ConfigError
from nemojax.sharding import batch_sharding

# Environment variables whose presence means a launcher started several processes that JAX can join.
_CLUSTER_MARKERS = ("JAX_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE", "JOBSET_NAME")


def add_distributed_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --coordinator-address HOST:PORT, --num-processes N, --process-id I."""
    group = parser.add_argument_group("several hosts (jax.distributed)")
    group.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                       help="address of process 0's coordinator; set on every process")
    group.add_argument("--num-processes", type=int, default=None, metavar="N", help="number of processes")
    group.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's index, 0..N-1")
    return parser


def cluster_detected(environ: dict[str, str] | None = None) -> bool:
    """True under a multi-process launcher that `jax.distributed.initialize()` can read (SLURM with
    more than one task, Open MPI, JobSet, or JAX_COORDINATOR_ADDRESS)."""
    env = os.environ if environ is None else environ
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    return any(name in env for name in _CLUSTER_MARKERS)


def initialize(args: argparse.Namespace) -> bool:
    """Join the other processes; returns True when running multi-process.

    With --coordinator-address (and --num-processes, --process-id) the runtime starts explicitly;
    otherwise only when `cluster_detected()`, letting JAX read the cluster's settings. On CPU the
    collectives go through gloo, with synchronous dispatch: each process then runs its programs one at
    a time in the order it dispatched them, so two programs' collectives never interleave differently on
    different processes (with async dispatch, jax 0.12's CPU runtime could deadlock that way). Must run
    before anything touches a device.
    """
    address = getattr(args, "coordinator_address", None)
    num = getattr(args, "num_processes", None)
    pid = getattr(args, "process_id", None)
    explicit = (address, num, pid)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ConfigError("--coordinator-address, --num-processes and --process-id must be given together")
        if ":" not in address:
            raise ConfigError(f"--coordinator-address {address!r}: expected HOST:PORT")
        if num < 1 or not 0 <= pid < num:
            raise ConfigError(f"--process-id {pid} must be in 0..{num - 1} (--num-processes {num})")
        _cpu_collectives()
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
        return num > 1
    if cluster_detected():
        _cpu_collectives()
        jax.distributed.initialize()
        return jax.process_count() > 1
    return False


def _cpu_collectives() -> None:
    """CPU devices of several processes: gloo collectives, programs run in dispatch order (see `initialize`)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_cpu_enable_async_dispatch", False)


def agree(value: int) -> int:
    """Process 0's `value` on every process (a collective: every process must call it at the same point);
    on one process the value itself. Values must fit in int32."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def local_batch_rows(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of the global [B, ...] batch that this process must load (contiguous)."""
    sharding = batch_sharding(mesh, global_batch_size)
    indices = sharding.addressable_devices_indices_map((global_batch_size, 1)).values()
    starts = sorted({idx[0].indices(global_batch_size)[:2] for idx in indices})
    lo, hi = starts[0][0], max(stop for _, stop in starts)
    covered = sum(stop - start for start, stop in starts)
    if covered != hi - lo:
        raise ConfigError(f"this process's batch rows are not contiguous on mesh {dict(mesh.shape)}")
    return slice(lo, hi)


def global_batch(mesh: Mesh, local_rows: np.ndarray, global_batch_size: int) -> jax.Array:
    """One global [B, ...] array, sharded like `batch_sharding`, from this process's rows
    (`local_rows = full_batch[local_batch_rows(mesh, B)]`)."""
    sharding = batch_sharding(mesh, global_batch_size)
    shape = (global_batch_size,) + tuple(local_rows.shape[1:])
    return jax.make_array_from_process_local_data(sharding, np.asarray(local_rows), shape)
