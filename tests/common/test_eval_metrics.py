"""Text metrics and sampling metrics against hand-computed cases and brute-force enumeration."""
from __future__ import annotations

import itertools
import math

import pytest

from common.eval import sampling, text_metrics


def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
  assert text_metrics.normalize_answer("  The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
  assert text_metrics.normalize_answer("An apple a day") == "apple day"
  assert text_metrics.normalize_answer("theatre") == "theatre"  # 'the' only as a whole word


def test_exact_match_is_max_over_references():
  assert text_metrics.exact_match("the Paris.", ["London", "paris"]) == 1.0
  assert text_metrics.exact_match("Paris, France", ["paris"]) == 0.0
  assert text_metrics.exact_match("paris", "Paris") == 1.0


def test_token_f1_hand_computed():
  # prediction tokens {new, york, city}, reference {york, city, of, new, york}: 3 in common,
  # P = 3/3, R = 3/5, F1 = 2 * 1 * 0.6 / 1.6 = 0.75.
  assert text_metrics.token_f1("New York City", "york city of new york") == pytest.approx(0.75)
  # Repeated tokens count up to their multiplicity: {york: 2} vs {york: 1} -> P = 1/2, R = 1, F1 = 2/3.
  assert text_metrics.token_f1("york york", "York") == pytest.approx(2 / 3)
  assert text_metrics.token_f1("blue", ["red", "a blue car"]) == pytest.approx(2 * 1 * 0.5 / 1.5)
  assert text_metrics.token_f1("nothing shared", "entirely different") == 0.0


def test_token_f1_empty_answers_follow_squad_v2():
  assert text_metrics.token_f1("the", "") == 1.0  # both normalise to no tokens
  assert text_metrics.token_f1("", "an answer") == 0.0


def test_rouge_l_matches_hand_computed_lcs():
  # LCS of "the cat sat on the mat" and "the cat on mat" is "the cat on mat": 4 tokens.
  # P = 4/4, R = 4/6, F = 2PR / (P + R) = 0.8.
  assert text_metrics.rouge_l("the cat on mat", "the cat sat on the mat") == pytest.approx(0.8)
  # Order matters for LCS, not for F1: reversed tokens share only one in sequence.
  assert text_metrics.rouge_l("c b a", "a b c") == pytest.approx(1 / 3)
  assert text_metrics.rouge_l("c b a", ["a b c", "c b a"]) == pytest.approx(1.0)


def test_references_must_not_be_empty():
  with pytest.raises(ValueError, match="references"):
    text_metrics.exact_match("x", [])


def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
  outcomes = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(outcomes[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_pass_at_k_equals_fraction_of_k_subsets_with_a_correct_sample(n):
  for c in range(n + 1):
    for k in range(1, n + 1):
      assert sampling.pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k), abs=1e-12)


def test_pass_at_k_is_exact_for_large_n():
  # pass@1 is the fraction correct; with n = 1000 the binomials are huge but the rational is exact.
  assert sampling.pass_at_k(1000, 337, 1) == 0.337
  assert sampling.pass_at_k(1000, 1, 10) == pytest.approx(1 - math.comb(999, 10) / math.comb(1000, 10))


def test_pass_at_k_rejects_bad_counts():
  with pytest.raises(ValueError, match="k=4"):
    sampling.pass_at_k(3, 1, 4)
  with pytest.raises(ValueError, match="c=5"):
    sampling.pass_at_k(3, 5, 1)


def test_majority_vote_picks_largest_class_and_breaks_ties_by_first_appearance():
  assert sampling.majority_vote(["a", "b", "b", "a", "b"]) == 1
  assert sampling.majority_vote(["b", "a", "a", "b"]) == 0  # tie: 'b' appeared first
  assert sampling.majority_vote([None, "x", None]) == 1  # no answer is no vote
  assert sampling.majority_vote([None, None]) is None


def test_majority_vote_groups_by_the_given_equivalence():
  same_parity = lambda a, b: a % 2 == b % 2
  assert sampling.majority_vote([2, 3, 5, 4, 7], same_parity) == 1  # odd: 3 votes
