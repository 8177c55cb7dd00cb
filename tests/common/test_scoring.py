"""common.scoring: continuation log-likelihoods against summing the model's log-softmax by hand, independence
from batching and padding, perplexity, multiple choice, the same scores on an 8-device mesh; LM similarity:
embeddings and cosine matrix against numpy on the model's hidden states, padding invariance, relevance."""
import math

import jax
import numpy as np
import pytest
from flax import nnx

from common import sharding
from common.configs.base import dense_model
from common.models.dense_lm import DenseLM
from common.scoring import (choose, embed_texts, likelihood_relevance, perplexity, score_continuations,
                            similarity_matrix)

VOCAB = 64
WIDTH = 16  # longer than every row of these tests


@pytest.fixture(scope="module")
def model():
  cfg = dense_model(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                    tie_embeddings=False)
  return DenseLM(cfg, rngs=nnx.Rngs(params=0))


def _examples(seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(1, 4), (6, 2), (3, 7), (9, 1), (2, 3)]  # (prompt, continuation) lengths
  return ([[int(t) for t in rng.integers(0, VOCAB, p)] for p, _ in shapes],
          [[int(t) for t in rng.integers(0, VOCAB, c)] for _, c in shapes])


def _by_hand(model, prompts, continuations, vocab_size=VOCAB):
  """log p(c_t | prompt, c_<t) of each example from the model's log-softmax over its whole row. The rows go
  right-padded through one forward pass: causal attention keeps the padding after a row's end invisible."""
  rows = [p + c for p, c in zip(prompts, continuations)]
  buffer = np.zeros((len(rows), WIDTH), np.int32)
  for i, row in enumerate(rows):
    buffer[i, :len(row)] = row
  logits = np.asarray(model(buffer), np.float64)[..., :vocab_size]
  shifted = logits - logits.max(-1, keepdims=True)
  logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return [np.array([logprobs[i, len(p) - 1 + t, token] for t, token in enumerate(c)])
          for i, (p, c) in enumerate(zip(prompts, continuations))]


@pytest.mark.parametrize("vocab_size", [0, 50], ids=["whole_vocab", "padded_vocab"])
def test_scores_are_summed_log_softmax_of_the_full_forward(model, vocab_size):
  prompts, continuations = _examples()
  continuations = [[t % 50 for t in c] for c in continuations]
  scored = score_continuations(model, prompts, continuations, vocab_size=vocab_size)
  for expected, s in zip(_by_hand(model, prompts, continuations, vocab_size or VOCAB), scored):
    np.testing.assert_allclose(s.token_logprobs, expected, atol=1e-5)
    assert s.logprob == pytest.approx(expected.sum(), abs=1e-4)


def test_batching_and_padding_do_not_change_scores(model):
  prompts, continuations = _examples(1)
  together = score_continuations(model, prompts, continuations, batch_size=8)
  in_pairs = score_continuations(model, prompts, continuations, batch_size=2)
  for i, s in enumerate(together):
    alone = score_continuations(model, [prompts[i]], [continuations[i]])[0]
    np.testing.assert_allclose(s.token_logprobs, alone.token_logprobs, atol=1e-5)
    np.testing.assert_allclose(in_pairs[i].token_logprobs, alone.token_logprobs, atol=1e-5)


def test_the_greedy_continuation_is_flagged(model):
  prompt, greedy = [5, 9, 2], []
  for _ in range(3):
    row = prompt + greedy
    logits = np.asarray(model(np.asarray([row + [0] * (WIDTH - len(row))])))
    greedy.append(int(logits[0, len(row) - 1].argmax()))
  other = greedy[:2] + [(greedy[2] + 1) % VOCAB]
  flags = [s.is_greedy for s in score_continuations(model, [prompt, prompt], [greedy, other])]
  assert flags == [True, False]


def test_perplexity_is_exp_of_the_mean_token_nll(model):
  rows = [[3, 14, 15, 9, 26], [5, 35, 8]]
  nll = -sum(lp.sum() for lp in _by_hand(model, [row[:1] for row in rows], [row[1:] for row in rows]))
  assert perplexity(model, rows) == pytest.approx(math.exp(nll / 6), rel=1e-5)


