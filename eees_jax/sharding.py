"""Device mesh, shardings and multi-host set-up.

The training batch is sharded along a single "data" mesh axis. Parameters and optimiser state are
replicated, or, with config.mesh.fsdp, their large leaves are split over the same axis
(fully-sharded data parallel): XLA's SPMD partitioner then all-gathers them where the step needs
them whole and reduce-scatters their gradients, so the step's math is unchanged while each device
holds 1/n of them.
Under jit over a global batch, BatchNorm statistics are computed over the whole global batch, i.e.
averaged across devices, with no explicit collective in the model code.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eees_jax.config_validation import ConfigError

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
  """Calls jax.distributed.initialize() when the environment describes a multi-process job.

  TPU slices, SLURM and Open MPI are detected by JAX; elsewhere set JAX_COORDINATOR_ADDRESS
  (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process. On CPU hosts the
  processes talk through JAX's gloo collectives.
  """
  if not _multihost_requested() or jax.distributed.is_initialized():
    return
  kwargs = {}
  if os.environ.get("JAX_NUM_PROCESSES") and os.environ.get("JAX_PROCESS_ID"):
    kwargs = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any (a collective: call it on all processes)."""
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray([bool(flag)], np.int32))
  return bool(np.any(flags))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing to wait for on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def make_mesh(num_data: int = -1) -> Mesh:
  """A 1-D mesh over `num_data` devices (-1: all devices of all hosts)."""
  devices = jax.devices()
  n = len(devices) if num_data in (-1, 0, None) else num_data
  if n > len(devices):
    raise ConfigError([f"mesh.data = {num_data}: at most the {len(devices)} visible devices "
                       "(-1: all of them)"])
  return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape: Sequence[int], axis_size: int, min_size: int) -> P:
  """The FSDP partition of one array of `shape`: its largest dimension divisible by `axis_size`
  (ties: the later one) split over the data axis; P() (replicated) for arrays of fewer than
  `min_size` elements, where gathering costs more than the memory saved, or when no dimension
  divides."""
  if axis_size <= 1 or math.prod(shape) < min_size:
    return P()
  divisible = [d for d in range(len(shape)) if shape[d] % axis_size == 0]
  if not divisible:
    return P()
  dim = max(divisible, key=lambda d: (shape[d], d))
  return P(*([None] * dim), DATA_AXIS)


def state_shardings(state: Any, mesh: Mesh, fsdp: bool, min_size: int,
                    sharded_fields: Sequence[str] = ("params", "opt_state")) -> Any:
  """A pytree of NamedSharding matching `state` (arrays or jax.ShapeDtypeStruct leaves).

  fsdp=False: everything replicated. fsdp=True: the leaves under the top-level fields (attribute
  or key names) in `sharded_fields` follow `fsdp_spec`, the rest (BatchNorm statistics, step, rng)
  stay replicated. The rule depends on shapes only, so Adam's moments get their parameter's
  sharding.
  """
  if min_size < 0:
    raise ValueError(f"config.mesh.fsdp_min_size={min_size} must be >= 0")
  rep = replicated(mesh)
  axis_size = mesh.shape[DATA_AXIS]

  def leaf_sharding(path, x):
    if fsdp and path and _key_name(path[0]) in sharded_fields:
      return NamedSharding(mesh, fsdp_spec(x.shape, axis_size, min_size))
    return rep

  return jax.tree_util.tree_map_with_path(leaf_sharding, state)


def _key_name(key: Any) -> Any:
  for attr in ("name", "key"):  # GetAttrKey (dataclasses), DictKey (dicts)
    if hasattr(key, attr):
      return getattr(key, attr)
  return None


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str) -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise ConfigError([f"{what}: global batch {global_batch} is not divisible by the {n} devices "
                       "of the mesh; change the batch size or config.mesh.data"])


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's share of a step into global arrays sharded on the data axis."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def to_host(x: Any) -> Any:
  """Gathers (possibly multi-host sharded) arrays to numpy on every host."""
  if jax.process_count() == 1:
    return jax.device_get(x)
  return multihost_utils.process_allgather(x, tiled=True)
