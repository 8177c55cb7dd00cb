"""Multi-host / multi-process start-up: `jax.distributed.initialize` from flags or the environment.

On TPU pods and SLURM/Open MPI GPU clusters JAX finds the coordinator itself; elsewhere (several processes on
one machine, a plain GPU node) pass `--coordinator_address=host:port --num_processes=N --process_id=i`, or set
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
"""
from __future__ import annotations

import os

import jax

from common.config import ConfigError

FLAGS = {"coordinator_address": "host:port of process 0 (multi-process runs JAX does not set up itself)",
         "num_processes": "how many processes the run has", "process_id": "this process's index, 0-based"}


def _use_gloo_on_cpu() -> None:
  """Cross-process collectives on the CPU backend need an implementation chosen before the backend starts
  (`jax_cpu_collectives_implementation`: 'gloo' over TCP). JAX 0.10 defaults to gloo, older releases to
  none (a multi-process CPU run then fails at its first collective), so it is set explicitly. A choice made in
  the environment (JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi) is kept; GPU/TPU backends ignore the option."""
  if os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    return
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:  # a JAX without the option (it has no CPU cross-process collectives either)
    pass


def _use_preemption_service() -> None:
  """JAX's preemption sync manager, which `jax.distributed.initialize` starts when this option is on (its
  default): the trainer learns from it at which step every process stops on SIGTERM
  (`common.train.loop`), so it is switched on even where the environment switched it off."""
  jax.config.update("jax_enable_preemption_service", True)


def initialize(flags: dict[str, str] | None = None) -> bool:
  """Initialises jax.distributed when asked to; returns whether it did. Call before any other JAX use."""
  flags = flags or {}
  addr = flags.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
  n = flags.get("num_processes") or os.environ.get("JAX_NUM_PROCESSES")
  pid = flags.get("process_id") or os.environ.get("JAX_PROCESS_ID")
  auto = os.environ.get("JAX_DISTRIBUTED_AUTO") == "1"  # TPU pod / SLURM: let JAX discover everything
  if auto:
    _use_gloo_on_cpu()
    _use_preemption_service()
    try:
      jax.distributed.initialize()
    except ValueError as e:  # no TPU pod, SLURM or Open MPI environment for JAX to read the cluster from
      raise ConfigError(f"JAX_DISTRIBUTED_AUTO=1 but JAX found no cluster here ({e}); unset it, or pass "
                        "--coordinator_address, --num_processes and --process_id") from None
    return True
  if not (addr or n or pid):
    return False
  if not (addr and n and pid is not None):
    raise ConfigError("--coordinator_address, --num_processes and --process_id must be given together "
                      f"(got address={addr!r}, num_processes={n!r}, process_id={pid!r})")
  try:
    n, pid = int(n), int(pid)
  except ValueError:
    raise ConfigError(f"--num_processes and --process_id must be integers, got {n!r}, {pid!r}") from None
  if not 0 <= pid < n:
    raise ConfigError(f"--process_id {pid} is outside 0..{n - 1}")
  _use_gloo_on_cpu()
  _use_preemption_service()
  jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)
  return True
