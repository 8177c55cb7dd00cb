"""The expert-parallel row exchange of dropless MoE layers: bounded all-to-all against the gather fallback.

`python -m bench.moe_exchange [--devices=8] [--tokens=2048] [--d_model=256] [--d_ff=512] [--experts=32]` runs
`common.nn.moe.exchange` under `shard_map` on an `expert` axis of `--devices` devices (simulated on a CPU:
`--xla_force_host_platform_device_count` is set when JAX has not started yet), top-2 rows of `--tokens` tokens
per shard to uniformly drawn experts, fwd+bwd, each branch forced: the all-to-all with buffers of
ceil(slack * R / ep) rows per destination, and the gather of every shard's tokens and rows with the
reduce-scatter back (the path before the exchange). Prints the median milliseconds and the values each shard
sends per call (forward), and writes bench/results/moe_exchange.json. On simulated CPU devices the
collectives are memory copies, so the times there measure the work each branch does around them
(the gather runs ep * R rows through the grouped matmul, the all-to-all slack * R).
"""
import json
import math
import os
import sys

if "jax" not in sys.modules:  # simulated devices; must precede JAX's start
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from bench.timing import median_seconds
from common import sharding
from common.cli import ArgumentParser
from common.config import run_main
from common.nn.moe import exchange


def main():
  p = ArgumentParser(prog="python -m bench.moe_exchange", description=__doc__)
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--tokens", type=int, default=2048, help="tokens per shard")
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--d_ff", type=int, default=512)
  p.add_argument("--experts", type=int, default=32)
  p.add_argument("--slack", type=float, default=exchange.EXCHANGE_SLACK)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="bench/results/moe_exchange.json")
  a = p.parse_args()
  ep, t, k, d = a.devices, a.tokens, 2, a.d_model
  if len(jax.devices()) < ep or a.experts % ep:
    raise SystemExit(f"error: --devices={ep} needs that many devices (have {len(jax.devices())}) and must divide "
                     f"--experts={a.experts}")
  mesh = sharding.make_mesh((ep,), ("expert",), devices=jax.devices()[:ep])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(ep * t, d)), jnp.float32)
  token = jnp.asarray(np.tile(np.repeat(np.arange(t), k), ep))
  expert = jnp.asarray(rng.integers(0, a.experts, size=ep * t * k))
  gate_up = jnp.asarray(rng.normal(size=(a.experts, d, 2, a.d_ff)) / math.sqrt(d), jnp.float32)
  down = jnp.asarray(rng.normal(size=(a.experts, a.d_ff, d)) / math.sqrt(a.d_ff), jnp.float32)
  n_rows = t * k
  per_dest = min(n_rows, math.ceil(a.slack * n_rows / ep))
  dest = np.asarray(expert).reshape(ep, -1) // (a.experts // ep) + ep * np.arange(ep)[:, None]
  counts = np.bincount(dest.reshape(-1), minlength=ep * ep).reshape(ep, ep)  # [source, destination]
  if counts.max() > per_dest:
    raise SystemExit(f"error: the drawn rows overflow buffers of {per_dest} rows; raise --slack")
  branches = {
      "all_to_all": lambda *v: exchange._all_to_all_rows(*v, "auto", "expert", per_dest),
      "gather": lambda *v: exchange._gathered_rows(*v, "auto", "expert"),
  }
  sent = {"all_to_all": 2 * ep * per_dest * (d + 1), "gather": ep * t * (d + 2 * k) + ep * n_rows * d}
  rows = {}
  for name, branch in branches.items():
    fn = jax.shard_map(branch, mesh=mesh, in_specs=(P("expert"),) * 5, out_specs=P("expert"))
    grad = jax.jit(jax.grad(lambda x, gu, dn: jnp.sum(fn(x, token, expert, gu, dn) ** 2), argnums=(0, 1, 2)))
    seconds, _ = median_seconds(grad, x, gate_up, down, repeats=a.repeats)
    rows[name] = dict(ms=1e3 * seconds, values_sent_per_shard=sent[name])
  print(f"{jax.devices()[0].platform} x{ep}: {t} tokens/shard, top-{k} of {a.experts} experts, d {d}, ffn {a.d_ff}, "
        f"slack {a.slack} ({per_dest} rows per destination, most used {counts.max()}), fwd+bwd")
  print(f"{'branch':>11} {'ms':>9} {'values sent / shard':>20}")
  for name, r in rows.items():
    print(f"{name:>11} {r['ms']:9.1f} {r['values_sent_per_shard']:20,d}")
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(dict(config=vars(a), device=jax.devices()[0].device_kind, results=rows), f, indent=1)


if __name__ == "__main__":
  run_main(main)
