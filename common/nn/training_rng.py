"""Randomness of stochastic layers during training (MoE router noise, expert sampling, anything MoMa or MoD
adds), fixed by (seed, step) so that a resumed run repeats an uninterrupted one exactly.

The train step enters `training_rng(key)` while it is traced; inside, every layer call that asks
`next_training_key()` gets `fold_in(key, n)` for its call index n: one independent stream per layer. Outside
the context (evaluation, scoring, generation) the answer is None and layers run deterministically.
`in_training()` says whether a train step is being traced at all (also without a seed, when the key is None),
so that layers whose training and evaluation forms differ (an MoE layer's expert capacity) decide by it.
"""
from __future__ import annotations

import contextlib
import threading

import jax

_training = threading.local()


@contextlib.contextmanager
def training_rng(key: jax.Array | None):
  """Within this context (entered while a train step is traced), the n-th layer call of the forward pass
  that has no explicit rng draws with `fold_in(key, n)`: one independent stream per layer, fixed by the key.
  `key` None: no randomness (still a train step for `in_training`)."""
  saved = getattr(_training, "state", None)
  _training.state = [key, 0]
  try:
    yield
  finally:
    _training.state = saved


def next_training_key() -> jax.Array | None:
  """The key of the next layer call inside `training_rng`, or None outside it."""
  state = getattr(_training, "state", None)
  if state is None or state[0] is None:
    return None
  key = jax.random.fold_in(state[0], state[1])
  state[1] += 1
  return key


def in_training() -> bool:
  """Whether the caller runs inside `training_rng` (a train step), with or without a key."""
  return getattr(_training, "state", None) is not None
