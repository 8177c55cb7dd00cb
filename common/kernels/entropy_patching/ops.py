"""`entropy_patching`: the one entry point (`entropies` is its first output alone), which picks the Pallas
kernel or the jnp reference and runs it under any mesh (batch rows split over the data-parallel axes with
`jax.shard_map`; every row is independent, so the split changes nothing but placement).

Patching is not differentiable (BLT trains its entropy model separately, Pagnoni et al. 2024, Sec. 2.3):
the logits enter under `stop_gradient`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from common.kernels.entropy_patching import kernel, reference

IMPLS = ("auto", "pallas", "interpret", "reference")


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """'auto' -> 'pallas' on GPU (the Triton kernel), 'reference' elsewhere. The compiled kernel is Triton
  only: the Mosaic TPU lowering has no masked loads and wants (8, 128)-aligned blocks, so TPU runs the
  reference."""
  if impl not in IMPLS:
    raise ValueError(f"unknown entropy-patching impl '{impl}' (known: {', '.join(IMPLS)})")
  platform = platform or jax.default_backend()
  if impl == "auto":
    return "pallas" if platform == "gpu" else "reference"
  if impl == "pallas" and platform != "gpu":
    raise ValueError(f"impl='pallas' compiles a Triton kernel for GPU, this backend is '{platform}' "
                     "(use 'interpret' or 'reference')")
  return impl


def _batch_axes(mesh, batch: int) -> tuple[str, ...]:
  """The mesh axes that the 'batch' logical axis maps to, as far as their sizes divide `batch`."""
  from common.sharding import RULES  # only under a mesh: the single-device path needs no config packages
  axes: list[str] = []
  for axis in RULES["batch"]:
    size = mesh.shape.get(axis, 1)
    if size > 1 and batch % (math.prod(mesh.shape[a] for a in axes) * size) == 0:
      axes.append(axis)
  return tuple(axes)


def entropy_patching(logits: jax.Array, threshold, *, monotonic: bool = False, max_patch_length: int = 0,
                     extra_starts: jax.Array | None = None, impl: str = "auto",
                     mesh=None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Entropy patches from the entropy model's logits [batch, length, vocab] (f32 or bf16).

  Returns (entropies f32, starts bool, patch_ids int32), each [batch, length]: H(t) in nats of the
  prediction at t (of byte t+1); starts by the global rule (start[t+1] = H(t) > threshold) or the monotonic
  one (start[t+1] = H(t) - H(t-1) > threshold, t >= 1), start[0] = True, or-ed with `extra_starts` (bool
  [batch, length], e.g. where packed documents begin), then the starts forced by `max_patch_length` (> 0);
  patch_ids = cumsum(starts) - 1. `impl`: 'auto' (kernel on GPU, reference elsewhere), 'pallas',
  'interpret' (the kernel in the Pallas interpreter) or 'reference'. `mesh`: the mesh to split the batch
  over; default the one set with `jax.set_mesh`, if any."""
  impl = resolve_impl(impl)
  options = dict(monotonic=monotonic, max_patch_length=max_patch_length)
  if impl != "reference":
    options["interpret"] = impl == "interpret"
  patching = reference.entropy_patching if impl == "reference" else kernel.entropy_patching
  body = lambda x, th, extra=None: patching(x, th, extra_starts=extra, **options)
  args = (jax.lax.stop_gradient(logits), jnp.asarray(threshold, jnp.float32))
  args += () if extra_starts is None else (jnp.asarray(extra_starts, bool),)
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return body(*args)
  rows = _batch_axes(mesh, logits.shape[0]) or None
  in_specs = (P(rows, None, None), P(), P(rows, None))[:len(args)]
  # check_vma=False: pallas_call outputs carry no varying-axes annotation; every output is per row.
  sharded = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(P(rows, None),) * 3, check_vma=False)
  return sharded(*args)


def entropies(logits: jax.Array, *, impl: str = "auto", mesh=None) -> jax.Array:
  """H(t) in nats, f32 [batch, length], of logits [batch, length, vocab]: the first output of
  `entropy_patching` (no threshold enters it), for callers that decide the patches elsewhere (BLT's entropy
  scorer and cached generation). -inf logits are ids of probability 0, e.g. a padded vocabulary's columns."""
  return entropy_patching(logits, 0.0, impl=impl, mesh=mesh)[0]
