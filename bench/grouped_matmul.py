"""Speed of the grouped matmul formulations on this backend, and of a dropless MoE layer step.

`python -m bench.grouped_matmul [--tokens=8192] [--d_model=512] [--d_ff=2048] [--experts=8] [--top_k=2]
[--repeats=3] [--tiles=256:32,512:64,1024:128]` times one jitted fwd+bwd (gradients w.r.t. input and weights)
of the experts' SwiGLU over tokens x top_k rows sorted by expert (group sizes from a random top-k router), with
each grouped matmul formulation: `ragged_dot` (the reference), the one-hot formulation (each row's input
placed in its expert's block of a [rows, E * d] matrix, one dense product against the stacked weights: E
times the FLOPs in one large GEMM), and `xla_tiles` at several tile sizes; then an MoE layer step (router,
sort, experts, unsort; capacity and dropless with impl='auto'); each against a dense SwiGLU with the same
active FLOPs (d_ff = top_k x the experts'). Last, a MoMa layer step (`common.nn.moe.modality_groups`: E/2 text +
E/2 image expert-choice experts, capacity factor 1, half the tokens of each modality) and the same experts as
one mixed-modal expert-choice group, against a dense SwiGLU as wide as one expert (expert choice with capacity
factor 1 runs each token through one expert on average: equal active FLOPs, up to the router). Prints the table
and writes bench/results/grouped_matmul.json.
The Pallas kernel in interpret mode is no speed figure, so it is not timed here; on a GPU use
`common.kernels.grouped_matmul.self_check(impl='pallas')`.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.timing import ffn_grad_step, median_seconds
from common.cli import ArgumentParser
from common.config import run_main
from common.kernels.grouped_matmul import grouped_matmul, reference
from common.nn import SwiGLU
from common.nn.moe import MoE, MoESettings
from common.nn.moe.modality_groups import GroupSettings, ModalityExperts


def onehot_gmm(lhs, rhs, group_sizes):
  """[m, k] -> [m, E * k] with row i's values in its group's block, @ rhs [E * k, n]."""
  starts, ends = reference.group_bounds(group_sizes)
  rows = jnp.arange(lhs.shape[0])
  member = ((rows[:, None] >= starts) & (rows[:, None] < ends)).astype(lhs.dtype)  # [m, E]
  spread = (member[:, :, None] * lhs[:, None, :]).reshape(lhs.shape[0], -1)
  return spread @ rhs.reshape(-1, rhs.shape[-1])


def expert_ffn(gmm):
  """SwiGLU experts over sorted rows with a given grouped matmul; fwd+bwd of a scalar of the output."""
  def loss(x, gate_up, down, group_sizes):
    e, d, _, f = gate_up.shape
    h = gmm(x, gate_up.reshape(e, d, 2 * f), group_sizes).reshape(x.shape[0], 2, f)
    y = gmm(jax.nn.silu(h[:, 0]) * h[:, 1], down, group_sizes)
    return jnp.sum(y ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def modality_grad_step(layer: ModalityExperts, modality: jax.Array):
  """`bench.timing.ffn_grad_step` for a modality-grouped layer, the modality of each token fixed."""
  graphdef, params = nnx.split(layer, nnx.Param)

  def loss(p, x):
    y = nnx.merge(graphdef, p).apply(x, modality)[0]
    return jnp.sum(y.astype(jnp.float32) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def main():
  p = ArgumentParser(prog="python -m bench.grouped_matmul", description=__doc__)
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--d_ff", type=int, default=2048)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--tiles", default="256:32,512:64,1024:128", help="xla_tiles (big:small) row tiles to time")
  p.add_argument("--formulations", default="ragged_dot,onehot")
  p.add_argument("--out", default="bench/results/grouped_matmul.json")
  a = p.parse_args()
  t, d, f, e, k = a.tokens, a.d_model, a.d_ff, a.experts, a.top_k
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (t, d), jnp.float32)
  experts = jax.random.randint(keys[1], (t * k,), 0, e)
  group_sizes = jnp.bincount(experts, length=e).astype(jnp.int32)
  rows = x[jnp.argsort(experts, stable=True) // k]  # [t * k, d] sorted by expert
  gate_up = jax.random.normal(keys[2], (e, d, 2, f), jnp.float32) / np.sqrt(d)
  down = jax.random.normal(keys[3], (e, f, d), jnp.float32) / np.sqrt(f)

  dense = SwiGLU(d, k * f, rngs=nnx.Rngs(params=0))
  step, params = ffn_grad_step(dense)
  dense_seconds = median_seconds(step, params, x, repeats=a.repeats)[0]
  results = {"experts": {"dense": dict(seconds=dense_seconds)}, "layer": {"dense": dict(seconds=dense_seconds)}}
  gmms = {"ragged_dot": reference.gmm, "onehot": onehot_gmm}
  variants = {name: gmms[name] for name in a.formulations.split(",") if name}
  for spec in a.tiles.split(","):
    tiling = tuple(int(v) for v in spec.split(":"))
    variants[f"xla_tiles {spec}"] = lambda l, r, s, tiling=tiling: grouped_matmul(l, r, s, impl="xla_tiles",
                                                                                  tiling=tiling)
  for name, gmm in variants.items():
    results["experts"][name] = dict(seconds=median_seconds(expert_ffn(gmm), rows, gate_up, down, group_sizes,
                                                           repeats=a.repeats)[0])
  for mode in ("capacity", "dropless"):
    layer = MoE(d, f, MoESettings(e, top_k=k, mode=mode, capacity_factor=1.0), rngs=nnx.Rngs(params=0))
    step, params = ffn_grad_step(layer)
    results["layer"][f"moe {mode}"] = dict(seconds=median_seconds(step, params, x, repeats=a.repeats)[0])
  step, params = ffn_grad_step(SwiGLU(d, f, rngs=nnx.Rngs(params=0)))
  results["moma"] = {"dense": dict(seconds=median_seconds(step, params, x, repeats=a.repeats)[0])}
  modality = jnp.arange(t) % 2  # half text, half image
  for name, groups in ((f"moma {e // 2}t{e - e // 2}i", (e // 2, e - e // 2)), (f"ec mixed {e}", (e,))):
    layer = ModalityExperts(d, f, GroupSettings(groups), rngs=nnx.Rngs(params=0))
    step, params = modality_grad_step(layer, modality)
    results["moma"][name] = dict(seconds=median_seconds(step, params, x, repeats=a.repeats)[0])

  print(f"{jax.devices()[0].platform}: {t} tokens, d {d}, E={e} top-{k} ffn {f} vs dense ffn {k * f}, fwd+bwd; "
        f"group sizes {np.asarray(group_sizes).tolist()}")
  for part, rows_ in results.items():
    print(f"{part:>8}: {'formulation':>22} {'ms':>9} {'x dense':>8}"
          + (f"   (dense ffn {f}, equal active FLOPs)" if part == "moma" else ""))
    for name, r in rows_.items():
      r["ratio"] = r["seconds"] / rows_["dense"]["seconds"]
      print(f"{'':>8}  {name:>22} {1e3 * r['seconds']:9.1f} {r['ratio']:8.2f}")
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as fh:
    json.dump(dict(config=vars(a), device=jax.devices()[0].device_kind, group_sizes=np.asarray(group_sizes).tolist(),
                   results=results), fh, indent=1)


if __name__ == "__main__":
  run_main(main)
