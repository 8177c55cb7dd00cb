"""blt.generate: cached byte-by-byte generation equals recomputing the whole sequence with the full model at
every byte (greedy; static, space, entropy and monotonic-entropy patching under the official decoder grouping,
space and monotonic entropy under the lagged one), and the global transformer runs exactly once per completed
patch."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from blt import generate as blt_generate
from blt.data import BOS, EOS
from blt.entropy import EntropyScorer
from blt.generate import Generator, PatchRule, generate_samples
from blt.model import BLT, blt_model
from blt.patcher import patch
from common.config import ConfigError
from common.configs.base import dense_model
from common.models.dense_lm import DenseLM

PROMPTS = [b"the cat, sat on", b"a mat. so it is"]
N_NEW = 17  # 1 + 15 + 17 = 33 bytes: past the local window (6), so every ring buffer wraps


MODEL = dict(d_local=32, n_heads_local=2, local_window=6, n_heads_cross=2, d_global=48, n_heads_global=2,
             n_layers_global=2, hash_n_max=5, hash_table_size=101)
SPACE = dict(method="space", patch_size=4, threshold=0.0, max_patch_length=6)


@pytest.fixture(scope="module")
def model():
  return BLT(blt_model(**MODEL), rngs=nnx.Rngs(params=0))


@pytest.fixture(scope="module")
def lagged_model():
  return BLT(blt_model(**MODEL, decoder_grouping="lagged"), rngs=nnx.Rngs(params=0))


@pytest.fixture(scope="module")
def entropy_model():
  cfg = dense_model(vocab_size=260, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, window=5)
  return DenseLM(cfg, rngs=nnx.Rngs(params=1))


def _prompt_ids():
  return np.array([[BOS, *p] for p in PROMPTS], np.int32)


def _threshold(scorer, ids, monotonic):
  """A threshold between two middle values of the prompt's entropies (or their differences), so that about
  half the positions open a patch and none sits on the threshold."""
  h = scorer(ids)
  values = np.sort((h[:, 1:] - h[:, :-1] if monotonic else h).ravel())
  mid = len(values) // 2
  return float((values[mid] + values[mid + 1]) / 2)


@functools.partial(jax.jit, static_argnames="rule")
def _patches(ids, entropies, rule):
  return patch(ids, method=rule.method, max_patches=ids.shape[1], patch_size=rule.patch_size,
               entropies=entropies, threshold=rule.threshold, max_patch_length=rule.max_patch_length)


@nnx.jit
def _forward(model, ids, patch_ids, next_patch_ids):
  return model(ids, patch_ids, ids.shape[1], next_patch_ids=next_patch_ids)


def _full_forward(model, ids, entropies, rule):
  """The full model on a whole sequence, patched by `blt.patcher`: (logits, patch_starts)."""
  patches = _patches(ids, entropies, rule)
  return _forward(model, ids, patches.patch_ids, patches.next_patch_ids), patches.patch_starts


def _completed(model, starts):
  """Patches a generator has sent through the global model after the bytes whose full-model `starts`
  (bool [batch, length]) are given, the byte after the last included: every patch but the last open one, and
  under the official grouping also the one the last byte ends."""
  closed = starts[:, :-1].sum(1) - 1
  return closed + starts[:, -1] if model.grouping == "official" else closed


def _recompute(model, rule, scorer, prompt_ids, n_new):
  """Greedy generation by running the full model on the whole sequence at every byte (the sequence buffer
  is padded on the right; a causal model and patcher ignore the padding). Returns (ids, logits, starts)."""
  batch, n_prompt = prompt_ids.shape
  total = n_prompt + n_new
  ids = np.zeros((batch, total), np.int32)
  ids[:, :n_prompt] = prompt_ids

  def forward():
    entropies = None if scorer is None else jnp.asarray(scorer(ids))
    logits, starts = _full_forward(model, jnp.asarray(ids), entropies, rule)
    return np.asarray(logits), np.asarray(starts)

  for t in range(n_prompt - 1, total - 1):
    ids[:, t + 1] = forward()[0][:, t].argmax(-1)
  logits, starts = forward()
  return ids, logits[:, :-1], starts


def _rule(method, scorer):
  if method == "static":
    return PatchRule("static", patch_size=4)
  if method == "space":
    return PatchRule("space", max_patch_length=6)
  monotonic = method == "entropy_monotonic"
  return PatchRule(method, threshold=_threshold(scorer, _prompt_ids(), monotonic), max_patch_length=6)


@pytest.mark.parametrize("grouping, method", [("official", "static"), ("official", "space"),
                                              ("official", "entropy"), ("official", "entropy_monotonic"),
                                              ("lagged", "space"), ("lagged", "entropy_monotonic")])
def test_cached_greedy_generation_equals_recompute(model, lagged_model, entropy_model, grouping, method):
  model = model if grouping == "official" else lagged_model
  entropic = method.startswith("entropy")
  scorer = EntropyScorer(entropy_model) if entropic else None
  rule = _rule(method, scorer)
  prompt = _prompt_ids()
  ref_ids, ref_logits, ref_starts = _recompute(model, rule, scorer, prompt, N_NEW)
  if entropic:  # the test means something only if no entropy sits within float noise of the threshold
    h = scorer(ref_ids)
    gap = np.abs((h[:, 1:] - h[:, :-1] if method == "entropy_monotonic" else h) - rule.threshold).min()
    assert gap > 1e-4, gap
  gen = Generator(model, rule, max_len=prompt.shape[1] + N_NEW,
                  entropy_model=entropy_model if entropic else None).run(prompt, N_NEW)
  np.testing.assert_array_equal(gen.patch_starts, ref_starts[:, :-1])
  np.testing.assert_array_equal(gen.byte_ids, ref_ids)
  np.testing.assert_allclose(gen.logits, ref_logits, atol=1e-5, rtol=1e-5)
  n_patches = ref_starts[:, :-1].sum(1)
  assert (n_patches >= 4).all() and (n_patches < ref_starts.shape[1] - 3).all(), n_patches
  np.testing.assert_array_equal(gen.global_steps, _completed(model, ref_starts))


def test_global_transformer_runs_once_per_completed_patch(model, monkeypatch):
  rule = _rule("space", None)
  prompt = _prompt_ids()
  calls, final = [], {}
  generator = Generator(model, rule, max_len=prompt.shape[1] + N_NEW)
  close, decode = generator.close, generator.decode
  monkeypatch.setattr(generator, "close",
                      lambda state, closes, *span: calls.append(np.asarray(closes)) or close(state, closes, *span))
  monkeypatch.setattr(generator, "decode", lambda state: final.update(state=state) or decode(state))
  gen = generator.run(prompt, N_NEW)
  completed = _completed(model, np.asarray(_full_forward(model, jnp.asarray(gen.byte_ids), None, rule)[1]))
  assert (completed >= 4).all()
  assert all(c.any() for c in calls)  # the global model never runs for nothing ...
  np.testing.assert_array_equal(np.sum(calls, axis=0), completed)  # ... and once per completed patch of a row
  for cache in final["state"]["global_"]:  # whose caches hold exactly those patches
    np.testing.assert_array_equal(np.asarray(cache.length), completed)


def test_generate_samples_decodes_text_and_groups_prompts(model):
  cfg = ml_collections.ConfigDict(dict(model=dict(patching=SPACE)))
  prompts = [PROMPTS[0].decode(), "the cat", PROMPTS[1].decode(), "a dog!!"]  # two batches of two prompts
  samples = generate_samples(model, cfg, prompts, N_NEW)
  generator = Generator(model, PatchRule.from_config(cfg.model.patching), max_len=1 + len(PROMPTS[0]) + N_NEW)
  for group in ([0, 2], [1, 3]):
    encoded = np.array([[BOS, *prompts[i].encode()] for i in group])
    for i, ids in zip(group, generator.run(encoded, N_NEW).byte_ids[:, encoded.shape[1]:]):
      if (ids == EOS).any():
        ids = ids[:np.argmax(ids == EOS)]
      assert samples[i] == bytes(int(b) for b in ids if b < 256).decode("utf-8", errors="replace")


def test_lookahead_patching_is_refused():
  with pytest.raises(ConfigError, match="model.patching.method"):
    PatchRule.from_config(ml_collections.ConfigDict(dict(method="bpe", patch_size=4)))


def test_cli_prints_the_continuation_of_a_saved_run(model, tmp_path, capsys):
  """A workdir as blt.train leaves it (config.json, an orbax checkpoint of the training state): the command
  prints the prompt and the same continuation as the model it was saved from."""
  from common.configs.base import base_config
  from common.train.checkpoint import Checkpointer
  from common.train.optim import make_optimizer
  from common.train.step import init_state
  cfg = base_config()
  cfg.model = blt_model(**MODEL)
  cfg.model.patching = SPACE
  checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=1, async_save=False)
  checkpointer.save(7, init_state(nnx.split(model, nnx.Param)[1], make_optimizer(cfg.train)),
                    {"step": 7, "data_position": 56})
  checkpointer.close()
  (tmp_path / "config.json").write_text(cfg.to_json_best_effort())
  prompt = PROMPTS[0].decode()
  assert blt_generate.main([f"--workdir={tmp_path}", f"--prompt={prompt}", f"--max_bytes={N_NEW}"]) == 0
  assert capsys.readouterr().out == prompt + generate_samples(model, cfg, [prompt], N_NEW)[0] + "\n"


def test_cli_names_a_workdir_without_a_run(tmp_path):
  with pytest.raises(ConfigError, match="config.json"):
    blt_generate.main([f"--workdir={tmp_path}", "--prompt=a"])
  with pytest.raises(ConfigError, match="--max_bytes"):
    blt_generate.main([f"--workdir={tmp_path}", "--max_bytes=many"])
