"""Exemplar selection from a pool (Ye et al. 2023, sec. 5): random, nearest neighbours, and maximal marginal
relevance (Carbonell & Goldstein 1998), which trades relevance to the query for complementarity among the
chosen exemplars:

  argmax_j  lambda * S(q, q_j) - (1 - lambda) * max_{i in selected} S(q_i, q_j)

lambda = 1 is nearest neighbours; lambda = 0 keeps only diversity after the first pick. The first pick has no
selected set (the penalty is 0); ties go to the more relevant candidate, then the lower index, so lambda = 0
starts from the nearest neighbour. The selected order is the pick order, and the query itself is never chosen
(`exclude`: its index when the pool holds it).
"""
from __future__ import annotations

import numpy as np

from common.config import ConfigError

SELECTIONS = ("random", "nn", "mmr")


def _candidates(n: int, shots: int, exclude: int | None) -> list[int]:
  candidates = [j for j in range(n) if j != exclude]
  if shots < 1 or shots > len(candidates):
    raise ConfigError(f"shots: need 1 <= shots <= {len(candidates)} (the pool's candidates), got {shots}")
  return candidates


def nearest(relevance: np.ndarray, shots: int, exclude: int | None = None) -> list[int]:
  """The `shots` most relevant pool indices, most relevant first (ties: lower index)."""
  candidates = _candidates(len(relevance), shots, exclude)
  return sorted(candidates, key=lambda j: (-relevance[j], j))[:shots]


def mmr(relevance: np.ndarray, pool_similarity: np.ndarray, shots: int, lam: float = 0.5,
        exclude: int | None = None) -> list[int]:
  """Greedy MMR over the pool: relevance [P] = S(q, q_j), pool_similarity [P, P] = S(q_i, q_j)."""
  if not 0.0 <= lam <= 1.0:
    raise ConfigError(f"lambda: must be in [0, 1], got {lam}")
  candidates = _candidates(len(relevance), shots, exclude)
  selected: list[int] = []
  for _ in range(shots):
    def gain(j: int) -> float:
      penalty = max((pool_similarity[i, j] for i in selected), default=0.0)
      return lam * relevance[j] - (1 - lam) * penalty
    best = max((j for j in candidates if j not in selected), key=lambda j: (gain(j), relevance[j], -j))
    selected.append(best)
  return selected


def select(method: str, relevance: np.ndarray, pool_similarity: np.ndarray | None, shots: int, *,
           lam: float = 0.5, rng: np.random.Generator | None = None, exclude: int | None = None) -> list[int]:
  """Pool indices of the `shots` exemplars chosen by `method` (SELECTIONS)."""
  if method not in SELECTIONS:
    raise ConfigError(f"unknown selection '{method}' (valid: {', '.join(SELECTIONS)})")
  if method == "random":
    candidates = _candidates(len(relevance), shots, exclude)
    if rng is None:
      raise ValueError("random selection needs a seeded rng")
    return [candidates[i] for i in rng.choice(len(candidates), size=shots, replace=False)]
  if method == "nn":
    return nearest(relevance, shots, exclude)
  if pool_similarity is None:
    raise ValueError("mmr needs the pool's similarity matrix")
  return mmr(relevance, pool_similarity, shots, lam, exclude)
