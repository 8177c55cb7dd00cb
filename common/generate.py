"""Batched, KV-cached generation with the dense LM: greedy, temperature, top-k and top-p sampling, stop ids,
stop strings and a token budget, on one device or sharded on a mesh.

Prompts of different lengths share one batch, LEFT-padded to a common width (a multiple of
`PROMPT_BUCKET`, so batches of similar prompts share one compilation). Each row has its own positions
(0 at its first real token) and segment ids (0 on the padding, which its tokens therefore never see), and
after the prompt every row writes its cache slots in the order of its positions, which the ring buffer of
a windowed layer relies on (`common.nn.kv_cache`); right padding would leave pad keys inside the ring.
One prefill over the whole prompt batch, then one cached decode step per new token, either all under one
`lax.while_loop` (`loop="while"`, the default) or as a Python loop over a jitted step (`loop="python"`);
`python -m bench.generate` times both. A row finishes at its first stop id, or (with a tokenizer) as soon as
its decoded text contains a stop string, which the host checks after each step of the Python loop (stop
strings take that loop); the loop ends when all rows have finished.

Inputs are checked where they enter: ids outside the model's vocabulary (their embedding lookup gives zeros
or NaN, silently), a tokenizer larger than the model's vocabulary, and prompts that with `max_new_tokens`
pass the model's context (`model.max_len`) are refused with the numbers.

Sampling follows the usual order: temperature, then top-k, then top-p, the nucleus of Holtzman et al. 2020
(Sec. 3.1): the fewest most likely tokens whose probability reaches p. The draw of step t uses the key
`fold_in(key(seed), t)`, so samples do not depend on the loop or on the mesh.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from common.models.hf_llama import mask_padded_vocab
from common.nn.kv_cache import CACHE_AXES
from common.sharding import batch_sharding, data_parallel_size, spec_for, state_shardings
from common.tokenizers import Tokenizer, check_tokenizer_fits

PROMPT_BUCKET = 32
LOOPS = ("while", "python")


class Sampling(NamedTuple):
  """How the next token is drawn from the logits (a static jit argument)."""
  temperature: float = 0.0  # 0: greedy (argmax)
  top_k: int = 0            # keep the k most likely tokens (0: all)
  top_p: float = 1.0        # keep the nucleus of this probability mass (1: all)
  vocab_size: int = 0       # ids >= this never come out: a vocabulary padded past the tokenizer's (0: none)


def sample_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """Next ids int32 [batch] from logits [batch, vocab] (f32): the one token choice of every sampler here and
  in the packages (MoT's captions and image codes, BLT's bytes). A tie at the k-th logit keeps all tied
  tokens; top_k >= vocab keeps all."""
  if sampling.vocab_size:
    logits = mask_padded_vocab(logits, sampling.vocab_size)
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if 0 < sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked before each one
    smallest_kept = jnp.min(jnp.where(mass_above < sampling.top_p, descending, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < smallest_kept, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class StaticGraph:
  """A module's GraphDef as a static jit argument. The dense LM keeps its ConfigDict, which is unhashable,
  so the hash comes from the graph's text, computed once; equal graphs share compiled functions."""

  def __init__(self, graphdef):
    self.graphdef = graphdef
    self._hash = hash(repr(graphdef))

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other or (isinstance(other, StaticGraph) and self.graphdef == other.graphdef)


def split_for_jit(model: nnx.Module, mesh: Mesh | None) -> tuple[StaticGraph, nnx.State]:
  """(static graph, state): the state placed on `mesh` by each parameter's logical axes, if one is given."""
  graphdef, state = nnx.split(model)
  if mesh is not None:
    state = jax.device_put(state, state_shardings(state, mesh))
  return StaticGraph(graphdef), state


