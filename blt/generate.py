"""`python -m blt.generate --workdir=DIR --prompt="..." [--max_bytes=N] [--temperature=T] [--seed=S]`

Incremental byte-by-byte generation with a BLT (Pagnoni et al. 2024, Sec. 3 and Sec. 2.3), every stage with
its own cache (`common.nn.kv_cache`):

- the entropy model (a dense byte LM) takes one step per byte and gives H(t), the entropy of its prediction
  of byte t+1, as `blt.entropy.EntropyScorer` (real vocabulary; under `reset_at_newline` a newline opens a
  new segment of its cache, positions counting from it); the patch rule (static, space, entropy with the global or monotonic constraint, the forced
  first starts and `max_patch_length`) decides online, from bytes <= t, whether byte t+1 opens a new patch,
  as `blt.patcher`;
- the local encoder takes one step per byte (windowed self-attention, hash n-grams of the last bytes);
- when a patch is complete its representation is pooled and cross-attended from its bytes' encoder states,
  and the global transformer takes ONE step for it: under the 'official' decoder grouping as soon as byte t
  is known to end it (byte t+1 opens the next), so byte t reads it; under 'lagged' when byte t opens the next
  patch, so byte t reads the patches before its own (`blt.model`);
- the local decoder takes one step per byte, reading the global outputs of the completed patches, and gives
  the logits of the next byte.

Every architecture switch of `blt.model.Ablations` is supported: the encoder step keeps the byte states of
each layer an encoder cross-attention reads, and a completed patch's global output is stored as the decoder's
k key/value slots (`LocalDecoder.patch_slots`), of which the decoder step reads those its scope allows.

Greedy output is identical to running the full model on the whole sequence at every byte
(tests/blt/test_generate.py). `generate_samples` is the entry point for sample logging during training.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from blt.data import BOS, EOS, blt_to_seqio
from blt.entropy import ENTROPY_VOCAB_SIZE, NEWLINE, entropy_from_logits, load_entropy_model
from blt.model import BLT
from blt.patcher import FORCED_STARTS, is_space_like
from common.cli import ArgumentParser
from common.config import ConfigError
from common.generate import Sampling, sample_tokens, until_stop_id
from common.nn.kv_cache import decode_blocks, init_caches

ONLINE_METHODS = ("static", "space", "entropy", "entropy_monotonic")
ENTROPY_METHODS = ("entropy", "entropy_monotonic")


class PatchRule(NamedTuple):
  """The online form of `model.patching` (static under jit)."""
  method: str
  patch_size: int = 4
  threshold: float = 0.0
  max_patch_length: int = 0
  reset_at_newline: bool = False  # the entropy model's context restarts at each newline (blt.entropy)

  @classmethod
  def from_config(cls, p) -> PatchRule:
    if p.method not in ONLINE_METHODS:
      raise ConfigError(f"config key 'model.patching.method': generation needs a patcher that decides online "
                        f"({', '.join(ONLINE_METHODS)}); '{p.method}' looks ahead")
    return cls(p.method, int(p.patch_size), float(p.get("threshold", 0.0)), int(p.get("max_patch_length", 0)),
               bool(p.get("reset_at_newline", False)))


class Generation(NamedTuple):
  byte_ids: np.ndarray      # int32 [batch, prompt + new]: the prompt, then the generated ids
  logits: np.ndarray        # f32 [batch, prompt + new - 1, vocab]: logits[:, t] predicted byte t+1
  patch_starts: np.ndarray  # bool [batch, prompt + new - 1]: the online patch boundaries of bytes 0..
  global_steps: np.ndarray  # int32 [batch]: patches each row sent through the global transformer
  global_calls: int         # times the global transformer ran (once per step where some row closed a patch)


class _Graph:
  """A GraphDef as a static jit argument. A DenseLM keeps its ConfigDict, which is unhashable, so equal
  graphs are found by equality alone (a constant hash: the compiled steps of a few models at most)."""

  def __init__(self, graphdef):
    self.graphdef = graphdef

  def __hash__(self):
    return 0

  def __eq__(self, other):
    return isinstance(other, _Graph) and self.graphdef == other.graphdef


class _Spec(NamedTuple):
  """What the compiled steps depend on besides the parameters (hashable: a static jit argument)."""
  rule: PatchRule | None  # None for the steps that do not depend on it
  context: int  # bytes a hash n-gram reaches back, the new one included (hash_n_max)
  max_len: int  # bytes per row, prompt included


def _next_opens(spec: _Spec, state: dict, byte: jax.Array) -> jax.Array:
  """bool [batch]: does byte t+1 open a patch? The rules of `blt.patcher`, from bytes <= t; `state` is the
  one after byte t (its run, entropies [H(t), H(t-1)] and context)."""
  t, r = state["t"], spec.rule
  if r.method == "static":
    rule = jnp.broadcast_to((t + 1) % r.patch_size == 0, byte.shape)
  elif r.method == "space":
    previous = jax.lax.dynamic_index_in_dim(state["context"], spec.context - 2 + t, axis=1, keepdims=False)
    rule = (is_space_like(byte) & ~(is_space_like(previous) & (t >= 1))) | (byte >= 256)
  elif r.method == "entropy":
    rule = state["entropies"][:, 0] > r.threshold
  else:
    rule = state["entropies"][:, 0] - state["entropies"][:, 1] > r.threshold
  opens = rule | (t + 1 < FORCED_STARTS.get(r.method, 1))
  if r.max_patch_length > 0:
    opens |= state["run"] >= r.max_patch_length
  return opens


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _consume_byte(graph: _Graph, entropy_graph: _Graph | None, spec: _Spec, params, entropy_params, state: dict,
                  byte: jax.Array):
  """Byte t [batch] enters: patch bookkeeping, entropy model and local encoder steps. Returns (state,
  starts, next_opens): where byte t opens a patch (for t > 0 the previous patch is then complete), and where
  byte t+1 will (byte t then ends its patch)."""
  model = nnx.merge(graph.graphdef, params)
  entropy_model = None if entropy_graph is None else nnx.merge(entropy_graph.graphdef, entropy_params)
  t, s = state["t"], dict(state)
  starts = state["opens"]
  s["closed_start"] = state["patch_start"]
  s["patch_index"] = state["patch_index"] + (starts & (t > 0))
  s["patch_start"] = jnp.where(starts, t, state["patch_start"])
  s["run"] = jnp.where(starts, 1, state["run"] + 1)
  s["context"] = jax.lax.dynamic_update_index_in_dim(state["context"], byte, spec.context - 1 + t, axis=1)
  window = jax.lax.dynamic_slice_in_dim(s["context"], t, spec.context, axis=1)  # bytes t-context+1 .. t
  window_segs = (jnp.arange(spec.context) + t - (spec.context - 1) >= 0).astype(jnp.int32)
  position = jnp.full((byte.shape[0], 1), t)
  h, s["encoder"] = model.local_encoder.decode_byte(
      window, jnp.broadcast_to(window_segs, window.shape), position, state["encoder"])
  s["enc_h"] = jax.lax.dynamic_update_index_in_dim(state["enc_h"], h[:, 0], t, axis=1)
  if entropy_model is not None:
    if spec.rule.reset_at_newline:  # a newline opens a new segment of the entropy cache (blt.entropy.line_segments)
      new_line = byte == NEWLINE
      s["entropy_line"] = state["entropy_line"] + new_line
      s["entropy_line_start"] = jnp.where(new_line, t, state["entropy_line_start"])
    x = entropy_model.embed(blt_to_seqio(byte)[:, None])
    x, s["entropy"] = decode_blocks(entropy_model.blocks, x, (t - s["entropy_line_start"])[:, None],
                                    s["entropy_line"][:, None], state["entropy"])
    logits = entropy_model.logits(entropy_model.final_norm(x))
    entropy = entropy_from_logits(logits, vocab_size=ENTROPY_VOCAB_SIZE)[:, 0]
    s["entropies"] = jnp.stack([entropy, state["entropies"][:, 0]], axis=1)
  s["opens"] = _next_opens(spec, s, byte)
  return s, starts, s["opens"]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _close_patch(graph: _Graph, spec: _Spec, params, state: dict, closes: jax.Array, first: jax.Array,
                 end: jax.Array) -> dict:
  """Rows where `closes`: the patch of bytes [first, end) is complete; its representation (max-pooled byte
  states plus cross-attention to them, Sec. 3.2.2) takes one global transformer step, as patch `closed`, and
  its output is kept as the decoder's k key/value slots (`LocalDecoder.patch_slots`)."""
  model = nnx.merge(graph.graphdef, params)
  enc, s = model.local_encoder, dict(state)
  byte_index = jnp.arange(spec.max_len)[None, :]
  in_patch = (byte_index >= first[:, None]) & (byte_index < end[:, None])  # [batch, max_len]
  key_owner = jnp.where(in_patch, 0, 1)  # the one patch owns its bytes; other bytes: none (rows closing none: 0)
  states = [state["enc_h"][:, :, i] for i in range(state["enc_h"].shape[2])]
  patch = enc.patches(states, key_owner, 1)
  index = state["closed"]
  out, s["global_"] = model.global_transformer.decode(patch, index[:, None], state["global_"], closes)
  slots = model.local_decoder.patch_slots(out)  # [batch, k, d_kv]
  rows, k = jnp.arange(closes.shape[0]), slots.shape[1]
  written = state["global_out"].at[rows[:, None], index[:, None] * k + jnp.arange(k)].set(slots)
  s["global_out"] = jnp.where(closes[:, None, None], written, state["global_out"])
  s["closed"] = index + closes
  return s


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode_byte(graph: _Graph, spec: _Spec, params, state: dict):
  """Local decoder step of byte t: (state with t + 1, next-byte logits [batch, vocab])."""
  model = nnx.merge(graph.graphdef, params)
  t, s = state["t"], dict(state)
  h = jax.lax.dynamic_index_in_dim(state["enc_h"], t, axis=1)[:, :, -1]  # [batch, 1, d_local]: final states
  position = jnp.full((h.shape[0], 1), t)
  # The completed patches are the readable ones (with the official grouping, byte t's own if t ends it).
  logits, s["decoder"] = model.local_decoder.decode_byte(h, state["global_out"], state["closed"], position,
                                                         state["decoder"])
  s["t"] = t + 1
  return s, logits[:, 0]


