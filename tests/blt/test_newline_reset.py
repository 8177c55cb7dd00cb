"""The entropy model's context reset at newlines (`model.patching.reset_at_newline`, blt.entropy; Pagnoni et al.
2024, Sec. 4.4): with it every line is scored as its own document, the newline leading its line; without it
nothing changes; it stays causal; cached generation with it equals recomputing the whole sequence."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from blt.configs import tiny
from blt.data import BOS, PatchingData, blt_to_seqio
from blt.entropy import EntropyScorer, next_byte_entropies
from blt.generate import Generator, PatchRule
from blt.model import BLT, blt_model
from blt.patcher import patch
from blt.train import validate_blt_config
from common.config import ConfigError
from common.configs.base import dense_model
from common.models.dense_lm import DenseLM

DOCS = [b"ab c\nhello\n\nx = 1\nend", b"\nto be\nor not"]  # packed into one row, then padding
ROW = 48


@pytest.fixture(scope="module")
def entropy_model():
  # 384 outputs, as `padded_vocab_size` gives a trained one, so the real-vocabulary mask matters too.
  cfg = dense_model(vocab_size=384, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, window=5)
  return DenseLM(cfg, rngs=nnx.Rngs(params=1))


def _documents():
  return [np.array([BOS, *doc], np.int32) for doc in DOCS]


def _seqio_batch(docs, length):
  """A packed LMData-style batch (seqio ids, BOS as 0 at each segment start) of one row."""
  ids, seg, pos = np.zeros((1, length), np.int32), np.zeros((1, length), np.int32), np.zeros((1, length), np.int32)
  start = 0
  for i, doc in enumerate(docs, 1):
    ids[0, start:start + len(doc)] = blt_to_seqio(doc)
    seg[0, start:start + len(doc)], pos[0, start:start + len(doc)] = i, np.arange(len(doc))
    start += len(doc)
  return {"inputs": ids, "segment_ids": seg, "positions": pos}, start


def _alone(model, pieces):
  """Each piece scored as a document of its own, one row each (padded on the right, which a causal model
  never reads), concatenated."""
  rows = np.zeros((len(pieces), ROW), np.int32)
  for row, piece in zip(rows, pieces):
    row[:len(piece)] = blt_to_seqio(piece)
  h = np.asarray(next_byte_entropies(model, jnp.asarray(rows)))
  return np.concatenate([h_row[:len(piece)] for h_row, piece in zip(h, pieces)])


def _lines(doc):
  """A document cut before each newline byte: BOS + the first line, then '\\n' + each later line."""
  cuts = [i for i in range(1, len(doc)) if doc[i] == ord("\n")]
  return np.split(doc, cuts)


def test_with_reset_every_line_is_scored_as_its_own_document(entropy_model):
  batch, used = _seqio_batch(_documents(), ROW)
  h = PatchingData(None, entropy_scorer=EntropyScorer(entropy_model, reset_at_newline=True)).add_patching_inputs(
      batch)["entropies"]
  expected = _alone(entropy_model, [line for doc in _documents() for line in _lines(doc)])
  np.testing.assert_allclose(h[0, :used], expected, atol=1e-5, rtol=0)
  h_off = PatchingData(None, entropy_scorer=EntropyScorer(entropy_model)).add_patching_inputs(batch)["entropies"]
  assert np.abs(h_off[0, :used] - h[0, :used]).max() > 1e-2  # the lines after the first read less context


def test_without_reset_documents_are_scored_whole_as_before(entropy_model):
  batch, used = _seqio_batch(_documents(), ROW)
  h = PatchingData(None, entropy_scorer=EntropyScorer(entropy_model)).add_patching_inputs(batch)["entropies"]
  np.testing.assert_allclose(h[0, :used], _alone(entropy_model, _documents()), atol=1e-5, rtol=0)


def test_reset_is_causal(entropy_model):
  scorer = EntropyScorer(entropy_model, reset_at_newline=True)
  rng = np.random.default_rng(0)
  text = lambda n: rng.choice(np.frombuffer(b"ab \n", np.uint8), (2, n)).astype(np.int32)
  x = text(40)
  base = scorer(x)
  for t in (0, 4, 9, 22, 37):
    y = x.copy()
    y[:, t + 1:] = text(39 - t)
    h = scorer(y)
    np.testing.assert_allclose(h[:, :t + 1], base[:, :t + 1], atol=1e-6, err_msg=f"t={t}")
    assert np.abs(h[:, t + 1:] - base[:, t + 1:]).max() > 1e-3  # while the changed bytes are read


# ------------------------------------------------------------------ cached generation equals recompute

BLT_MODEL = dict(d_local=32, n_heads_local=2, local_window=6, n_heads_cross=2, d_global=48, n_heads_global=2,
                 n_layers_global=2, hash_n_max=5, hash_table_size=101)
PROMPTS = [b"ab\ncd e\nfg", b"x\n\ny = 1\nz"]  # newlines inside the prompt: fed through the cached steps
N_NEW = 12


@functools.partial(jax.jit, static_argnames="rule")
def _patches(ids, entropies, rule):
  return patch(ids, method=rule.method, max_patches=ids.shape[1], entropies=entropies, threshold=rule.threshold,
               max_patch_length=rule.max_patch_length)


@nnx.jit
def _forward(model, ids, patch_ids, next_patch_ids):
  return model(ids, patch_ids, ids.shape[1], next_patch_ids=next_patch_ids)


def _recompute(model, rule, scorer, prompt, n_new):
  """Greedy generation by the full model on the whole sequence at every byte: (ids, logits, starts)."""
  ids = np.zeros((prompt.shape[0], prompt.shape[1] + n_new), np.int32)
  ids[:, :prompt.shape[1]] = prompt

  def forward():
    patches = _patches(jnp.asarray(ids), jnp.asarray(scorer(ids)), rule)
    logits = _forward(model, jnp.asarray(ids), patches.patch_ids, patches.next_patch_ids)
    return np.asarray(logits), np.asarray(patches.patch_starts)

  for t in range(prompt.shape[1] - 1, ids.shape[1] - 1):
    ids[:, t + 1] = forward()[0][:, t].argmax(-1)
  logits, starts = forward()
  return ids, logits[:, :-1], starts


def test_cached_generation_with_reset_equals_recompute(entropy_model):
  model = BLT(blt_model(**BLT_MODEL), rngs=nnx.Rngs(params=0))
  prompt = np.array([[BOS, *p] for p in PROMPTS], np.int32)
  scorer = EntropyScorer(entropy_model, reset_at_newline=True)
  h = np.sort(scorer(prompt).ravel())  # a threshold between two middle entropies: about half the bytes open
  rule = PatchRule("entropy", threshold=float(h[len(h) // 2] + h[len(h) // 2 + 1]) / 2, max_patch_length=6,
                   reset_at_newline=True)
  ref_ids, ref_logits, ref_starts = _recompute(model, rule, scorer, prompt, N_NEW)
  h = scorer(ref_ids)
  assert np.abs(h - rule.threshold).min() > 1e-4  # no entropy within float noise of the threshold
  assert np.abs(h - EntropyScorer(entropy_model)(ref_ids)).max() > 1e-2  # the reset changes the entropies
  gen = Generator(model, rule, max_len=ref_ids.shape[1], entropy_model=entropy_model).run(prompt, N_NEW)
  np.testing.assert_array_equal(gen.patch_starts, ref_starts[:, :-1])
  np.testing.assert_array_equal(gen.byte_ids, ref_ids)
  np.testing.assert_allclose(gen.logits, ref_logits, atol=1e-5, rtol=1e-5)
  n_patches = ref_starts[:, :-1].sum(1)
  assert (n_patches >= 4).all() and (n_patches < ref_starts.shape[1] - 4).all(), n_patches


# ---------------------------------------------------------------------------------------------- config


def test_the_option_is_off_unless_set_and_validated():
  assert not PatchRule.from_config(ml_collections.ConfigDict(dict(method="entropy", patch_size=6))).reset_at_newline
  assert not tiny.get_config().model.patching.reset_at_newline
  cfg = tiny.get_config("reset_at_newline=1")
  assert cfg.model.patching.reset_at_newline and PatchRule.from_config(cfg.model.patching).reset_at_newline
  validate_blt_config(cfg)
  cfg.model.patching = ml_collections.ConfigDict({**cfg.model.patching.to_dict(), "reset_at_newline": "yes"})
  with pytest.raises(ConfigError, match="model.patching.reset_at_newline"):
    validate_blt_config(cfg)
  with pytest.raises(ValueError, match="reset_at_newline"):
    tiny.get_config("reset_at_newline=yes")
