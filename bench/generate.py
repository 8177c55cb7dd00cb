"""Tokens/s of KV-cached greedy generation against recomputing the full sequence for every new token.

`python -m bench.generate [--batches=1,16] [--prompt=128] [--new=128] [--uncached_new=16] [--repeats=2]`
builds the benchmark-size dense LM (common/configs/dense_bench.py: d 512, 8 layers, f32, randomly
initialised: speed does not depend on the weights), feeds random byte-vocabulary prompts of `--prompt` tokens
and times, after a compiling warm-up, whole calls on one device:

- cached, `loop=while`: `common.generate.generate_ids`, prefill + all steps in one jitted `lax.while_loop`;
- cached, `loop=python`: the same steps as a Python loop over a jitted decode step;
- uncached: every new token runs the model over the whole sequence so far (its width rounded up to a
  multiple of 32, one compilation per width) and takes the argmax of the last position. It makes only
  `--uncached_new` tokens: its cost per token grows with the length, so its rate over the first tokens is
  an upper bound on its rate over `--new`.

tokens/s counts new tokens of all rows over the whole call (prefill included). `match` is the fraction of the
uncached tokens that the cached run reproduced (greedy decoding of equal logits up to float rounding).
Prints a table and writes bench/results/generate.json.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.timing import median_seconds
from common.cli import ArgumentParser
from common.config import run_main
from common import config as config_lib
from common.generate import StaticGraph, generate_ids
from common.models import build_model, padded_vocab_size
from common.tokenizers import tokenizer_for_data

WIDTH_BUCKET = 32


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _recompute_span(graph: StaticGraph, width: int, start: int, end: int, state, tokens: jax.Array) -> jax.Array:
  """Greedy tokens start..end-1 of tokens [batch, total], each from a full forward over the first `width`."""
  model = nnx.merge(graph.graphdef, state)

  def one(t, tokens):
    logits = model(tokens[:, :width])  # [batch, width, vocab]
    nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False), axis=-1)
    return jax.lax.dynamic_update_index_in_dim(tokens, nxt.astype(tokens.dtype), t, axis=1)

  return jax.lax.fori_loop(start, end, one, tokens)


def uncached_greedy(model: nnx.Module, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
  """New ids [batch, new_tokens] of equal-length prompts [batch, prompt], no cache."""
  graphdef, state = nnx.split(model)
  graph = StaticGraph(graphdef)
  batch, prompt = prompts.shape
  total = prompt + new_tokens
  tokens = jnp.asarray(np.pad(prompts, ((0, 0), (0, new_tokens))))
  t = prompt
  while t < total:
    width = min(-(-(t + 1) // WIDTH_BUCKET) * WIDTH_BUCKET, total)
    tokens = _recompute_span(graph, width, t, width, state, tokens)
    t = width
  return np.asarray(tokens[:, prompt:])


def main():
  p = ArgumentParser(prog="python -m bench.generate", description=__doc__)
  p.add_argument("--config", default="common/configs/dense_bench.py")
  p.add_argument("--batches", default="1,16")
  p.add_argument("--prompt", type=int, default=128)
  p.add_argument("--new", type=int, default=128)
  p.add_argument("--uncached_new", type=int, default=16)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--out", default="bench/results/generate.json")
  args = p.parse_args()
  cfg = config_lib.load(args.config)
  vocab = tokenizer_for_data(cfg.data).vocab_size
  if not cfg.model.vocab_size:
    cfg.model.vocab_size = padded_vocab_size(vocab)
  model = build_model(cfg.model, seed=0)
  rng = np.random.default_rng(0)
  rows = []
  for batch in (int(b) for b in args.batches.split(",")):
    prompts = rng.integers(3, vocab, (batch, args.prompt)).astype(np.int32)
    results = {}
    for loop in ("while", "python"):
      seconds, out = median_seconds(
          lambda: generate_ids(model, prompts.tolist(), max_new_tokens=args.new, loop=loop), repeats=args.repeats)
      results[f"cached_{loop}"] = (seconds, args.new, np.asarray(out))
    seconds, out = median_seconds(lambda: uncached_greedy(model, prompts, args.uncached_new), repeats=args.repeats)
    results["uncached"] = (seconds, args.uncached_new, out)
    reference = results["uncached"][2]
    for name, (seconds, new, out) in results.items():
      rows.append(dict(batch=batch, method=name, new_tokens=new, seconds=seconds,
                       tokens_per_sec=batch * new / seconds,
                       match=float((out[:, :args.uncached_new] == reference).mean())))
  base = {r["batch"]: r["tokens_per_sec"] for r in rows if r["method"] == "uncached"}
  print(f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}): dense LM d {cfg.model.d_model}, "
        f"{cfg.model.n_layers} layers, vocab {cfg.model.vocab_size}, {cfg.model.dtype}; prompt {args.prompt}")
  print(f"{'batch':>5} {'method':>14} {'new':>5} {'seconds':>9} {'tokens/s':>10} {'x uncached':>11} {'match':>6}")
  for r in rows:
    r["speedup"] = r["tokens_per_sec"] / base[r["batch"]]
    print(f"{r['batch']:>5} {r['method']:>14} {r['new_tokens']:>5} {r['seconds']:9.2f} {r['tokens_per_sec']:10.1f} "
          f"{r['speedup']:11.1f} {r['match']:6.2f}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(config=vars(args), device=jax.devices()[0].device_kind, results=rows), f, indent=1)


if __name__ == "__main__":
  run_main(main)