class Generator:
  """Incremental generation with one BLT (and entropy model) for rows of up to `max_len` bytes. The compiled
  steps are shared by every Generator of the same architecture, rule and `max_len`."""

  def __init__(self, model: BLT, rule: PatchRule, *, max_len: int, entropy_model: nnx.Module | None = None):
    if rule.method in ENTROPY_METHODS and entropy_model is None:
      raise ConfigError(f"config key 'model.patching.entropy_model': '{rule.method}' patching needs an entropy model")
    self.model = model
    self.official = model.grouping == "official"
    self.entropy_model = entropy_model if rule.method in ENTROPY_METHODS else None
    self.spec = _Spec(rule, model.local_encoder.hash_embed.ns[-1], max_len)
    graphdef, self.params = nnx.split(model)
    self.graph = _Graph(graphdef)
    self.entropy_graph, self.entropy_params = None, None
    if self.entropy_model is not None:
      graphdef, self.entropy_params = nnx.split(self.entropy_model)
      self.entropy_graph = _Graph(graphdef)

  def init_state(self, batch: int) -> dict:
    enc, glob, dec = self.model.local_encoder, self.model.global_transformer, self.model.local_decoder
    n = self.spec.max_len
    d_local = enc.embed.embedding.shape[1]
    state = dict(
        t=jnp.zeros((), jnp.int32),
        context=jnp.zeros((batch, self.spec.context - 1 + n), jnp.int32),  # front padding, then the bytes
        run=jnp.zeros((batch,), jnp.int32),             # bytes in the current patch
        patch_index=jnp.zeros((batch,), jnp.int32),     # j, the current patch
        patch_start=jnp.zeros((batch,), jnp.int32),     # its first byte
        closed_start=jnp.zeros((batch,), jnp.int32),    # first byte of the patch before the current one
        opens=jnp.ones((batch,), bool),                 # does the next byte open a patch
        closed=jnp.zeros((batch,), jnp.int32),          # patches through the global model so far
        entropies=jnp.zeros((batch, 2), jnp.float32),   # H(t-1), H(t-2)
        enc_h=jnp.zeros((batch, n, len(enc.read_layers), d_local), jnp.float32),  # states the patch step reads
        global_out=jnp.zeros((batch, n * dec.slots, dec.d_kv), jnp.float32),  # the decoder's patch slots
        encoder=init_caches(enc.layers, batch, n), global_=init_caches(glob.layers, batch, n),
        decoder=init_caches(dec.layers, batch, n))
    if self.entropy_model is not None:
      state["entropy"] = init_caches(self.entropy_model.blocks, batch, n)
      state["entropy_line"] = jnp.ones((batch,), jnp.int32)        # the entropy model's segment id
      state["entropy_line_start"] = jnp.zeros((batch,), jnp.int32)  # its first byte: positions count from it
    return state

  def consume(self, state: dict, byte: jax.Array):
    return _consume_byte(self.graph, self.entropy_graph, self.spec, self.params, self.entropy_params, state, byte)

  def close(self, state: dict, closes: jax.Array, first: jax.Array, end: jax.Array) -> dict:
    return _close_patch(self.graph, self.spec._replace(rule=None), self.params, state, closes, first, end)

  def decode(self, state: dict):
    return _decode_byte(self.graph, self.spec._replace(rule=None), self.params, state)

  def run(self, prompt_ids: np.ndarray, n_new: int, *, temperature: float = 0.0, seed: int = 0,
          stop_at_eos: bool = False) -> Generation:
    """Feeds prompt_ids [batch, prompt] (all rows the same length), then generates `n_new` ids per row,
    chosen by the shared `common.generate.sample_tokens`: greedy for temperature 0, else sampled from
    softmax(logits / temperature). With `stop_at_eos`, a row
    that emits EOS is padded with EOS, and generation stops once all rows have."""
    prompt_ids = np.asarray(prompt_ids, np.int32)
    batch, n_prompt = prompt_ids.shape
    total = n_prompt + n_new
    if not 1 <= n_prompt or total > self.spec.max_len:
      raise ValueError(f"prompt of {n_prompt} bytes + {n_new} new must be within 1..max_len={self.spec.max_len}")
    ids = np.zeros((batch, total), np.int32)
    ids[:, :n_prompt] = prompt_ids
    logits_out, starts_out = [], []
    global_steps, global_calls = np.zeros(batch, np.int32), 0
    key = jax.random.key(seed)
    done = np.zeros(batch, bool)
    state = self.init_state(batch)
    for t in range(total - 1):
      state, starts, next_opens = self.consume(state, jnp.asarray(ids[:, t]))
      starts = np.asarray(starts)
      if self.official:  # byte t ends its patch: it goes through the global model before t is decoded
        closes, first, end = np.asarray(next_opens), state["patch_start"], jnp.full((batch,), t + 1)
      else:  # byte t opened a patch: the one before it is complete
        closes, first, end = starts & (t > 0), state["closed_start"], jnp.full((batch,), t)
      if closes.any():
        state = self.close(state, jnp.asarray(closes), first, end)
        global_steps += closes
        global_calls += 1
      state, logits = self.decode(state)
      logits_out.append(np.asarray(logits))
      starts_out.append(starts)
      if t + 1 >= n_prompt:
        key, sub = jax.random.split(key)
        nxt = np.asarray(sample_tokens(logits, sub, Sampling(temperature)))
        if stop_at_eos:  # a finished row keeps emitting EOS; the loop ends when every row has finished
          nxt = np.where(done, EOS, nxt)
          done |= nxt == EOS
        ids[:, t + 1] = nxt
        if done.all():
          ids[:, t + 2:] = EOS
          break
    return Generation(ids, np.stack(logits_out, axis=1), np.stack(starts_out, axis=1), global_steps, global_calls)


