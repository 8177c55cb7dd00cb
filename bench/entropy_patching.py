"""Speed of entropy patching (BLT Sec. 2.3) on batch 4 x 2048 x 260 logits: the jnp reference and, on a GPU,
the compiled Pallas kernel.

`python -m bench.entropy_patching [--repeats=20] [--batch=4 --length=2048 --vocab=260]` times the whole op
(entropies, starts, patch ids) after compilation for f32 and bf16 logits, with the global rule and with the
monotonic rule plus a maximum patch length; prints a table and writes bench/results/entropy_patching.json.
The op reads the logits once, so the logits' bytes over the time is its effective bandwidth.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp

from bench.timing import median_seconds
from common.cli import ArgumentParser
from common.config import run_main
from common.kernels.entropy_patching import entropy_patching

RULES = (("global", False, 0), ("monotonic, max 8", True, 8))


def time_op(logits: jax.Array, impl: str, *, monotonic: bool, max_patch_length: int, repeats: int) -> dict:
  """Median wall time of the jitted op (compilation and one warm-up run excluded)."""
  op = jax.jit(lambda x, th: entropy_patching(x, th, monotonic=monotonic, max_patch_length=max_patch_length,
                                              impl=impl))
  threshold = jnp.float32(0.3 if monotonic else 4.0)
  t0 = time.perf_counter()
  jax.block_until_ready(op(logits, threshold))
  compile_s = time.perf_counter() - t0
  step_s = median_seconds(op, logits, threshold, repeats=repeats)[0]
  return dict(impl=impl, dtype=str(logits.dtype), monotonic=monotonic, max_patch_length=max_patch_length,
              ms=step_s * 1e3, gb_per_s=logits.nbytes / step_s / 1e9, compile_s=compile_s)


def main():
  p = ArgumentParser(prog="python -m bench.entropy_patching", description=__doc__)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--length", type=int, default=2048)
  p.add_argument("--vocab", type=int, default=260)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--out", default="bench/results/entropy_patching.json")
  args = p.parse_args()
  impls = ["reference"] + (["pallas"] if jax.default_backend() == "gpu" else [])
  key_logits, key_scale = jax.random.split(jax.random.key(0))
  shape = (args.batch, args.length, args.vocab)
  logits32 = jax.random.normal(key_logits, shape) * jax.random.uniform(key_scale, shape[:2] + (1,), maxval=4.0)
  rows = []
  for dtype in (jnp.float32, jnp.bfloat16):
    logits = logits32.astype(dtype)
    for name, monotonic, max_len in RULES:
      for impl in impls:
        rows.append(dict(rule=name, **time_op(logits, impl, monotonic=monotonic, max_patch_length=max_len,
                                             repeats=args.repeats)))
  device = jax.devices()[0]
  print(f"entropy patching of {args.batch} x {args.length} x {args.vocab} logits on {device.device_kind} "
        f"({jax.default_backend()}); median of {args.repeats}")
  print(f"{'impl':<10}{'dtype':<10}{'rule':<18}{'ms':>9}{'GB/s':>9}{'compile s':>11}")
  for r in rows:
    print(f"{r['impl']:<10}{r['dtype']:<10}{r['rule']:<18}{r['ms']:>9.3f}{r['gb_per_s']:>9.1f}"
          f"{r['compile_s']:>11.1f}")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(shape=shape, device=device.device_kind, backend=jax.default_backend(), results=rows), f,
              indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  run_main(main)
