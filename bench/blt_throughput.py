"""Training throughput and MFU of a BLT (issue 3's benchmark: global d 512 x 6, local d 256, 1 encoder and 2
decoder layers, window 512, static patches of 4, rows of 2048 bytes, batch 4, hash n-grams 3..8 of 50k rows).

`python -m bench.blt_throughput [--steps=6] [--config=blt/configs/bench.py] [--patcher=static|space|entropy]
[--max_patches=N,...] [--parts]` times the real jitted training step (`blt.train.make_task`'s loss through the
trainer's `make_train_step`, AdamW and all) on one device, reports bytes/s and model FLOPs/s
(`common.flops.blt_flops`), MFU against this machine's calibrated f32 matmul peak (`machine_peak_flops`,
cached) and MFU* against the peak measured in the same run (under the same load from other processes: a rough
load-independent figure), and with `--parts` the forward+backward time of each part of the model on its own
(hash embeddings, local encoder, global transformer, local decoder with the loss) and of the optimizer update,
so the step can be read as a profile. When
`common/kernels/entropy_patching/ops.py` exists it also times the entropy-patching kernel against its
reference. Medians after compilation; on a shared machine compare figures within one run.
Writes bench/results/blt_throughput.json.

`--patcher` replaces the config's patching method. `entropy` uses `--entropy_model=DIR`, or without it the
tiny entropy model of blt/configs/entropy_tiny.py after a single training step (the BLT's cost depends on how
many patches there are, not on which bytes they hold), with θ calibrated at start-up to the config's
`patch_size`, as `blt.train` does (`model.patching.calibrate`). `--max_patches=2048,0`
times the step at each `model.patching.max_patches` in one process, a step of each in turn (so that the load
of other processes falls on all alike): with entropy patching, one slot per byte against the derived bound.
"""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blt.data import ENTROPY_METHODS, seqio_to_blt
from blt.train import make_task, resolve
from blt.patcher import patch
from common.cli import ArgumentParser
from common.config import run_main
from common import config as config_lib, sharding
from common.flops import blt_flops, machine_peak_flops
from common.train.loop import init_train_state
from common.train.optim import learning_rate_schedule, make_optimizer
from common.train.step import make_train_step


def _timed(fn, args_list, *, carry_state: bool = False) -> list[float]:
  """Seconds of each call after the first two (compile and warm-up); with `carry_state`, fn(state, x) ->
  (state, out) and the state is threaded through (donated buffers)."""
  times, state = [], None
  for i, args in enumerate(args_list):
    t0 = time.perf_counter()
    if carry_state:
      state, out = fn(state if i else args[0], args[1])
      jax.block_until_ready((state, out))
    else:
      jax.block_until_ready(fn(*args))
    if i >= 2:
      times.append(time.perf_counter() - t0)
  return times


