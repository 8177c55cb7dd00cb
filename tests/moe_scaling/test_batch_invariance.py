"""Evaluation that does not depend on the batch (issue 16, defect 1): a sequence's summed log-likelihood
through `moe_scaling.evaluate`'s scorer is the same in any batch slot, at any batch size and with any amount
of padding after it, for the paper's MoE (capacity mode, capacity factor 1, a router made unbalanced so that
the training capacity drops tokens) and for the dense model; the same evaluation at the training capacity is
shown not to be invariant, so the test can fail (evaluation as it was: padding routed as segment 1, the
training capacity)."""
import numpy as np
import pytest
from flax import nnx

from common.models import DenseLM
from common.nn.moe import MoE
from common.nn.training_rng import training_rng
from moe_scaling import data, evaluate
from moe_scaling.configs.tiny import get_config

SEQ = 32


def _model(family):
  cfg = get_config(f"family={family},d_model=32,experts=4").model
  cfg.update(vocab_size=260, n_layers=2)
  model = DenseLM(cfg, rngs=nnx.Rngs(params=0))
  for block in model.blocks:
    if isinstance(block.ffn, MoE):
      block.ffn.router.kernel[...] = 8.0 * block.ffn.router.kernel[...]  # sharp, unbalanced routing
  return model


def _rows(seq_len):
  """Choice rows of 0-shot questions (real lengths 8..20 of `seq_len`), the first one the sequence scored."""
  rows = [evaluate.choice_rows(p, c, seq_len) for task in sorted(data.TASKS)
          for p, c in data.priming_examples(task, 2, 0)]
  return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def _layouts():
  """(seq_len, batch size, slot of the sequence, rows around it: 'real' or 'pad')."""
  return [(SEQ, 1, 0, "real"), (SEQ, 4, 0, "real"), (SEQ, 4, 3, "real"), (SEQ, 8, 5, "real"),
          (SEQ, 8, 0, "pad"), (SEQ, 8, 7, "pad"), (48, 4, 2, "real"), (48, 8, 1, "pad")]


def _scores(nll, old=False):
  out = []
  for seq_len, size, slot, around in _layouts():
    rows = _rows(seq_len)
    order = [i for i in range(1, size)] if around == "real" else []
    order.insert(slot, 0)
    batch = {k: v[order] for k, v in rows.items()}
    if around == "pad":  # the sequence among rows of padding (pad_rows appends them: move it to its slot)
      batch = evaluate.pad_rows({k: v[:1] for k, v in rows.items()}, size)
      batch = {k: np.roll(v, slot, axis=0) for k, v in batch.items()}
    if old:
      batch["segment_ids"] = np.ones_like(batch["segment_ids"])
    out.append(float(nll(batch)[slot].sum()))
  return np.asarray(out)


@pytest.mark.parametrize("family", ["moe", "dense"])
def test_a_sequences_scores_do_not_depend_on_its_batch(family):
  scores = _scores(evaluate._nll_fn(_model(family)))
  assert scores[0] > 1.0
  np.testing.assert_allclose(scores, scores[0], rtol=1e-6, atol=1e-5)


def test_training_capacity_evaluation_would_depend_on_the_batch():
  nll = evaluate._nll_fn(_model("moe"))
  with training_rng(None):  # the training capacity
    scores = _scores(nll, old=True)
  assert np.max(np.abs(scores - scores[0])) > 1e-3