def _same_devices(tree, like):
  """`tree` placed on the devices of `like`'s first array (replicated), so one jit can take both."""
  sharding = jax.tree.leaves(like)[0].sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return jax.device_put(tree, sharding)


def generate_samples(model: BLT, cfg, prompts: list[str], n_bytes: int, *, entropy_model: nnx.Module | None = None,
                     temperature: float = 0.0, seed: int = 0) -> list[str]:
  """Continuations of text prompts (each after BOS, as the training rows begin) up to `n_bytes` bytes or
  EOS, decoded as UTF-8 (invalid bytes replaced). The entropy model, if the patcher needs one and none is
  given, is loaded from `model.patching.entropy_model`. Prompts of equal length share one batch."""
  rule = PatchRule.from_config(cfg.model.patching)
  if rule.method in ENTROPY_METHODS and entropy_model is None:
    entropy_model, _ = load_entropy_model(cfg.model.patching.get("entropy_model", ""))
  encoded = [[BOS, *p.encode("utf-8")] for p in prompts]
  max_len = max(len(e) for e in encoded) + n_bytes
  if entropy_model is not None:
    nnx.update(entropy_model, _same_devices(nnx.state(entropy_model), nnx.state(model)))
  generator = Generator(model, rule, max_len=max_len, entropy_model=entropy_model)
  out = [""] * len(prompts)
  for length in sorted({len(e) for e in encoded}):
    rows = [i for i, e in enumerate(encoded) if len(e) == length]
    gen = generator.run(np.array([encoded[i] for i in rows]), n_bytes, temperature=temperature, seed=seed,
                        stop_at_eos=True)
    for i, ids in zip(rows, gen.byte_ids[:, length:]):
      out[i] = bytes(b for b in until_stop_id(ids, [EOS]) if b < 256).decode("utf-8", errors="replace")
  return out


