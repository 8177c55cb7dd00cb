"""EASE as specifications: mask statistics against the prior, evidence-only conditioning, the KL on hand-computed
cases, ROUGE and the evidence metrics on hand-computed pairs, the data layout, the config errors, and the
abstractor started from a checkpoint-library entry."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.config import ConfigError, load
from common.configs.base import dense_model
from common.models import checkpoint_library as hub
from common.models.dense_lm import DenseLM
from common.nn.relaxed_bernoulli import (bernoulli_kl, gumbel_sigmoid, hard_concrete,
                                         hard_concrete_keep_probability)
from ease import data as ease_data
from ease import evaluate, train
from common.tokenizers import ByteTokenizer
from ease.model import build_model
from tests.mesh_invariance import assert_train_step_mesh_invariant

CONFIG = "ease/configs/tiny.py"


SMALL = [("model.d_model", "32"), ("model.n_heads", "2"), ("model.d_ff", "64"), ("data.train_docs", "16"),
         ("data.eval_docs", "8"), ("data.doc_len", "56"), ("data.summary_len", "24"), ("data.max_units", "6"),
         ("data.min_sents", "3"), ("data.max_sents", "4"), ("data.min_key", "1"), ("data.max_key", "2"),
         ("train.batch_size", "4")]


def small_config(arg: str, overrides=(), **data):
  """Tiny shapes: documents of 3-4 sentences (never cut at doc_len), 1-2 key facts."""
  cfg = load(f"{CONFIG}:{arg}", SMALL + list(overrides))
  cfg.data.update(data)
  return train.resolve(cfg)


@pytest.mark.parametrize("logit", [-1.5, 0.0, 0.8])
def test_gumbel_sigmoid_keeps_with_the_prior_probability(logit):
  """P(sample > 1/2) = sigmoid(logit) at any temperature: with logit = log(pi / (1 - pi)) the masks keep pi."""
  u = jax.random.uniform(jax.random.key(0), (200_000,))
  for temperature in (0.3, 1.0):
    sample = gumbel_sigmoid(jnp.full(u.shape, logit), u, temperature)
    assert float(jnp.mean(sample > 0.5)) == pytest.approx(1 / (1 + math.exp(-logit)), abs=0.005)


def test_hard_concrete_nonzero_share_matches_its_formula():
  u = jax.random.uniform(jax.random.key(1), (200_000,))
  for logit in (-1.0, 0.5):
    sample = hard_concrete(jnp.full(u.shape, logit), u, 0.5)
    p_nonzero = float(hard_concrete_keep_probability(jnp.asarray(logit), 0.5))
    assert float(jnp.mean(sample > 0)) == pytest.approx(p_nonzero, abs=0.005)
    assert float(jnp.mean(sample == 0)) > 0.05 and float(jnp.mean(sample == 1)) > 0.05  # exact zeros and ones


def test_bernoulli_kl_hand_computed():
  assert float(bernoulli_kl(jnp.asarray(0.3), 0.3)) == pytest.approx(0.0, abs=1e-7)
  # KL(B(0.5) || B(0.25)) = 0.5 ln 2 + 0.5 ln(2/3)
  assert float(bernoulli_kl(jnp.asarray(0.5), 0.25)) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
  assert float(bernoulli_kl(jnp.asarray(1.0), 0.2)) == pytest.approx(-math.log(0.2))  # 0 log 0 = 0
  assert float(bernoulli_kl(jnp.asarray(0.0), 0.2)) == pytest.approx(-math.log(0.8))


def test_extractor_kl_is_the_mean_over_a_documents_units():
  cfg = small_config("variant=ease,level=sentence,pi=0.2")
  model = build_model(cfg.model, seed=0)
  data = train.data_for(cfg)
  batch = {k: jnp.asarray(v) for k, v in next(data.eval_batches(1)).items()}
  _, kl = model.unit_mask(batch, hard=False)
  logits = model.unit_logits(batch)
  valid, _ = model.units(batch)
  p = 1 / (1 + np.exp(-np.asarray(logits)))
  expected = [np.mean([p_ * math.log(p_ / 0.2) + (1 - p_) * math.log((1 - p_) / 0.8)
                       for p_, v in zip(row, vrow) if v]) for row, vrow in zip(p, np.asarray(valid))]
  np.testing.assert_allclose(np.asarray(kl), expected, rtol=1e-4)


@pytest.mark.parametrize("level", ["sentence", "token"])
def test_summary_does_not_depend_on_unselected_tokens(level):
  """With the hard mask, rewriting every unselected document token leaves the summary logits unchanged (and
  rewriting a selected one changes them): the abstractor reads the evidence only."""
  cfg = small_config(f"variant=ease,level={level}")
  model = build_model(cfg.model, seed=0)
  data = train.data_for(cfg)
  batch = {k: jnp.asarray(v) for k, v in next(data.eval_batches(1)).items()}
  unit_mask, _ = model.unit_mask(batch, hard=True, budget=0.4)
  keep = model.keep(batch, unit_mask)
  doc = np.asarray(batch["doc_mask"])
  hidden = doc & (np.asarray(keep) == 0)
  assert hidden.any() and (doc & (np.asarray(keep) > 0)).any()
  summary = slice(cfg.data.doc_len, None)
  base = model(batch["inputs"], keep)[:, summary]
  noise = np.random.default_rng(0).integers(5, cfg.model.vocab_size - 2, batch["inputs"].shape)
  changed = jnp.where(hidden, noise, batch["inputs"])
  np.testing.assert_allclose(np.asarray(model(changed, keep)[:, summary]), np.asarray(base), atol=1e-5)
  visible = jnp.where(doc & (np.asarray(keep) > 0), noise, batch["inputs"])
  assert float(jnp.max(jnp.abs(model(visible, keep)[:, summary] - base))) > 1e-3


def test_relaxed_mask_passes_gradient_to_the_extractor():
  cfg = small_config("variant=ease,level=token")
  model = build_model(cfg.model, seed=0)
  batch = {k: jnp.asarray(v) for k, v in train.data_for(cfg).train_batch(0).items()}
  grads = nnx.grad(lambda m: train.loss_fn(m, batch)[0])(model)
  assert float(jnp.abs(grads.extractor.score.kernel[...]).sum()) > 0


@pytest.mark.parametrize("arg", ["variant=lead", "variant=ease,level=token"])
def test_cached_decoding_matches_the_full_forward(arg):
  cfg = small_config(arg)
  model = build_model(cfg.model, seed=0)
  data = train.data_for(cfg)
  batch = {k: jnp.asarray(v) for k, v in next(data.eval_batches(1)).items()}
  keep, ids = evaluate.generate(model, batch, budget=0.5, doc_len=data.doc_len, summary_len=6)
  tokens = batch["inputs"].at[:, data.doc_len + 1:].set(0).at[:, data.doc_len + 1:data.doc_len + 6].set(ids[:, :5])
  full = jnp.argmax(model(tokens, keep)[:, data.doc_len:data.doc_len + 6], -1)
  np.testing.assert_array_equal(np.asarray(full), np.asarray(ids))


def test_lead_keeps_the_first_sentences():
  cfg = small_config("variant=lead")
  model = build_model(cfg.model, seed=0)
  batch = {k: jnp.asarray(v) for k, v in next(train.data_for(cfg).eval_batches(1)).items()}
  keep = np.asarray(model.keep(batch, model.unit_mask(batch, hard=True, budget=0.3)[0]))
  sent_ids = np.asarray(batch["sent_ids"])
  for row in range(keep.shape[0]):
    n = sent_ids[row].max()
    k = max(1, round(0.3 * n))
    kept = sorted(set(sent_ids[row][(keep[row] > 0) & (sent_ids[row] > 0)]))
    assert kept == list(range(1, k + 1))
    assert keep[row, 0] == 1 and (keep[row, cfg.data.doc_len:] == 1).all()


def test_rouge_hand_computed():
  scores = evaluate.rouge("the cat sat", "the cat sat on the mat")
  # unigrams: 3 shared of 3 predicted and 6 reference -> F = 2 * 1 * 0.5 / 1.5; bigrams: 2 of 2 and 5
  assert scores["rouge1"] == pytest.approx(2 / 3)
  assert scores["rouge2"] == pytest.approx(2 * 1 * 0.4 / 1.4)
  assert scores["rougeL"] == pytest.approx(2 / 3)
  assert evaluate.rouge("a b c", "x y z") == dict(rouge1=0.0, rouge2=0.0, rougeL=0.0)


def test_faithfulness_and_evidence_scores_hand_computed():
  assert evaluate.faithfulness("mira won the cup .", "mira won the cup in oslo") == 1.0
  assert evaluate.faithfulness("mira built a boat", "mira won the cup") == 0.25
  keep = np.array([1, 1, 0, 0, 1, 1])
  doc_mask = np.array([0, 1, 1, 1, 1, 0], bool)
  gold = np.array([0, 1, 1, 0, 0, 0], np.float32)
  s = evaluate.evidence_scores(keep, doc_mask, gold)
  assert s["compression"] == 0.5 and s["evidence_precision"] == 0.5 and s["evidence_recall"] == 0.5


def test_generated_rows_have_the_layout():
  cfg = small_config("variant=ease")
  data = train.data_for(cfg)
  rows, doc_len, tok = data.rows["train"], data.doc_len, data.tokenizer
  ex = data.examples["train"][0]
  assert rows["inputs"][0, 0] == data.bos_id and rows["inputs"][0, doc_len] == data.sep_id
  assert tok.decode(rows["inputs"][0, 1:doc_len]) == " ".join(ex.sentences)
  summary = rows["targets"][0][rows["loss_mask"][0] > 0]
  assert tok.decode(summary) == ex.summary and summary[-1] == tok.eos_id
  gold_text = tok.decode(rows["inputs"][0][rows["gold"][0] > 0])
  assert gold_text == " ".join(ex.sentences[i] for i in ex.gold)
  batch_a, batch_b = data.train_batch(3), data.train_batch(3)
  assert all(np.array_equal(batch_a[k], batch_b[k]) for k in batch_a)


def test_jsonl_reader_and_errors(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text(json.dumps(dict(document="A cat sat. It slept! Then it left.", summary="cat slept",
                                  gold_sentences=[1])) + "\n")
  [ex] = ease_data.read_jsonl(str(path))
  assert ex.sentences == ("A cat sat.", "It slept!", "Then it left.") and ex.gold == (1,)
  path.write_text('{"document": "x"}\n')
  with pytest.raises(ConfigError, match=r"docs.jsonl:1: .*'summary'"):
    ease_data.read_jsonl(str(path))
  path.write_text('{"document": "x.", "summary": "y"}\nnot json\n')
  with pytest.raises(ConfigError, match=r"docs.jsonl:2: not JSON"):
    ease_data.read_jsonl(str(path))


def test_config_errors_name_the_key():
  with pytest.raises(ConfigError, match="'level'.*sentence, token"):
    load(f"{CONFIG}:level=word")
  with pytest.raises(ConfigError, match="model.pi"):
    train.validate(small_config("variant=ease,pi=1.5"))
  with pytest.raises(ConfigError, match="data.source"):
    small_config("variant=ease", source="web")


def test_train_then_evaluate_end_to_end(tmp_path, capsys):
  """`python -m ease.train` in-process for a few steps, then `python -m ease.evaluate` on its workdir."""
  workdir = str(tmp_path / "run")
  small = [f"--config.{key}={value}" for key, value in SMALL if key != "train.batch_size"]
  flags = [f"--config={CONFIG}:variant=ease,level=token", f"--workdir={workdir}", "--config.train.steps=2",
           "--config.train.batch_size=8", "--config.eval.every_steps=2", "--config.eval.batches=1",
           "--config.checkpoint.every_steps=2", "--config.log.progress=lines", *small]
  assert train.main(flags) == 0
  capsys.readouterr()
  assert evaluate.main([f"--workdir={workdir}", "--budgets=0.5", "--docs=4"]) == 0
  scores = json.loads(capsys.readouterr().out)
  assert list(scores["budgets"]) == ["0.5"] and len(scores["samples"]) == 3
  assert 0.4 <= scores["budgets"]["0.5"]["compression"] <= 0.6  # token level: half of each document's tokens


def test_bad_input_is_refused_before_the_workdir_is_made(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match="data.path"):
    train.main([f"--config={CONFIG}", f"--workdir={workdir}", "--config.data.source=jsonl"])
  assert not workdir.exists()


def test_train_step_is_mesh_invariant():
  """One train step on 1 device and on data 2 x fsdp 2 x tensor 2 gives the same loss, gradient norm and
  parameters."""
  cfg = small_config("variant=ease,level=sentence", train_docs=16)
  cfg.train.batch_size = 8
  task = train.make_task(cfg)
  assert_train_step_mesh_invariant(task, cfg.train, task.data.train_batch(0))


def _store_abstractor(tmp_path, monkeypatch) -> DenseLM:
  """A tiny dense LM with a byte tokenizer, stored as checkpoint-library entry 'tiny-abstractor' in tmp_path."""
  monkeypatch.setenv(hub.ENV_ROOT, str(tmp_path / "hub"))
  lm_cfg = dense_model(vocab_size=384, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48)
  lm = DenseLM(lm_cfg, rngs=nnx.Rngs(params=5))
  hub.save("tiny-abstractor", lm_cfg, lm, tokenizer=ByteTokenizer())
  return lm


def test_abstractor_starts_from_a_checkpoint_library_entry(tmp_path, monkeypatch):
  """model.init_from: the entry's architecture, parameters and tokenizer; with every key kept (a zero bias) the
  abstractor's logits are the stored LM's."""
  lm = _store_abstractor(tmp_path, monkeypatch)
  cfg = small_config("variant=ease,level=sentence", [("model.init_from", "tiny-abstractor")])
  assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_kv_heads, cfg.model.vocab_size) == (32, 1, 2, 384)
  assert (cfg.model.variant, cfg.model.enc_layers, cfg.model.name) == ("ease", 1, "ease")
  task = train.make_task(cfg)
  data = task.data
  assert isinstance(data.tokenizer, ByteTokenizer) and data.sep_id == data.bos_id == ByteTokenizer().eos_id
  model = task.build_model()
  batch = {k: jnp.asarray(v) for k, v in next(data.eval_batches(1)).items()}
  want = np.asarray(lm(batch["inputs"]))
  np.testing.assert_allclose(np.asarray(model(batch["inputs"], jnp.ones(batch["inputs"].shape))), want, atol=1e-5)
  keep = model.keep(batch, model.unit_mask(batch, hard=True)[0])
  assert float(jnp.max(jnp.abs(model(batch["inputs"], keep) - want))) > 1e-3  # the evidence bias does act


def test_unknown_abstractor_entry_is_refused_before_the_workdir_is_made(tmp_path, monkeypatch):
  _store_abstractor(tmp_path, monkeypatch)
  with pytest.raises(ConfigError, match="model.init_from.*'no-such-entry'.*tiny-abstractor"):
    small_config("variant=ease", [("model.init_from", "no-such-entry")])
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match="model.init_from"):
    train.main([f"--config={CONFIG}", f"--workdir={workdir}", "--config.model.init_from=no-such-entry"])
  assert not workdir.exists()
