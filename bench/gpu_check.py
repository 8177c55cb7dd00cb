"""The checks that need a GPU, in one run of a few minutes on a lent H100.

    python bench/gpu_check.py            # on the GPU; writes $OUT/gpu_check.json when OUT is set
    python bench/gpu_check.py --cpu_smoke  # tiny sizes, kernels interpreted, on this CPU: that it runs
    python bench/gpu_check.py --parts=entropy_patching,dense_mfu   # a subset

(a) the entropy-patching Pallas kernel compiled (Triton) against the jnp reference at awkward shapes, and
    its speed on 4 x 2048 x 260 logits; (b) `common.kernels.grouped_matmul.ops.self_check` when that module
    exists; (c) MFU of the dense LM's jitted training step in bf16 (synthetic tokens) against the
    accelerator's bf16 peak in `common.flops`. Each part runs in its own try/except, so one failure does
    not hide the others; results are printed as they come and the JSON is rewritten after every part.
Imports are inside the parts: the GPU machine lacks seqio, tensorflow and sentencepiece, and only part (c)
needs ml_collections (so flags are parsed by plain argparse, not `common.cli`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# (batch, length, vocab, block_len): lengths of 1, a partial tile, many tiles, the bench size; odd vocabs.
ENTROPY_SHAPES = ((1, 1, 260, 0), (2, 7, 260, 0), (3, 130, 260, 0), (3, 130, 260, 4), (2, 300, 260, 0),
                  (4, 2048, 260, 0), (2, 129, 1000, 0), (2, 65, 37, 0))
ENTROPY_SMOKE_SHAPES = ((1, 1, 260, 0), (2, 7, 260, 4), (2, 40, 37, 0))
# (label, model overrides, seq_len, batch): the first that compiles and fits is measured. The first is
# 0.89 B parameters, 35 GiB by `common.plan` on an H100; seq 1024 rather than 2048 halves the unrolled
# attention blocks (so the compile stays near a minute) at the same tokens per step.
MFU_MODELS = (
    ("d2048 x16 layers, seq 1024, batch 8",
     dict(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, d_ff=5632, vocab_size=32768), 1024, 8),
    ("d1024 x8 layers, seq 1024, batch 8",
     dict(d_model=1024, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=2816, vocab_size=32768), 1024, 8),
)
MFU_SMOKE_MODELS = (("d64 x2 layers, seq 64, batch 2",
                     dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=256), 64, 2),)


def check_entropy_kernel(smoke: bool) -> dict:
  """Max entropy error and flag / id disagreements of the compiled kernel against the reference. A start
  flag may legitimately differ where the entropy (difference) lies within float rounding of the threshold,
  so disagreements are reported with their distance to it ('margin')."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bench.entropy_patching import time_op
  from common.kernels.entropy_patching import kernel, reference

  impl = "interpret" if smoke else "pallas"
  cases = []
  shapes = ENTROPY_SMOKE_SHAPES if smoke else ENTROPY_SHAPES
  for n, (batch, length, vocab, block_len) in enumerate(shapes):
    k1, k2 = jax.random.split(jax.random.key(n))
    scale = jax.random.uniform(k2, (batch, length, 1), minval=0.2, maxval=6.0)
    logits32 = jax.random.normal(k1, (batch, length, vocab)) * scale
    for dtype, monotonic, max_len in ((jnp.float32, False, 0), (jnp.bfloat16, True, 5)):
      logits = logits32.astype(dtype)
      h_ref = np.asarray(reference.entropies_from_logits(logits))
      signal = np.diff(h_ref, axis=1) if monotonic else h_ref
      threshold = float(np.median(signal)) if signal.size else 0.0
      h, starts, ids = jax.block_until_ready(kernel.entropy_patching(
          logits, threshold, monotonic=monotonic, max_patch_length=max_len, block_len=block_len,
          interpret=smoke))
      _, starts_ref, ids_ref = reference.entropy_patching(logits, threshold, monotonic=monotonic,
                                                          max_patch_length=max_len)
      starts, starts_ref = np.asarray(starts), np.asarray(starts_ref)
      rule_value = np.pad(signal, ((0, 0), (2 if monotonic else 1, 0)))[:, :length]
      margins = np.abs(rule_value - threshold)[starts != starts_ref]
      ids = np.asarray(ids)
      cases.append(dict(
          shape=[batch, length, vocab], block_len=block_len, dtype=jnp.dtype(dtype).name, monotonic=monotonic,
          max_patch_length=max_len, max_abs_entropy_error=float(np.max(np.abs(np.asarray(h) - h_ref))),
          start_mismatches=int(margins.size), max_mismatch_margin=float(margins.max()) if margins.size else 0.0,
          id_mismatches=int(np.sum(ids != np.asarray(ids_ref))),
          ids_are_cumsum_of_starts=bool(np.array_equal(ids, np.cumsum(starts, axis=1) - 1))))
  ok = all(c["max_abs_entropy_error"] < 1e-4 and c["max_mismatch_margin"] < 1e-4
           and c["ids_are_cumsum_of_starts"] for c in cases)
  for c in cases:
    print(f"  {str(c['shape']):<18}{c['block_len']:>3} {c['dtype']:<9}{'mono' if c['monotonic'] else 'glob':<5}"
          f"max|dH| {c['max_abs_entropy_error']:.2e}  start diffs {c['start_mismatches']}"
          f" (margin <= {c['max_mismatch_margin']:.1e})  id diffs {c['id_mismatches']}", flush=True)

  shape = (2, 64, 260) if smoke else (4, 2048, 260)
  logits32 = jax.random.normal(jax.random.key(99), shape) * 2.0
  timings = []
  for dtype in (jnp.float32, jnp.bfloat16):
    for impl_name in ("reference", impl):
      for monotonic, max_len in ((False, 0), (True, 8)):
        timings.append(time_op(logits32.astype(dtype), impl_name, monotonic=monotonic, max_patch_length=max_len,
                               repeats=3 if smoke else 50))
  for t in timings:
    print(f"  {t['impl']:<10}{t['dtype']:<10}{'mono+max8' if t['monotonic'] else 'global':<10}"
          f"{t['ms']:>9.4f} ms{t['gb_per_s']:>9.1f} GB/s", flush=True)
  return dict(ok=ok, impl=impl, cases=cases, timing_shape=list(shape), timings=timings)