def test_choose_takes_the_argmax_of_summed_or_mean_log_likelihood(model):
  prompt = [7, 1, 30]
  options = [[4], [4, 12, 40, 2], [33, 8], [19, 19, 19]]
  sums = np.array([lp.sum() for lp in _by_hand(model, [prompt] * len(options), options)])
  means = sums / np.array([len(o) for o in options])
  assert choose(model, prompt, options) == int(sums.argmax())
  assert choose(model, prompt, options, length_normalize=True) == int(means.argmax())


def test_mesh_gives_the_scores_of_one_device(model):
  prompts, continuations = _examples(2)
  mesh = sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  single = score_continuations(model, prompts, continuations)
  sharded = score_continuations(model, prompts, continuations, mesh=mesh)
  assert jax.tree.leaves(nnx.state(model))[0].sharding.num_devices == 1  # the model itself was not moved
  for a, b in zip(single, sharded):
    np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5)


def _texts(seed=3):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(1, VOCAB, n)] for n in (5, 1, 12, 7, 3, 9)]


def _pooled_by_hand(model, row):
  """Mean of the final hidden states of one unpadded row, in numpy."""
  return np.asarray(model.hidden(np.asarray([row], np.int32)), np.float64)[0].mean(axis=0)


def test_similarity_matrix_is_the_cosine_of_mean_pooled_hidden_states(model):
  texts = _texts()
  pooled = np.stack([_pooled_by_hand(model, row) for row in texts])
  unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
  np.testing.assert_allclose(similarity_matrix(model, texts[:4], texts[2:], batch_size=3),
                             unit[:4] @ unit[2:].T, atol=1e-5)
  np.testing.assert_allclose(embed_texts(model, texts, batch_size=4), pooled, atol=1e-5)


def test_an_embedding_does_not_depend_on_batch_mates_or_padding(model):
  texts = _texts(4)
  together = embed_texts(model, texts, batch_size=8)
  for i, row in enumerate(texts):
    alone = embed_texts(model, [row])[0]  # padded to its own width, no batch mates
    np.testing.assert_allclose(together[i], alone, atol=1e-5)
    mates = [texts[(i + 1) % len(texts)] * 3, row, [1] * 40]  # wider rows: more padding after it
    np.testing.assert_allclose(embed_texts(model, mates)[1], alone, atol=1e-5)


def test_identical_texts_have_similarity_one(model):
  texts = _texts(5)
  sims = similarity_matrix(model, texts + texts[:2])
  np.testing.assert_allclose(np.diag(sims), 1.0, atol=1e-5)
  np.testing.assert_allclose(sims[len(texts), 0], 1.0, atol=1e-5)
  np.testing.assert_allclose(sims[len(texts) + 1, 1], 1.0, atol=1e-5)
  assert sims.max() <= 1.0 + 1e-5


def test_relevance_is_the_mean_gain_in_log_likelihood_from_the_context(model):
  start, contexts, texts = [2], [[7, 8, 9], [40, 41]], [[3, 4], [5, 6, 10]]
  relevance = likelihood_relevance(model, contexts, texts, start=start)
  given = _by_hand(model, [start + c for c in contexts], texts)
  plain = _by_hand(model, [start, start], texts)
  expected = [(g.sum() - p.sum()) / len(t) for g, p, t in zip(given, plain, texts)]
  np.testing.assert_allclose(relevance, expected, atol=1e-5)


@pytest.mark.parametrize("bad", [VOCAB, -3])
def test_out_of_range_ids_are_refused(model, bad):
  prompts, continuations = _examples()
  continuations[3][0] = bad
  with pytest.raises(ValueError, match=f"example 3 holds token id {bad}, outside the model's vocabulary"):
    score_continuations(model, prompts, continuations)
  with pytest.raises(ValueError, match="row 0 holds token id"):
    embed_texts(model, [[1, bad]])
  with pytest.raises(ValueError, match="exceeds the model's vocabulary of 64"):
    score_continuations(model, *_examples(), vocab_size=VOCAB + 1)


def test_rows_past_the_context_are_refused():
  cfg = dense_model(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, max_len=9)
  short = DenseLM(cfg, rngs=nnx.Rngs(params=0))
  prompts, continuations = _examples()  # rows of 5, 8, 10, 10, 5 tokens: inputs of 4, 7, 9, 9, 4
  assert len(score_continuations(short, prompts, continuations)) == 5
  continuations[2].append(1)
  with pytest.raises(ValueError, match="example 2 has 10 tokens, more than the model's context of 9"):
    score_continuations(short, prompts, continuations)
  with pytest.raises(ValueError, match="row 0 has 10 tokens"):
    embed_texts(short, [[1] * 10])
