"""The four similarities: BM25 against a hand-computed score, the BERTScore-style matcher on a hand case, the
symmetrised likelihood symmetric and equal to its two halves, the LM embedding cosine of identical texts 1."""
import math

import numpy as np
import pytest

from common.config import ConfigError
from common.configs.base import dense_model
from common.models import build_model
from common.scoring import likelihood_relevance
from common.tokenizers import ByteTokenizer
from icl_explanations import similarity


def test_bm25_matches_a_hand_computed_score():
  # k1 = 1.5, b = 0.75; documents "a b" and "b c c" (avgdl 2.5), query "c": idf(c) = ln(1 + 1.5 / 1.5) = ln 2,
  # the second document has f = 2 and |d| = 3: 2 * 2.5 / (2 + 1.5 * (0.25 + 0.75 * 3 / 2.5)) = 5 / 3.725.
  scores = similarity.bm25(["c"], ["a b", "b c c"], k1=1.5, b=0.75)
  assert scores[0, 0] == 0.0
  assert scores[0, 1] == pytest.approx(math.log(2) * 5 / 3.725)
  assert similarity.terms("3 # 4 @ 2") == ["3", "#", "4", "@", "2"]


def test_greedy_token_matching_f1_by_hand():
  # recall: token 1 of a matches (1), token 2 does not (0) -> 0.5; precision: b's one token matches -> 1.
  a, b = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[2.0, 0.0]])
  assert similarity.greedy_match_f1(a, b) == pytest.approx(2 * 0.5 * 1.0 / 1.5)
  assert similarity.greedy_match_f1(a, a) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_model():
  return build_model(dense_model(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, vocab_size=384), seed=0)


def test_symmetrised_likelihood_is_symmetric_and_the_mean_of_both_directions(tiny_model):
  tokenizer, texts = ByteTokenizer(), ["2 # 3", "4 @ 1 # 2", "tiger lemon"]
  scores = similarity.similarity("likelihood", texts, texts, model=tiny_model, tokenizer=tokenizer)
  assert scores.shape == (3, 3) and np.allclose(scores, scores.T, atol=1e-5)
  rows = [tokenizer.encode(t) for t in texts]
  start, sep = tokenizer.encode("Q:"), tokenizer.encode("\n")
  vocab = tokenizer.vocab_size
  a_given_b = likelihood_relevance(tiny_model, [rows[2] + sep], [rows[0]], start=start, vocab_size=vocab)[0]
  b_given_a = likelihood_relevance(tiny_model, [rows[0] + sep], [rows[2]], start=start, vocab_size=vocab)[0]
  assert scores[0, 2] == pytest.approx((a_given_b + b_given_a) / 2, abs=1e-5)


def test_lm_similarities_score_a_text_against_itself_highest(tiny_model):
  texts = ["2 # 3", "tiger lemon"]
  for kind in ("embedding", "token_match"):
    scores = similarity.similarity(kind, texts, texts, model=tiny_model, tokenizer=ByteTokenizer())
    assert np.allclose(np.diag(scores), 1.0, atol=1e-5) and (scores <= 1.0 + 1e-5).all()
  with pytest.raises(ConfigError, match="unknown similarity 'jaccard'"):
    similarity.similarity("jaccard", texts, texts)