def time_train_steps(runs: list, steps: int) -> list[dict]:
  """The trainer's jitted step on one device for each (cfg, task) of `runs`: all compiled first, then `steps` + 2
  rounds of one step of each in turn, the first two rounds not counted; median and spread of each."""
  mesh = sharding.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  prepared = []
  for cfg, task in runs:
    optimizer, schedule = make_optimizer(cfg.train), learning_rate_schedule(cfg.train)
    graphdef, _, state = init_train_state(task, optimizer, mesh)
    batches = [jax.device_put(task.data.train_batch(i * cfg.train.batch_size)) for i in range(steps + 2)]
    step = jax.jit(make_train_step(graphdef, task.loss_fn, optimizer, schedule, cfg.train.grad_accum),
                   donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    prepared.append(dict(step=compiled, state=state, batches=batches, compile_s=time.perf_counter() - t0, times=[]))
  for i in range(steps + 2):
    for run in prepared:
      t0 = time.perf_counter()
      run["state"], out = run["step"](run["state"], run["batches"][i])
      jax.block_until_ready((run["state"], out))
      if i >= 2:
        run["times"].append(time.perf_counter() - t0)
  return [dict(step_s=float(np.median(r["times"])), min_s=float(min(r["times"])), max_s=float(max(r["times"])),
               compile_s=r["compile_s"]) for r in prepared]


def _fwd_bwd(module, loss_of, *inputs):
  """A jitted (params, *inputs) -> gradients of `loss_of(module, *inputs)` w.r.t. the parameters and the
  float inputs (as the real backward pass computes both)."""
  graphdef, params = nnx.split(module, nnx.Param)
  float_args = tuple(i for i, x in enumerate(inputs) if jnp.issubdtype(x.dtype, jnp.floating))

  def loss(p, *xs):
    return loss_of(nnx.merge(graphdef, p), *xs)

  return jax.jit(jax.grad(loss, argnums=(0, *(1 + i for i in float_args)))), params


def _dot_outputs(outputs, cotangents):
  return sum(jnp.sum(o * c) for o, c in zip(outputs, cotangents))


def time_parts(cfg, task, steps: int) -> dict[str, float]:
  """Median seconds of the forward+backward of each part of the BLT, and of one AdamW update of all
  parameters (and of the hash tables alone), on one batch of the benchmark's data."""
  p = cfg.model.patching
  max_patches = int(p.max_patches)
  model = task.build_model()
  batch = task.data.train_batch(0)
  seg, pos = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["positions"])
  byte_ids = seqio_to_blt(jnp.asarray(batch["inputs"]), seg, pos)
  targets = seqio_to_blt(jnp.asarray(batch["targets"]), seg, jnp.ones_like(pos))
  patches_of = patch(byte_ids, method=p.method, max_patches=max_patches, patch_size=int(p.patch_size),
                     entropies=batch.get("entropies"), threshold=float(p.threshold),
                     max_patch_length=int(p.max_patch_length), patch_starts=batch.get("patch_starts"),
                     segment_ids=seg, positions=pos)
  patch_ids = patches_of.patch_ids
  readable = patches_of.next_patch_ids if model.grouping == "official" else patch_ids  # the decoder's grouping
  enc, glob, dec = model.local_encoder, model.global_transformer, model.local_decoder
  h, patches = jax.jit(lambda: enc(byte_ids, patch_ids, max_patches, pos, seg))()
  global_out = jax.jit(lambda: glob(patches))()
  rng = np.random.default_rng(0)
  cot = lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32)  # a fixed output cotangent
  h_cot, p_cot, g_cot = cot(h), cot(patches), cot(global_out)

  def nll(logits, targets):
    return jnp.sum(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])

  parts = {
      "hash n-gram embeddings": (enc.hash_embed, lambda e, x, s: jnp.sum(e(x, s) * h_cot), (byte_ids, seg)),
      "local encoder (with hash)": (enc, lambda e, *xs: _dot_outputs(e(*xs[:2], max_patches, *xs[2:]),
                                                                     (h_cot, p_cot)),
                                    (byte_ids, patch_ids, pos, seg)),
      "global transformer": (glob, lambda g, x: jnp.sum(g(x) * g_cot), (patches,)),
      "local decoder + loss": (dec, lambda d, hh, go, i, q, s, t: nll(d(hh, go, i, q, s), t),
                               (h, global_out, readable, pos, seg, targets)),
  }
  out = {}
  for name, (module, loss_of, inputs) in parts.items():
    fn, params = _fwd_bwd(module, loss_of, *inputs)
    out[name] = float(np.median(_timed(fn, [(params, *inputs)] * (steps + 2))))

  optimizer = make_optimizer(cfg.train)
  for name, module in (("AdamW update, all parameters", model), ("AdamW update, hash tables", enc.hash_embed)):
    params = jax.tree.map(jnp.copy, nnx.split(module, nnx.Param)[1])  # the update donates its state
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)

    def update(state, grads):
      params, opt_state = state
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (jax.tree.map(jnp.add, params, updates), opt_state), None

    state = (params, jax.jit(optimizer.init)(params))
    fn = jax.jit(update, donate_argnums=0)
    out[name] = float(np.median(_timed(fn, [(state, grads)] * (steps + 2), carry_state=True)))
  return out


def time_entropy_kernel(steps: int) -> dict | None:
  """Kernel vs reference time of `common.kernels.entropy_patching.ops.entropy_patching` on entropy-model
  logits [4, 2048, 260], or None when that module does not exist yet."""
  if importlib.util.find_spec("common.kernels.entropy_patching.ops") is None:
    return None
  from common.kernels.entropy_patching.ops import entropy_patching
  logits = jax.random.normal(jax.random.key(0), (4, 2048, 260), jnp.float32)
  out = {}
  for impl in ("pallas", "reference"):  # the compiled kernel exists for GPU only (ops.resolve_impl)
    fn = jax.jit(lambda x, impl=impl: entropy_patching(x, 2.0, impl=impl))
    try:
      out[impl] = float(np.median(_timed(fn, [(logits,)] * (steps + 2))))
    except (NotImplementedError, ValueError, RuntimeError) as e:  # no compiled kernel on this backend
      out[impl] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
  return out


def tiny_entropy_model(workdir: str) -> str:
  """`workdir` holding the entropy model of blt/configs/entropy_tiny.py after one training step (a loadable run,
  `blt.entropy.load_entropy_model`), for entropy patching without a trained entropy model."""
  from common.tasks.lm import lm_task, resolve as resolve_lm
  from common.train.loop import train
  e = config_lib.load("blt/configs/entropy_tiny.py")
  e.train.update(steps=1, warmup_steps=0)
  e.log.update(every_steps=1, progress="lines")
  e.eval.update(every_steps=1, batches=1)
  e.checkpoint.update(every_steps=1, async_save=False)
  if train(e, workdir, lm_task(resolve_lm(e)), devices=jax.devices()[:1]) != 0:
    raise SystemExit(f"the entropy model's one training step failed ({workdir})")
  return workdir