def check_grouped_matmul(smoke: bool) -> dict:
  """The grouped-matmul kernel's own check, if that kernel is in this checkout."""
  import importlib.util
  if importlib.util.find_spec("common.kernels.grouped_matmul.ops") is None:
    return dict(skipped="common.kernels.grouped_matmul.ops is not in this checkout")
  from common.kernels.grouped_matmul import ops
  result = ops.self_check(impl="interpret" if smoke else "pallas")
  print(f"  {result}", flush=True)
  return dict(result=result)


def _synthetic_batch(key, batch: int, seq_len: int, vocab: int) -> dict:
  import jax
  import jax.numpy as jnp
  tokens = jax.random.randint(key, (batch, seq_len + 1), 0, vocab, dtype=jnp.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              positions=jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len)),
              segment_ids=jnp.ones((batch, seq_len), jnp.int32), loss_mask=jnp.ones((batch, seq_len), jnp.float32))


def _next_token_loss(model, batch):
  """The LM objective as `common.train.step` wants it; `common.tasks.lm` is not imported because its
  trainer imports need tensorboard, which the GPU machine lacks."""
  import jax.numpy as jnp
  import optax
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return jnp.sum(nll * batch["loss_mask"]), jnp.sum(batch["loss_mask"]), {}


def _time_train_step(overrides: dict, seq_len: int, batch: int, steps: int) -> dict:
  """Median step time of the trainer's own jitted step (`make_train_step`) on one device, bf16 compute."""
  import jax
  import numpy as np
  from flax import nnx

  from common.configs.base import base_config, dense_model
  from common.flops import peak_flops_per_device, training_flops_per_token
  from common.models import build_model
  from common.train.optim import learning_rate_schedule, make_optimizer
  from common.train.step import init_state, make_train_step

  model_cfg = dense_model(**overrides, dtype="bfloat16", tie_embeddings=False, remat=False)
  train_cfg = base_config().train
  optimizer, schedule = make_optimizer(train_cfg), learning_rate_schedule(train_cfg)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, seed=0)), nnx.Param)
  state = jax.jit(lambda: init_state(nnx.split(build_model(model_cfg, seed=0), nnx.Param)[1], optimizer))()
  batches = [_synthetic_batch(jax.random.key(i), batch, seq_len, model_cfg.vocab_size) for i in range(2)]
  step = jax.jit(make_train_step(graphdef, _next_token_loss, optimizer, schedule), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  for i in range(2):  # warm-up
    state, metrics = compiled(state, batches[i % 2])
  jax.block_until_ready(state)
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  device = jax.devices()[0]
  flops_per_step = training_flops_per_token(model_cfg, seq_len) * seq_len * batch
  peak = peak_flops_per_device(device, "bfloat16")
  memory = (device.memory_stats() or {}) if hasattr(device, "memory_stats") else {}
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  return dict(params=int(n_params), step_s=step_s, tokens_per_sec=seq_len * batch / step_s,
              model_tflops_per_sec=flops_per_step / step_s / 1e12, peak_tflops=peak / 1e12,
              mfu=flops_per_step / step_s / peak, compile_s=compile_s, loss=float(metrics["loss"]),
              peak_memory_gib=memory.get("peak_bytes_in_use", 0) / 2 ** 30, device=device.device_kind)


def measure_dense_mfu(smoke: bool) -> dict:
  """The first model of the list that compiles and fits; the errors of those that did not."""
  attempts = []
  for label, overrides, seq_len, batch in (MFU_SMOKE_MODELS if smoke else MFU_MODELS):
    try:
      r = _time_train_step(overrides, seq_len, batch, steps=2 if smoke else 6)
    except Exception as e:  # an out-of-memory or compile failure: try the next, smaller model
      attempts.append(dict(model=label, error=f"{type(e).__name__}: {str(e)[:500]}"))
      print(f"  {label}: {attempts[-1]['error']}", flush=True)
      continue
    print(f"  {label}: {r['params'] / 1e6:.0f} M params, step {r['step_s'] * 1e3:.1f} ms, "
          f"{r['tokens_per_sec']:,.0f} tokens/s, {r['model_tflops_per_sec']:.1f} TFLOP/s of "
          f"{r['peak_tflops']:.0f} peak: MFU {r['mfu']:.1%} (compile {r['compile_s']:.0f} s, "
          f"peak memory {r['peak_memory_gib']:.1f} GiB, loss {r['loss']:.3f})", flush=True)
    return dict(model=label, seq_len=seq_len, batch=batch, **r, failed_attempts=attempts)
  raise RuntimeError(f"no model could be measured: {attempts}")


PARTS = (("entropy_patching", check_entropy_kernel), ("grouped_matmul", check_grouped_matmul),
         ("dense_mfu", measure_dense_mfu))


def main():
  p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cpu_smoke", action="store_true", help="tiny sizes on the CPU, kernels interpreted")
  p.add_argument("--out", default="", help="JSON path (default: $OUT/gpu_check.json when OUT is set)")
  p.add_argument("--parts", default=",".join(name for name, _ in PARTS), help="comma-separated parts to run")
  args = p.parse_args()
  unknown = set(args.parts.split(",")) - {name for name, _ in PARTS}
  if unknown:
    p.error(f"--parts: unknown {sorted(unknown)} (known: {', '.join(name for name, _ in PARTS)})")
  if args.cpu_smoke:
    os.environ["JAX_PLATFORMS"] = "cpu"
  out = args.out or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else "")
  import jax
  report = dict(jax_version=jax.__version__, backend=jax.default_backend(),
                devices=[d.device_kind for d in jax.devices()], smoke=args.cpu_smoke, parts={})
  print(f"jax {jax.__version__} on {report['backend']}: {report['devices']}", flush=True)
  start = time.perf_counter()
  for name, part in PARTS:
    if name not in args.parts.split(","):
      continue
    print(f"[{name}]", flush=True)
    t0 = time.perf_counter()
    try:
      result = part(args.cpu_smoke)
    except Exception as e:
      traceback.print_exc()
      result = dict(error=f"{type(e).__name__}: {e}"[:2000])
    result["seconds"] = time.perf_counter() - t0
    report["parts"][name] = result
    print(f"[{name}] {'error: ' + result['error'][:300] if 'error' in result else 'done'} "
          f"in {result['seconds']:.0f} s", flush=True)
    if out:
      os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
      with open(out, "w") as f:
        json.dump(report, f, indent=2, default=str)
  print(f"total {time.perf_counter() - start:.0f} s" + (f"; wrote {out}" if out else ""), flush=True)


if __name__ == "__main__":
  main()