def load_blt(workdir: str) -> tuple[BLT, ml_collections.ConfigDict]:
  """(model, config) of a `blt.train` run: DIR/config.json and the parameters of its newest readable
  checkpoint, on the first local device (`common.train.restore`). Missing pieces are ConfigErrors naming the path."""
  from common.train.restore import load_run_model, read_run_config
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise ConfigError(f"--workdir: '{workdir}' holds no config.json (train with `python -m blt.train` first)")
  cfg = read_run_config(workdir, "--workdir")
  if cfg.model.get("name") != "blt":
    raise ConfigError(f"--workdir: '{workdir}' is not a BLT run (model.name '{cfg.model.get('name')}')")
  model, _ = load_run_model(workdir, cfg, lambda: BLT(cfg.model, rngs=nnx.Rngs(params=0)), key="--workdir")
  return model, cfg


def parse_flags(argv: list[str]) -> dict:
  """The command's flags (module docstring); bad input is a ConfigError naming the flag."""
  p = ArgumentParser(prog="python -m blt.generate", description="Continues a prompt byte by byte with a "
                     "trained BLT, every stage cached (greedy, or sampled at --temperature).")
  p.add_argument("--workdir", required=True, help="a `python -m blt.train` run")
  p.add_argument("--prompt", default="", help="the text to continue")
  p.add_argument("--max_bytes", type=int, default=200, help="bytes to generate")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--seed", type=int, default=0, help="of the sampling")
  flags = vars(p.parse_args(argv))
  if flags["max_bytes"] <= 0:
    raise ConfigError(f"--max_bytes: must be positive, got {flags['max_bytes']}")
  if flags["temperature"] < 0:
    raise ConfigError(f"--temperature: must be >= 0 (0 = greedy), got {flags['temperature']}")
  return flags


def main(argv: list[str]) -> int:
  flags = parse_flags(argv)
  model, cfg = load_blt(flags["workdir"])
  [text] = generate_samples(model, cfg, [flags["prompt"]], flags["max_bytes"], temperature=flags["temperature"],
                            seed=flags["seed"])
  print(flags["prompt"] + text)
  return 0


if __name__ == "__main__":
  from common.config import run_main
  run_main(lambda: main(sys.argv[1:]))
