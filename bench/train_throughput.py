"""Training throughput and MFU of the dense LM (d 512, 8 layers, seq 512, batch 8, f32 on CPU).

`python -m bench.train_throughput [--steps=8] [--config=common/configs/dense_bench.py]` times the real jitted
training step (the trainer's own `make_train_step`) on one device and on a (2,) data mesh, against this
machine's measured f32 matmul peak, prints a table and writes bench/results/train_throughput.json.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import json
import time

import jax
import numpy as np

from common.cli import ArgumentParser
from common.config import run_main
from common import config as config_lib, sharding
from common.flops import machine_peak_flops, training_flops_per_token
from common.tasks.lm import lm_task, resolve
from common.train.optim import learning_rate_schedule, make_optimizer
from common.train.loop import init_train_state
from common.train.step import make_train_step


def time_steps(cfg, task, devices, steps: int) -> dict:
  """Median wall time of `steps` training steps (after compilation) on a data mesh over `devices`."""
  mesh = sharding.make_mesh((len(devices),), ("data",), devices=devices)
  optimizer, schedule = make_optimizer(cfg.train), learning_rate_schedule(cfg.train)
  graphdef, _, state = init_train_state(task, optimizer, mesh)
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  host = [task.data.train_batch(i * cfg.train.batch_size) for i in range(steps + 2)]
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in host[0].items()}
  batches = [{k: jax.device_put(v, batch_sh[k]) for k, v in b.items()} for b in host]
  step = jax.jit(make_train_step(graphdef, task.loss_fn, optimizer, schedule, cfg.train.grad_accum),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  for b in batches[:2]:  # warm-up
    state, m = compiled(state, b)
  jax.block_until_ready(state)
  times = []
  for b in batches[2:]:
    t0 = time.perf_counter()
    state, m = compiled(state, b)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  return {"step_s": float(np.median(times)), "compile_s": compile_s, "loss": float(m["loss"])}


def main():
  p = ArgumentParser(prog="python -m bench.train_throughput", description=__doc__)
  p.add_argument("--config", default="common/configs/dense_bench.py")
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--out", default="bench/results/train_throughput.json")
  args = p.parse_args()
  cfg = resolve(config_lib.load(args.config))
  task = lm_task(cfg)
  peak = machine_peak_flops(cache=False)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  flops = training_flops_per_token(cfg.model, cfg.data.seq_len) * tokens
  rows = []
  for label, devices in (("1 device", jax.devices()[:1]), ("(2,) data mesh", jax.devices()[:2])):
    r = time_steps(cfg, task, devices, args.steps)
    rows.append(dict(setting=label, tokens_per_sec=tokens / r["step_s"], model_gflops=flops / r["step_s"] / 1e9,
                     mfu=flops / r["step_s"] / peak, **r))
  m = cfg.model
  print(f"dense LM d{m.d_model} x{m.n_layers} layers, seq {cfg.data.seq_len}, batch {cfg.train.batch_size}, "
        f"{m.dtype}; {flops / 1e9:.1f} model GFLOP/step; measured f32 matmul peak {peak / 1e9:.0f} GFLOP/s")
  print(f"{'setting':<16}{'step s':>8}{'tokens/s':>10}{'GFLOP/s':>9}{'MFU':>7}{'compile s':>11}")
  for r in rows:
    print(f"{r['setting']:<16}{r['step_s']:>8.3f}{r['tokens_per_sec']:>10,.0f}{r['model_gflops']:>9.1f}"
          f"{r['mfu']:>7.1%}{r['compile_s']:>11.1f}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(config=args.config, peak_flops=peak, flops_per_step=flops, results=rows), f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  run_main(main)