def bench_configs(args, scratch: str) -> list:
  """The resolved config of each `--max_patches` value (the config's own without it), with `--patcher`."""
  cfg = config_lib.load(args.config)
  p = cfg.model.patching
  if args.patcher:
    p.method = args.patcher
  if p.method in ENTROPY_METHODS and not p.get("entropy_model", ""):
    p.entropy_model = args.entropy_model or tiny_entropy_model(os.path.join(scratch, "entropy_model"))
    p.calibrate = True
  values = [int(v) for v in args.max_patches.split(",") if v] or [int(p.max_patches)]
  out = []
  for value in values:
    c = cfg.copy_and_resolve_references()
    c.model.patching.max_patches = value
    out.append(resolve(c))
  return out


def main():
  ap = ArgumentParser(prog="python -m bench.blt_throughput", description=__doc__)
  ap.add_argument("--config", default="blt/configs/bench.py")
  ap.add_argument("--steps", type=int, default=6)
  ap.add_argument("--patcher", choices=("static", "space", "entropy", "entropy_monotonic"),
                  help="the patching method (default: the config's)")
  ap.add_argument("--entropy_model", default="", help="entropy patching: a blt.train_entropy workdir (default: "
                  "the tiny entropy model after one step)")
  ap.add_argument("--max_patches", default="", help="comma-separated model.patching.max_patches values timed in "
                  "turns in one process (0 = derived; default: the config's)")
  ap.add_argument("--parts", action="store_true", help="also time each part of the model and the optimizer")
  ap.add_argument("--out", default="bench/results/blt_throughput.json")
  args = ap.parse_args()
  with tempfile.TemporaryDirectory(prefix="blt_throughput_") as scratch:
    cfgs = bench_configs(args, scratch)
    tasks = [make_task(c) for c in cfgs]
    peak = machine_peak_flops(cache=False)  # measured now, under the same load as the step
    calibrated = machine_peak_flops()  # the cached calibration (an idle machine, when it was first measured)
    cfg, task = cfgs[0], tasks[0]
    seq_len, batch = int(cfg.data.seq_len), int(cfg.train.batch_size)
    flops = blt_flops(cfg.model, seq_len).training * seq_len * batch
    timed = time_train_steps(list(zip(cfgs, tasks)), args.steps)
    p, m = cfg.model.patching, cfg.model
    result = dict(config=args.config, patcher=p.method, threshold=float(p.threshold), peak_flops=peak,
                  flops_per_step=flops, bytes_per_step=seq_len * batch, calibrated_peak_flops=calibrated,
                  bytes_per_sec_at_calibrated_peak=seq_len * batch * calibrated / flops, runs=[])
    theta = f" (θ {float(p.threshold):.4f} nats)" if p.method in ENTROPY_METHODS else ""
    print(f"BLT global d{m.d_global} x{m.n_layers_global}, local d{m.d_local} ({m.n_layers_encoder} enc, "
          f"{m.n_layers_decoder} dec, window {m.local_window}), {p.method} patches of {p.patch_size}{theta}, "
          f"{batch} x {seq_len} bytes; {flops / 1e9:.0f} model GFLOP/step")
    print(f"f32 matmul peak: {calibrated / 1e9:.0f} GFLOP/s calibrated (cached; 100% MFU = "
          f"{result['bytes_per_sec_at_calibrated_peak']:,.0f} bytes/s), {peak / 1e9:.0f} GFLOP/s measured now "
          "(under this run's load; MFU* is against it)")
    print(f"{'max_patches':>11}  {'step s (min-max)':<22}{'bytes/s':>9}{'GFLOP/s':>9}{'MFU':>7}{'MFU*':>7}"
          f"{'compile s':>11}")
    for c, r in zip(cfgs, timed):
      run = dict(max_patches=int(c.model.patching.max_patches), bytes_per_sec=seq_len * batch / r["step_s"],
                 model_gflops=flops / r["step_s"] / 1e9, mfu=flops / r["step_s"] / peak,
                 mfu_calibrated=flops / r["step_s"] / calibrated, **r)
      result["runs"].append(run)
      print(f"{run['max_patches']:>11}  {r['step_s']:.3f} ({r['min_s']:.2f}-{r['max_s']:.2f}){'':<4}"
            f"{run['bytes_per_sec']:>9,.0f}{run['model_gflops']:>9.1f}{run['mfu_calibrated']:>7.1%}"
            f"{run['mfu']:>7.1%}{r['compile_s']:>11.1f}")
    if len(timed) > 1:
      print("bytes/s against the first: " + ", ".join(
          f"max_patches {r['max_patches']}: x{r['bytes_per_sec'] / result['runs'][0]['bytes_per_sec']:.2f}"
          for r in result["runs"][1:]))
    if args.parts:
      parts = time_parts(cfg, task, args.steps)
      result["parts_s"] = parts
      print(f"{'part (fwd+bwd, alone)':<32}{'s':>7}{'of step':>9}")
      for name, s in parts.items():
        print(f"{name:<32}{s:>7.3f}{s / timed[0]['step_s']:>9.0%}")
  kernel = time_entropy_kernel(args.steps)
  if kernel is not None:
    result["entropy_patching_s"] = kernel
    print("entropy patching [4, 2048, 260]: " + ", ".join(
        f"{k} {v * 1e3:.2f} ms" if isinstance(v, float) else f"{k} {v}" for k, v in kernel.items()))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  run_main(main)