def padded_batch(rows: int, mesh: Mesh | None) -> int:
  """Rows rounded up to a multiple of the mesh's data-parallel size, so the batch splits evenly."""
  ways = 1 if mesh is None else data_parallel_size(mesh)
  return -(-rows // ways) * ways


def put_batch(array: np.ndarray, mesh: Mesh | None) -> jax.Array:
  """A host batch onto the devices: rows split over the data axes of `mesh`, or the default device."""
  return jnp.asarray(array) if mesh is None else jax.device_put(array, batch_sharding(mesh, array.ndim))


def under_mesh(mesh: Mesh | None):
  """Traces under `jax.set_mesh(mesh)`, as the trainer does (common.train.loop), so that layers and kernels
  see the mesh (MoE experts take their expert-parallel path)."""
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


class _Plan(NamedTuple):
  """What the compiled functions depend on besides parameters and data (a static jit argument)."""
  graph: StaticGraph
  sampling: Sampling
  stop_ids: tuple[int, ...]
  max_new_tokens: int
  mesh: Mesh | None


def _shard_caches(caches, mesh: Mesh | None):
  """Cache rows on the data axes and key/value heads on the tensor axis, as the activations they hold."""
  if mesh is None:
    return caches
  names = CACHE_AXES

  def constrain(cache):
    return cache._replace(**{
        field: jax.lax.with_sharding_constraint(
            getattr(cache, field), NamedSharding(mesh, spec_for(axes, getattr(cache, field).shape, mesh)))
        for field, axes in names.items()})
  return [constrain(c) for c in caches]


def _is_stop(tokens: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
  return jnp.isin(tokens, jnp.asarray(stop_ids, jnp.int32)) if stop_ids else jnp.zeros(tokens.shape, bool)


def _prefill(plan: _Plan, state: nnx.State, tokens: jax.Array, lengths: jax.Array, key: jax.Array) -> dict:
  """Runs the left-padded prompts tokens [batch, width] (real lengths [batch]) into fresh caches and draws
  the first new token of each row. Returns the loop state; rows of length 0 (mesh filler) start done."""
  model = nnx.merge(plan.graph.graphdef, state)
  batch, width = tokens.shape
  column = jnp.arange(width)[None, :]
  padding = (width - lengths)[:, None]
  segment_ids = (column >= padding).astype(jnp.int32)
  positions = jnp.maximum(column - padding, 0)
  caches = _shard_caches(model.init_cache(batch, width + plan.max_new_tokens), plan.mesh)
  logits, caches = model.decode(tokens, positions, segment_ids, caches, last_only=True)
  first = sample_tokens(logits[:, 0], jax.random.fold_in(key, 0), plan.sampling)
  out = jnp.zeros((batch, plan.max_new_tokens), jnp.int32).at[:, 0].set(first)
  done = _is_stop(first, plan.stop_ids) | (lengths == 0)
  return dict(step=jnp.int32(1), token=first, position=lengths, done=done, caches=caches, out=out, key=key)


def _step(plan: _Plan, state: nnx.State, loop: dict) -> dict:
  """Feeds each row's last token at its position and draws the next one into column `step` of `out`."""
  model = nnx.merge(plan.graph.graphdef, state)
  token, position = loop["token"][:, None], loop["position"][:, None]
  logits, caches = model.decode(token, position, jnp.ones_like(token), loop["caches"])
  step = loop["step"]
  nxt = sample_tokens(logits[:, 0], jax.random.fold_in(loop["key"], step), plan.sampling)
  return dict(step=step + 1, token=nxt, position=loop["position"] + 1,
              done=loop["done"] | _is_stop(nxt, plan.stop_ids), caches=caches,
              out=jax.lax.dynamic_update_index_in_dim(loop["out"], nxt, step, axis=1), key=loop["key"])


def _unfinished(plan: _Plan, loop: dict) -> jax.Array:
  return (loop["step"] < plan.max_new_tokens) & ~jnp.all(loop["done"])


_prefill_jit = jax.jit(_prefill, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _python_step(plan: _Plan, state: nnx.State, loop: dict) -> tuple[dict, jax.Array]:
  loop = _step(plan, state, loop)
  return loop, _unfinished(plan, loop)


@functools.partial(jax.jit, static_argnums=0)
def _generate_while(plan: _Plan, state: nnx.State, tokens: jax.Array, lengths: jax.Array,
                    key: jax.Array) -> jax.Array:
  loop = _prefill(plan, state, tokens, lengths, key)
  loop = jax.lax.while_loop(lambda s: _unfinished(plan, s), lambda s: _step(plan, state, s), loop)
  return loop["out"]


def _generate_python(plan: _Plan, state: nnx.State, tokens: jax.Array, lengths: jax.Array,
                     key: jax.Array) -> jax.Array:
  loop = _prefill_jit(plan, state, tokens, lengths, key)
  unfinished = _unfinished(plan, loop)
  while unfinished:
    loop, unfinished = _python_step(plan, state, loop)
  return loop["out"]


def model_limits(model: nnx.Module) -> tuple[int, int]:
  """(vocabulary size, context length; 0 where unknown or unbounded) from a dense-LM-shaped `model.cfg`."""
  cfg = getattr(model, "cfg", None)
  if cfg is None:
    return 0, 0
  return int(cfg.get("vocab_size", 0)), int(cfg.get("max_len", 0))


def model_stop_ids(model: nnx.Module) -> tuple[int, ...]:
  """The end-of-sequence ids of a dense-LM-shaped `model.cfg` (`model.eos_ids`, which a Hugging Face import
  fills from generation_config.json); () where it has none."""
  cfg = getattr(model, "cfg", None)
  return tuple(int(i) for i in cfg.get("eos_ids", ())) if cfg is not None else ()


def check_token_ids(rows: Sequence[Sequence[int]], vocab_size: int, what: str) -> None:
  """Refuses an id outside [0, vocab_size), naming the row, the id and the vocabulary."""
  if not vocab_size:
    return
  for i, row in enumerate(rows):
    ids = np.asarray(row, np.int64)
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
      raise ValueError(f"{what} {i} holds token id {bad[0]}, outside the model's vocabulary [0, {vocab_size})")


def check_context(lengths: Sequence[int], max_len: int, what: str, *, new_tokens: int = 0) -> None:
  """Refuses a row of more than `max_len` tokens (with `new_tokens` to generate), naming the lengths."""
  if not max_len or not len(lengths):
    return
  i = int(np.argmax(lengths))
  if lengths[i] + new_tokens > max_len:
    plus = f" + max_new_tokens {new_tokens} = {lengths[i] + new_tokens}" if new_tokens else ""
    raise ValueError(f"{what} {i} has {lengths[i]} tokens{plus}, more than the model's context of {max_len} "
                     "(model.max_len)")


class StopStrings:
  """Host-side watch of the rows' generated text: which rows have just produced a stop string. Only a tail
  of each row is decoded, long enough to hold a whole stop string (4 bytes a character, one a token at
  worst) found at the step that completes it."""

  def __init__(self, tokenizer: Tokenizer, strings: Sequence[str], rows: int):
    self.tokenizer, self.strings = tokenizer, [s for s in strings if s]
    self.tail = 4 * max((len(s) for s in self.strings), default=0) + 8
    self.ids: list[list[int]] = [[] for _ in range(rows)]

  def update(self, tokens: np.ndarray, done: np.ndarray) -> np.ndarray:
    """Appends each unfinished row's new token; bool [rows]: the rows whose text now holds a stop string."""
    stopped = np.zeros(len(tokens), bool)
    for r in np.flatnonzero(~done):
      self.ids[r].append(int(tokens[r]))
      text = self.tokenizer.decode(self.ids[r][-self.tail:])
      stopped[r] = any(s in text for s in self.strings)
    return stopped


def _generate_watched(plan: _Plan, state: nnx.State, tokens: jax.Array, lengths: jax.Array, key: jax.Array,
                      watch: StopStrings) -> jax.Array:
  """The Python loop with the host's stop-string check after every token: out [batch, steps taken]."""
  loop = _prefill_jit(plan, state, tokens, lengths, key)
  while True:
    done = np.asarray(jax.device_get(loop["done"]))
    stopped = watch.update(np.asarray(jax.device_get(loop["token"])), done)
    if stopped.any():
      loop["done"] = put_batch(done | stopped, plan.mesh)
    step = int(loop["step"])
    if step >= plan.max_new_tokens or (done | stopped).all():
      return loop["out"][:, :step]
    loop, _ = _python_step(plan, state, loop)


def _left_pad(prompts: Sequence[Sequence[int]], rows: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [rows, width], lengths [rows]): prompts right-aligned, width a multiple of
  PROMPT_BUCKET; rows past the prompts (filling the mesh) are all padding, of length 0."""
  lengths = np.zeros(rows, np.int32)
  lengths[:len(prompts)] = [len(p) for p in prompts]
  width = -(-int(lengths.max()) // PROMPT_BUCKET) * PROMPT_BUCKET
  tokens = np.zeros((rows, width), np.int32)
  for i, prompt in enumerate(prompts):
    tokens[i, width - len(prompt):] = prompt
  return tokens, lengths


def until_stop_id(row: np.ndarray, stop_ids: Sequence[int]) -> list[int]:
  """The ids of a generated row before its first stop id."""
  hits = np.flatnonzero(np.isin(row, list(stop_ids))) if stop_ids else []
  return [int(t) for t in (row[:hits[0]] if len(hits) else row)]


def generate_ids(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: Sampling = Sampling(), stop_ids: Sequence[int] = (), seed: int = 0,
                 mesh: Mesh | None = None, loop: str = "while", watch: StopStrings | None = None) -> list[list[int]]:
  """The new ids of each prompt, up to its first stop id (left out) or `max_new_tokens`; with `watch`, a
  row also ends at the step its text first holds a stop string (the string itself is not cut here)."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if loop not in LOOPS:
    raise ValueError(f"loop must be one of {LOOPS}, got '{loop}'")
  empty = [i for i, p in enumerate(prompts) if not len(p)]
  if empty:
    raise ValueError(f"prompts {empty[:5]} are empty: a prompt needs at least one token (e.g. BOS)")
  if not prompts:
    return []
  vocab_size, max_len = model_limits(model)
  check_token_ids(prompts, vocab_size, "prompt")
  check_context([len(p) for p in prompts], max_len, "prompt", new_tokens=int(max_new_tokens))
  graph, state = split_for_jit(model, mesh)
  tokens, lengths = _left_pad(prompts, padded_batch(len(prompts), mesh))
  plan = _Plan(graph, sampling, tuple(int(i) for i in stop_ids), int(max_new_tokens), mesh)
  run = _generate_while if loop == "while" else _generate_python
  if watch is not None:
    run = functools.partial(_generate_watched, watch=watch)
  with under_mesh(mesh):
    out = run(plan, state, put_batch(tokens, mesh), put_batch(lengths, mesh), jax.random.key(seed))
  out = np.asarray(jax.device_get(out))
  return [until_stop_id(row, plan.stop_ids) for row in out[:len(prompts)]]


def stop_string_cut(text: str, stop_strings: Sequence[str]) -> int:
  """Index in `text` where the earliest stop string begins (len(text) when none occurs)."""
  found = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
  return min(found, default=len(text))


def truncate_at_stop_strings(ids: list[int], tokenizer: Tokenizer, stop_strings: Sequence[str]) -> list[int]:
  """The longest prefix of `ids` whose text ends before the first stop string of the decoded row; a token
  that straddles the start of the stop string goes with it."""
  text = tokenizer.decode(ids)
  cut = stop_string_cut(text, stop_strings)
  if cut == len(text):
    return ids
  kept = 0
  while kept < len(ids) and len(tokenizer.decode(ids[:kept + 1])) <= cut:
    kept += 1
  return ids[:kept]


def _generate_rows(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   temperature: float, top_k: int, top_p: float, stop_ids: Sequence[int],
                   stop_strings: Sequence[str], tokenizer: Tokenizer | None, seed: int, mesh: Mesh | None,
                   loop: str) -> list[list[int]]:
  """`generate`'s rows before the cut at stop strings: each ends after the token that completes one."""
  if stop_strings and tokenizer is None:
    raise ValueError("stop_strings need a tokenizer to decode the generated ids")
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
  vocab_size = model_limits(model)[0]
  if tokenizer is not None and vocab_size:
    check_tokenizer_fits(tokenizer, vocab_size)
  sampling = Sampling(float(temperature), int(top_k), float(top_p), tokenizer.vocab_size if tokenizer else 0)
  watch = StopStrings(tokenizer, stop_strings, padded_batch(len(prompts), mesh)) if stop_strings else None
  return generate_ids(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids,
                      seed=seed, mesh=mesh, loop=loop, watch=watch)


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] | None = None,
             stop_strings: Sequence[str] = (), tokenizer: Tokenizer | None = None, seed: int = 0,
             mesh: Mesh | None = None, loop: str = "while") -> list[list[int]]:
  """New token ids for each prompt (lists of ids): at most `max_new_tokens`, ending before the first stop
  id (None: the model's own, `model_stop_ids`; () for none) and, with a tokenizer, before the first stop
  string of the row's decoded text (the row stops being decoded there; stop strings run the Python loop).
  The tokenizer's vocabulary also bounds the ids drawn (a model vocabulary padded past it) and must fit the
  model's."""
  if stop_ids is None:
    stop_ids = model_stop_ids(model)
  rows = _generate_rows(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, stop_ids=stop_ids, stop_strings=stop_strings, tokenizer=tokenizer, seed=seed,
                        mesh=mesh, loop=loop)
  if stop_strings:
    rows = [truncate_at_stop_strings(row, tokenizer, stop_strings) for row in rows]
  return rows


def text_generate_fn(model: nnx.Module, tokenizer: Tokenizer, *, max_new_tokens: int, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, stop_strings: Sequence[str] = (), seed: int = 0,
                     mesh: Mesh | None = None, bos: bool = True) -> Callable[[list[str], int], list[list[str]]]:
  """The `generate_fn(prompts, n)` of `common.eval.harness.evaluate_generations`: n completions (text, cut
  exactly before the first stop string) of each prompt, all n * len(prompts) rows in one batch. Prompts are
  encoded with the tokenizer's BOS when it has one and `bos`; its stop ids, the model's (`model_stop_ids`) and
  the stop strings end a row."""
  use_bos = bos and tokenizer.bos_id is not None
  stop_ids = tuple(dict.fromkeys([*tokenizer.stop_ids, *model_stop_ids(model)]))
  vocab_size = model_limits(model)[0]
  if vocab_size:
    check_tokenizer_fits(tokenizer, vocab_size)

  def generate_fn(prompts: list[str], n: int) -> list[list[str]]:
    encoded = [tokenizer.encode(p, bos=use_bos) for p in prompts]
    rows = _generate_rows(model, [ids for ids in encoded for _ in range(n)], max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids,
                          stop_strings=stop_strings, tokenizer=tokenizer, seed=seed, mesh=mesh, loop="while")
    texts = [tokenizer.decode(row) for row in rows]
    texts = [text[:stop_string_cut(text, stop_strings)] for text in texts]
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

  return generate_fn
