"""Device mesh, shardings and multi-host set-up.

The training batch is sharded along a single "data" mesh axis; parameters and optimiser state are
replicated. Under jit over a global batch, BatchNorm statistics are computed over the whole global
batch, i.e. averaged across devices, with no explicit collective in the model code.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment variables by which a launcher asks for a multi-process job.
_COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _multihost_requested() -> bool:
  if any(os.environ.get(v) for v in _COORDINATOR_VARS):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  # Cloud TPU VM slices list every worker of the slice.
  return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed() -> None:
  """Calls jax.distributed.initialize() when the environment describes a multi-process job."""
  if _multihost_requested() and not jax.distributed.is_initialized():
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def make_mesh(num_data: int = -1) -> Mesh:
  """A 1-D mesh over `num_data` devices (-1: all devices of all hosts)."""
  devices = jax.devices()
  n = len(devices) if num_data in (-1, 0, None) else num_data
  if n > len(devices):
    raise ValueError(f"config.mesh.data={num_data} but only {len(devices)} devices are visible")
  return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str) -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(f"{what}: global batch {global_batch} is not divisible by the {n} devices of the "
                     "mesh; change the batch size or config.mesh.data")


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's share of a step into global arrays sharded on the data axis."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def to_host(x: Any) -> Any:
  """Gathers (possibly multi-host sharded) arrays to numpy on every host."""
  if jax.process_count() == 1:
    return jax.device_get(x)
  return multihost_utils.process_allgather(x, tiled=True)
