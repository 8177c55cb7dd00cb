"""Exemplar selection (Ye et al. 2023, sec. 5): MMR on a hand-computed similarity matrix, nearest neighbours,
seeded random, and the query never chosen as its own exemplar."""
import numpy as np
import pytest

from common.config import ConfigError
from icl_explanations import selection

RELEVANCE = np.array([0.9, 0.85, 0.3, 0.1])
POOL = np.array([[1.0, 0.95, 0.1, 0.2],
                 [0.95, 1.0, 0.2, 0.1],
                 [0.1, 0.2, 1.0, 0.3],
                 [0.2, 0.1, 0.3, 1.0]])


@pytest.mark.parametrize("lam, expected", [
    # lambda 1: relevance alone, the nearest neighbours.
    (1.0, [0, 1, 2]),
    # lambda 0.5: after 0, candidate 1 scores .425 - .475 = -.05, 2 scores .15 - .05 = .10, 3 scores .05 - .10;
    # then 1: .425 - .475 = -.05 beats 3: .05 - .15 = -.10.
    (0.5, [0, 2, 1]),
    # lambda 0: all tie on the first pick (relevance breaks it), then least similar to the selected: 2 (.1), 3 (.3).
    (0.0, [0, 2, 3]),
])
def test_mmr_follows_the_hand_computed_greedy_order(lam, expected):
  assert selection.mmr(RELEVANCE, POOL, 3, lam) == expected
  assert selection.select("mmr", RELEVANCE, POOL, 3, lam=lam) == expected


def test_nearest_neighbours_rank_by_relevance_and_skip_the_query():
  assert selection.select("nn", RELEVANCE, None, 2) == [0, 1]
  assert selection.select("nn", RELEVANCE, None, 2, exclude=0) == [1, 2]
  assert selection.mmr(RELEVANCE, POOL, 3, 0.5, exclude=0) == [1, 2, 3]


def test_random_selection_is_seeded_distinct_and_never_the_query():
  picks = [selection.select("random", np.zeros(6), None, 3, rng=np.random.default_rng(s), exclude=2) for s in range(30)]
  assert picks[0] == selection.select("random", np.zeros(6), None, 3, rng=np.random.default_rng(0), exclude=2)
  assert all(len(set(p)) == 3 and 2 not in p for p in picks)
  assert len({tuple(p) for p in picks}) > 1


def test_bad_selection_name_shots_or_lambda_name_the_problem():
  with pytest.raises(ConfigError, match="unknown selection 'best'.*random, nn, mmr"):
    selection.select("best", RELEVANCE, POOL, 2)
  with pytest.raises(ConfigError, match="shots"):
    selection.select("nn", RELEVANCE, None, 4, exclude=0)
  with pytest.raises(ConfigError, match="lambda"):
    selection.mmr(RELEVANCE, POOL, 2, 1.5)
