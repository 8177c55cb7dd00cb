"""Speed of an MoE FFN layer against a dense FFN with the same active FLOPs.

`python -m bench.moe_layer [--tokens=8192] [--d_model=512] [--d_ff=2048] [--experts=8] [--repeats=5]` times
fwd+bwd (gradients w.r.t. parameters and input) of the MoE layer (top-2, capacity factor 1, and dropless)
and of a SwiGLU with d_ff = 2 x the experts' (the FLOPs of two active experts), jitted, on one device; prints
the ratios and writes bench/results/moe_layer.json. Target on a CPU: ratio <= 1.3 in both modes. Dropless
runs `common.kernels.grouped_matmul` ('auto': row tiles of one dense product each on CPU, the Pallas kernel
on GPU; `model.moe.grouped_impl` forces one); the implementations are compared in `bench.grouped_matmul`.
"""
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from common.cli import ArgumentParser
from common.config import run_main
from common.nn import SwiGLU
from bench.timing import ffn_grad_step, median_seconds
from common.nn.moe import MoE, MoESettings


def time_fwd_bwd(module, x, repeats: int) -> float:
  """Median seconds of one jitted forward + backward."""
  step, params = ffn_grad_step(module)
  return median_seconds(step, params, x, repeats=repeats)[0]


def main():
  p = ArgumentParser(prog="python -m bench.moe_layer", description=__doc__)
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--d_ff", type=int, default=2048)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--modes", default="capacity,dropless")
  p.add_argument("--out", default="bench/results/moe_layer.json")
  a = p.parse_args()
  x = jax.random.normal(jax.random.key(0), (a.tokens, a.d_model), jnp.float32)
  dense = SwiGLU(a.d_model, a.top_k * a.d_ff, rngs=nnx.Rngs(params=0))
  rows = {"dense": dict(seconds=time_fwd_bwd(dense, x, a.repeats), d_ff=a.top_k * a.d_ff)}
  for mode in a.modes.split(","):
    layer = MoE(a.d_model, a.d_ff, MoESettings(a.experts, top_k=a.top_k, mode=mode, capacity_factor=1.0),
                rngs=nnx.Rngs(params=0))
    rows[mode] = dict(seconds=time_fwd_bwd(layer, x, a.repeats))
  base = rows["dense"]["seconds"]
  print(f"{jax.devices()[0].platform}: {a.tokens} tokens, d {a.d_model}, E={a.experts} top-{a.top_k} ffn {a.d_ff} "
        f"vs dense ffn {a.top_k * a.d_ff}, fwd+bwd")
  print(f"{'layer':>10} {'ms':>9} {'ratio':>7}")
  for name, r in rows.items():
    r["ratio"] = r["seconds"] / base
    print(f"{name:>10} {1e3 * r['seconds']:9.1f} {r['ratio']:7.2f}")
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(dict(config=vars(a), device=jax.devices()[0].device_kind, results=rows), f, indent=1)


if __name__ == "__main__":
  run_main(main)
