"""Metrics over n sampled answers per problem: pass@k and majority@k.

pass@k is the probability that at least one of k samples drawn without replacement from the n is
correct, estimated without bias from the count c of correct samples as 1 - C(n-c, k) / C(n, k)
(Chen et al., 2021, "Evaluating Large Language Models Trained on Code", section 2.1, eq. 1).
majority@k (self-consistency; Wang et al., 2023, section 2) answers with the most common answer among
k samples and is right when that answer is.
"""
from __future__ import annotations

import fractions
import math
from typing import Callable, Hashable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct, computed exactly in rationals."""
  if not 0 <= c <= n:
    raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
  if not 1 <= k <= n:
    raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
  if n - c < k:  # every k-subset holds a correct sample
    return 1.0
  return float(1 - fractions.Fraction(math.comb(n - c, k), math.comb(n, k)))


def majority_vote(answers: Sequence[Hashable | None],
                  same: Callable[[Hashable, Hashable], bool] | None = None) -> int | None:
  """Index of the answer that wins the vote, None when no sample gave an answer (None is no vote).

  Answers are grouped into classes by `same` (equality by default; math equivalence for math answers,
  which is why this is not a Counter). The largest class wins; among classes of equal size the one
  whose first member came first wins, and the returned index is that first member.
  """
  classes: list[list[int]] = []  # indices of the answers in each class, in order of first appearance
  for index, answer in enumerate(answers):
    if answer is None:
      continue
    for members in classes:
      head = answers[members[0]]
      if (same(head, answer) if same is not None else head == answer):
        members.append(index)
        break
    else:
      classes.append([index])
  if not classes:
    return None
  best = max(classes, key=len)  # max keeps the first of equal-sized classes
  return best[0]
