"""The models of Hase et al. (2023): the true/false classifier whose beliefs are updated, and the learned
optimizer (a hypernetwork, after KnowledgeEditor, De Cao et al. 2021) that turns the gradient of selected
weight matrices into an update.

`BeliefClassifier`: the dense LM's last real token's final hidden state -> two logits (false, true).
`HyperNetwork`: a condition vector from the text "<prediction> >> <desired label> || <statement>" (the official
code's input format), and per target matrix W [rows, cols] a `ConditionedUpdate` that maps it to rank-`rank`
row/column factors a = softmax(A_row)^T A_col and b = softmax(B_row)^T B_col and a gate s, and returns
  delta W = max_scale * sigmoid(s) * (grad W * a + b),
the new weights being W - delta W (a and b are rank-1 in the official code, `rank` here).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from common.config import require
from common.models.dense_lm import DenseLM


class BeliefClassifier(nnx.Module):
  """(tokens [batch, length], lengths [batch]) -> logits [batch, 2]; rows are right-padded."""

  def __init__(self, model_cfg, *, rngs: nnx.Rngs):
    self.lm = DenseLM(model_cfg, rngs=rngs)
    self.head = nnx.Linear(int(model_cfg.d_model), 2, rngs=rngs)

  def __call__(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    hidden = self.lm.hidden(tokens)  # [batch, length, d_model]; causal, so padding after a row never matters
    last = jnp.take_along_axis(hidden, (jnp.maximum(lengths, 1) - 1)[:, None, None], axis=1)[:, 0]
    return self.head(last).astype(jnp.float32)


def target_filter(opt_cfg):
  """nnx filter of the matrices the learned optimizer edits: FFN `opt_cfg.matrices` of the last
  `opt_cfg.edit_layers` blocks of the classifier's LM."""
  matrices = tuple(opt_cfg.matrices)

  def is_target(path, value) -> bool:
    if not isinstance(value, nnx.Param) or len(path) < 5 or path[0] != "lm" or path[1] != "blocks":
      return False
    return path[3] == "ffn" and path[4] in matrices and int(path[2]) >= int(opt_cfg.n_layers) - int(
        opt_cfg.edit_layers)
  return is_target


class ConditionedUpdate(nnx.Module):
  """condition [cond_dim], grad [rows, cols] -> the update of one matrix (module docstring)."""

  def __init__(self, shape: tuple[int, int], cond_dim: int, hidden: int, rank: int, max_scale: float, *,
               rngs: nnx.Rngs):
    self.rows, self.cols = shape
    self.rank, self.max_scale = rank, max_scale
    self.hidden = nnx.Linear(cond_dim, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 2 * rank * (self.rows + self.cols) + 1, rngs=rngs)

  def factors(self, condition: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(a [rows, cols], b [rows, cols], gate []): a and b of rank <= `rank`."""
    z = self.out(jnp.tanh(self.hidden(condition)))
    r, n, m = self.rank, self.rows, self.cols
    a_row, a_col, b_row, b_col = jnp.split(z[:-1], [r * n, r * (n + m), r * (2 * n + m)])
    a = jax.nn.softmax(a_row.reshape(r, n), axis=-1).T @ a_col.reshape(r, m)
    b = jax.nn.softmax(b_row.reshape(r, n), axis=-1).T @ b_col.reshape(r, m)
    return a, b, z[-1]

  def __call__(self, condition: jax.Array, grad: jax.Array) -> jax.Array:
    a, b, gate = self.factors(condition)
    return self.max_scale * jax.nn.sigmoid(gate) * (grad * a + b)


class HyperNetwork(nnx.Module):
  """The learned optimizer: a condition from the conditioning text, one `ConditionedUpdate` per target matrix
  (in the order of `jax.tree.leaves` of the targets' state)."""

  def __init__(self, opt_cfg, vocab_size: int, d_model: int, target_shapes: list[tuple[int, int]], *,
               rngs: nnx.Rngs):
    cond = int(opt_cfg.cond_dim)
    self.embed = nnx.Embed(vocab_size, cond, rngs=rngs)
    self.condition_proj = nnx.Linear(2 * cond + d_model, cond, rngs=rngs)
    self.updates = nnx.List([ConditionedUpdate(s, cond, int(opt_cfg.hidden), int(opt_cfg.rank),
                                               float(opt_cfg.max_scale), rngs=rngs) for s in target_shapes])

  def condition(self, tokens: jax.Array, length: jax.Array, lm_feature: jax.Array) -> jax.Array:
    """tokens [length] of the conditioning text, the frozen LM's feature of it [d_model] -> [cond_dim]: the
    mean and max of the text's embeddings (a light stand-in for the official BiLSTM) with the LM feature."""
    mask = (jnp.arange(tokens.shape[0]) < length)[:, None]
    e = self.embed(tokens)
    mean = jnp.sum(e * mask, 0) / jnp.maximum(length, 1)
    peak = jnp.max(jnp.where(mask, e, -1e9), 0)
    return jnp.tanh(self.condition_proj(jnp.concatenate([mean, peak, lm_feature])))

  def __call__(self, condition: jax.Array, grads: list[jax.Array]) -> list[jax.Array]:
    return [update(condition, g) for update, g in zip(self.updates, grads)]


class LearnedOptimizer(nnx.Module):
  """What the learned-optimizer stage trains: the frozen base classifier with the hypernetwork beside it."""

  def __init__(self, classifier: BeliefClassifier, hyper: HyperNetwork):
    self.classifier = classifier
    self.hyper = hyper


def hyper_param_filter():
  return nnx.All(nnx.Param, nnx.PathContains("hyper"))


def validate_opt_config(opt_cfg, model_cfg) -> None:
  for key in ("edit_layers", "cond_dim", "hidden", "rank", "steps"):
    require(int(opt_cfg[key]) >= 1, f"learned_opt.{key}", f"must be >= 1, got {opt_cfg[key]}")
  require(int(opt_cfg.edit_layers) <= int(model_cfg.n_layers), "learned_opt.edit_layers",
          f"{opt_cfg.edit_layers} exceeds model.n_layers={model_cfg.n_layers}")
  bad = [m for m in opt_cfg.matrices if m not in ("up", "gate", "down")]
  require(not bad and len(opt_cfg.matrices) > 0, "learned_opt.matrices",
          f"must name FFN matrices among up, gate, down; got {tuple(opt_cfg.matrices)}")
  require(float(opt_cfg.max_scale) > 0, "learned_opt.max_scale", f"must be > 0, got {opt_cfg.max_scale}")


def opt_config(**overrides) -> ml_collections.ConfigDict:
  """The `learned_opt.*` section: the hypernetwork's shape and the SLAG objective's terms."""
  c = ml_collections.ConfigDict(dict(
      matrices=("down",), edit_layers=1, n_layers=0,  # n_layers: the classifier's, filled by resolve
      cond_dim=64, hidden=64, rank=1, max_scale=1.0,
      steps=1,                 # K: hypernetwork steps per update
      sequential=1,            # r: successive updates per training episode (SLAG's "sequential")
      paraphrase_weight=1.0,   # the update loss on the main input's paraphrases
      entailed_weight=1.0,     # ... on its entailed statements
      kl_weight=1.0,           # KL to the original predictions on other beliefs
      retain_weight=1.0,       # in a sequence: the update loss of earlier updates after later ones
      num_other=8,             # other beliefs per episode (the KL term and retain rate)
  ))
  c.update(overrides)
  return c
