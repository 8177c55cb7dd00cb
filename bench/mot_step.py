"""Train-step time of Mixture-of-Transformers against the dense LM at the same FLOPs per token.

`python -m bench.mot_step [--d_model=512] [--n_layers=8] [--seq_len=512] [--batch=8] [--repeats=3]
[--layer_tokens=4096] [--skip_layer]` times, on rows of three modalities in contiguous runs (about 50% text,
35% image, 15% audio, as packed mixed-modal documents are):
  * model: one jitted AdamW train step (forward, backward, update; `common.train.step`) of the common dense
    LM, of the MoT code with one weight set (`model.untied=False`) and of the untied MoT (3 weight sets),
    equal shapes and so equal FLOPs per token (`common.flops`); the steps are timed in alternating rounds,
    so that load from other processes falls on both alike; the target is MoT / dense <= 1.15 on a CPU;
  * grouping: the modality grouping alone (sort of the tokens, and the row moves of a whole step: rows to
    sorted order and back around every attention, forward and backward);
  * layer: one untied SwiGLU FFN fwd+bwd with each exact formulation (grouped matmul on sorted rows with the
    sort and the moves included; masking: every modality's weights on every token, then a select; static
    per-modality buffers as large as the batch, gathered and scattered back) against a dense SwiGLU.
Prints the tables and writes bench/results/mot_step.json.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bench.timing import median_seconds
from common.cli import ArgumentParser
from common.config import run_main
from common.configs.base import base_config
from common.flops import training_flops_per_token
from common.nn.modality_routing import from_groups, group_by_modality, grouped_linear, to_groups
from common.train.optim import learning_rate_schedule, make_optimizer
from common.train.step import init_state, make_train_step
from mot.configs.base import mot_model
from mot.model import DenseWithModality
from mot.train import build_mot_model

MIX = (0.5, 0.35, 0.15)  # text, image, audio


def mixed_modality(batch: int, seq_len: int, seed: int = 0, run: int = 32) -> np.ndarray:
  """int32 [batch, seq_len]: runs of `run` positions, the runs' modalities in the MIX shares (rounded to
  whole runs), shuffled over the batch."""
  rng = np.random.default_rng(seed)
  n_runs = batch * -(-seq_len // run)
  counts = np.round(np.asarray(MIX) * n_runs).astype(int)
  counts[0] += n_runs - counts.sum()
  runs = rng.permutation(np.repeat(np.arange(len(MIX)), counts)).reshape(batch, -1)
  return np.repeat(runs, run, axis=1)[:, :seq_len].astype(np.int32)


def next_token_loss(model, batch):
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"], batch["modality"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return jnp.sum(nll), jnp.float32(nll.size), {}


def model_step(model, train_cfg):
  """(jitted train step, its initial state)."""
  graphdef, params = nnx.split(model, nnx.Param)
  optimizer, schedule = make_optimizer(train_cfg), learning_rate_schedule(train_cfg)
  step = jax.jit(make_train_step(graphdef, next_token_loss, optimizer, schedule), donate_argnums=0)
  return step, init_state(params, optimizer)


def time_alternating(steps: dict, batch: dict, repeats: int) -> dict[str, float]:
  """Median seconds per step of each (step, state), timed in `repeats` alternating rounds."""
  states = {name: s for name, (_, s) in steps.items()}
  for name, (fn, _) in steps.items():  # compile and warm up
    states[name] = jax.block_until_ready(fn(states[name], batch))[0]
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, (fn, _) in steps.items():
      seconds, (states[name], _) = median_seconds(fn, states[name], batch, repeats=1, warmup=0)
      times[name].append(seconds)
  return {name: float(np.median(t)) for name, t in times.items()}


def grouping_step(modality: jax.Array, d_model: int, qkv_width: int, n_layers: int, n_modalities: int):
  """fwd+bwd of the row moves of one MoT step without any layer: sort, then per layer q/k/v rows out of
  sorted order and the attention output back in, then the final move back."""
  def moves(x):
    g = group_by_modality(modality, n_modalities)
    batch_shape = modality.shape
    rows = to_groups(x, g)
    for _ in range(n_layers):
      qkv = from_groups(jnp.concatenate([rows] * (qkv_width // d_model), axis=-1), g, batch_shape)
      rows = rows + to_groups(qkv[..., :d_model] * 0.5, g)
    return jnp.sum(from_groups(rows, g, batch_shape) ** 2)
  return jax.jit(jax.grad(moves))


def ffn_formulations(modality: jax.Array, d: int, f: int, n_modalities: int) -> dict:
  """Exact untied SwiGLU formulations: name -> fn(x [B, L, d], gate_up [M, d, 2f], down [M, f, d]) whose
  gradient (all arguments) is timed."""
  def grouped(x, gate_up, down):
    g = group_by_modality(modality, n_modalities)
    rows = to_groups(x, g)
    gate, up = jnp.split(grouped_linear(rows, gate_up, g), 2, axis=-1)
    return from_groups(grouped_linear(jax.nn.silu(gate) * up, down, g), g, modality.shape)

  def masking(x, gate_up, down):
    onehot = jax.nn.one_hot(modality, n_modalities, dtype=x.dtype)  # [B, L, M]
    h = jnp.einsum("bld,mdf->blmf", x, gate_up)
    gate, up = jnp.split(h, 2, axis=-1)
    y = jnp.einsum("blmf,mfd->blmd", jax.nn.silu(gate) * up, down)
    return jnp.einsum("blmd,blm->bld", y, onehot)

  def static_buffers(x, gate_up, down):
    rows, flat = x.reshape(-1, d), modality.reshape(-1)
    out = jnp.zeros_like(rows)
    for m in range(n_modalities):  # a buffer of N rows per modality: its tokens first, then padding
      index = jnp.argsort(flat != m, stable=True)
      h = rows[index] @ gate_up[m]
      gate, up = jnp.split(h, 2, axis=-1)
      y = (jax.nn.silu(gate) * up) @ down[m]
      out = out.at[index].add(jnp.where((flat[index] == m)[:, None], y, 0))
    return out.reshape(x.shape)

  return {"grouped (sorted rows)": grouped, "masking (M x FLOPs)": masking,
          "static buffers (M x FLOPs)": static_buffers}


def main():
  p = ArgumentParser(prog="python -m bench.mot_step", description=__doc__)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--n_layers", type=int, default=8)
  p.add_argument("--n_heads", type=int, default=8)
  p.add_argument("--n_kv_heads", type=int, default=4)
  p.add_argument("--d_ff", type=int, default=1536)
  p.add_argument("--vocab_size", type=int, default=2048)
  p.add_argument("--seq_len", type=int, default=512)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--layer_tokens", type=int, default=4096)
  p.add_argument("--skip_layer", action="store_true", help="time only the model steps and the grouping")
  p.add_argument("--out", default="bench/results/mot_step.json")
  a = p.parse_args()
  n_mod = len(MIX)
  shapes = dict(vocab_size=a.vocab_size, d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads,
                n_kv_heads=a.n_kv_heads, d_ff=a.d_ff)
  configs = {"dense LM": mot_model(**shapes, name="dense_lm"),
             "MoT untied=False": mot_model(**shapes, untied=False, n_modalities=n_mod),
             "MoT 3 modalities": mot_model(**shapes, n_modalities=n_mod)}
  flops = {name: training_flops_per_token(c, a.seq_len) for name, c in configs.items()}
  modality = mixed_modality(a.batch, a.seq_len)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, a.vocab_size, (a.batch, a.seq_len + 1)).astype(np.int32)
  batch = jax.device_put(dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], modality=modality,
                              positions=np.tile(np.arange(a.seq_len, dtype=np.int32), (a.batch, 1)),
                              segment_ids=np.ones((a.batch, a.seq_len), np.int32)))
  train_cfg = base_config().train
  steps = {}
  for name, c in configs.items():
    model = (DenseWithModality(c, rngs=nnx.Rngs(params=0)) if c.name == "dense_lm"
             else build_mot_model(c, seed=0))
    steps[name] = model_step(model, train_cfg)
  step_seconds = time_alternating(steps, batch, a.repeats)
  dense = step_seconds["dense LM"]
  hd = a.d_model // a.n_heads
  moves = grouping_step(jnp.asarray(modality), a.d_model, (a.n_heads + 2 * a.n_kv_heads) * hd, a.n_layers, n_mod)
  x = jnp.asarray(rng.normal(size=(a.batch, a.seq_len, a.d_model)), jnp.float32)
  grouping_seconds = median_seconds(moves, x, repeats=a.repeats)[0]
  results = {"model": {name: dict(seconds=s, ratio=s / dense, train_flops_per_token=flops[name])
                       for name, s in step_seconds.items()},
             "grouping": dict(seconds=grouping_seconds, share_of_mot_step=grouping_seconds / step_seconds["MoT 3 modalities"])}

  fractions = np.bincount(modality.ravel(), minlength=n_mod) / modality.size
  print(f"{jax.devices()[0].platform}: d {a.d_model}, {a.n_layers} layers, seq {a.seq_len}, batch {a.batch}, f32; "
        f"modality shares {np.round(fractions, 3).tolist()} (text, image, audio)")
  print(f"{'train step':>28} {'ms':>9} {'x dense':>8} {'GFLOP/token':>12}")
  for name, r in results["model"].items():
    print(f"{name:>28} {1e3 * r['seconds']:9.1f} {r['ratio']:8.3f} {r['train_flops_per_token'] / 1e9:12.4f}")
  print(f"{'grouping alone (fwd+bwd)':>28} {1e3 * grouping_seconds:9.1f} "
        f"{results['grouping']['share_of_mot_step']:8.3f} of the MoT step")

  if not a.skip_layer:
    layer_mod = jnp.asarray(mixed_modality(1, a.layer_tokens, seed=2))
    d, f = a.d_model, a.d_ff
    x = jnp.asarray(rng.normal(size=(1, a.layer_tokens, d)), jnp.float32)
    gate_up = jnp.asarray(rng.normal(size=(n_mod, d, 2 * f)) / np.sqrt(d), jnp.float32)
    down = jnp.asarray(rng.normal(size=(n_mod, f, d)) / np.sqrt(f), jnp.float32)
    layers = {"dense SwiGLU": lambda x, gu, dn: (lambda h: (jax.nn.silu(h[0]) * h[1]) @ dn[0])(
        jnp.split(x @ gu[0], 2, axis=-1))}
    layers.update(ffn_formulations(layer_mod, d, f, n_mod))
    reference = None
    results["layer"] = {}
    for name, fn in layers.items():
      grad = jax.jit(jax.grad(lambda x, gu, dn, fn=fn: jnp.sum(fn(x, gu, dn) ** 2), argnums=(0, 1, 2)))
      seconds, _ = median_seconds(grad, x, gate_up, down, repeats=a.repeats)
      out = np.asarray(jax.jit(fn)(x, gate_up, down))
      if name != "dense SwiGLU":
        reference = out if reference is None else reference
      results["layer"][name] = dict(seconds=seconds, max_abs_diff_from_grouped=(
          None if name == "dense SwiGLU" else float(np.max(np.abs(out - reference)))))
    base = results["layer"]["dense SwiGLU"]["seconds"]
    print(f"{'FFN fwd+bwd, ' + str(a.layer_tokens) + ' tokens':>28} {'ms':>9} {'x dense':>8} {'max |diff|':>12}")
    for name, r in results["layer"].items():
      r["ratio"] = r["seconds"] / base
      diff = "" if r["max_abs_diff_from_grouped"] is None else f"{r['max_abs_diff_from_grouped']:12.2e}"
      print(f"{name:>28} {1e3 * r['seconds']:9.1f} {r['ratio']:8.3f} {diff}")

  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as fh:
    json.dump(dict(config=vars(a), device=jax.devices()[0].device_kind, modality_shares=fractions.tolist(),
                   results=results), fh, indent=1)


if __name__ == "__main__":
  run_main(main)
