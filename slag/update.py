"""Belief updates (Hase et al. 2023): the learned optimizer's update, the SLAG objective it is
trained with, and the off-the-shelf baselines (SGD, Adam) run until the update succeeds.

All of them act on a classifier split once into `Functional` (graph, the parameters an update may change, the
rest), so an update is a function of parameters. A "point" is one belief as arrays: `main` [length] with
`main_len`, `desired` (the label to update to), `cond` [length] with `cond_len` (the conditioning text),
`para` [P, length] with `para_len`/`para_mask`, `ent` [E, length] with `ent_len`/`ent_label`/`ent_mask`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from slag.model import HyperNetwork, target_filter


@dataclasses.dataclass(frozen=True)
class Functional:
  """A classifier as (graph, editable parameters, the rest): logits and the LM's feature of any parameters."""
  graphdef: Any
  params: Any   # nnx.State of the parameters an update changes
  rest: Any

  @classmethod
  def split(cls, classifier: nnx.Module, editable) -> "Functional":
    graphdef, params, rest = nnx.split(classifier, editable, ...)
    return cls(graphdef, params, rest)

  def model(self, params):
    return nnx.merge(self.graphdef, params, self.rest)

  def logits(self, params, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    return self.model(params)(tokens, lengths)

  def feature(self, params, tokens: jax.Array, length: jax.Array) -> jax.Array:
    """The final hidden state [d_model] of a text's last token."""
    hidden = self.model(params).lm.hidden(tokens[None])[0]
    return hidden[jnp.maximum(length, 1) - 1]


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean cross-entropy over the rows where mask is 1 (0 when there are none)."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if mask is None:
    return jnp.mean(nll)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def kl_to_original(original_logits: jax.Array, new_logits: jax.Array) -> jax.Array:
  """Mean over rows of KL(p_original || p_new), the official code's KLDivLoss(batchmean) on log-probabilities."""
  log_p, log_q = jax.nn.log_softmax(original_logits), jax.nn.log_softmax(new_logits)
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1))


def point_loss(fn: Functional, params, point: dict) -> jax.Array:
  """The loss whose gradient an update follows: cross-entropy of the main input against the desired label."""
  logits = fn.logits(params, point["main"][None], point["main_len"][None])
  return cross_entropy(logits, point["desired"][None])


def learned_update(hyper: HyperNetwork, fn: Functional, params, point: dict, steps: int):
  """`steps` applications of the hypernetwork: each takes the gradient of `point_loss` at the current
  parameters (an input, not differentiated through: first order, as KnowledgeEditor) and subtracts the
  update it makes of it from each target matrix."""
  feature = jax.lax.stop_gradient(fn.feature(params, point["cond"], point["cond_len"]))
  condition = hyper.condition(point["cond"], point["cond_len"], feature)
  for _ in range(steps):
    grads = jax.lax.stop_gradient(jax.grad(point_loss, argnums=1)(fn, params, point))
    leaves, treedef = jax.tree.flatten(params)
    deltas = hyper(condition, jax.tree.leaves(grads))
    params = jax.tree.unflatten(treedef, [w - d.astype(w.dtype) for w, d in zip(leaves, deltas)])
  return params


def generalization_loss(fn: Functional, params, point: dict, opt_cfg) -> jax.Array:
  """The update loss of one point after an update: main input, plus its paraphrases and entailed statements
  as their weights switch them on (the 'generalizing' of SLAG). Entailed statements count only when the main
  input is being made true (their labels are what its truth entails)."""
  loss = point_loss(fn, params, point)
  if float(opt_cfg.paraphrase_weight) > 0:
    logits = fn.logits(params, point["para"], point["para_len"])
    labels = jnp.broadcast_to(point["desired"], point["para_len"].shape)
    loss += float(opt_cfg.paraphrase_weight) * cross_entropy(logits, labels, point["para_mask"])
  if float(opt_cfg.entailed_weight) > 0:
    logits = fn.logits(params, point["ent"], point["ent_len"])
    mask = point["ent_mask"] * (point["desired"] == 1)
    loss += float(opt_cfg.entailed_weight) * cross_entropy(logits, point["ent_label"], mask)
  return loss


def episode_loss(hyper: HyperNetwork, fn: Functional, params0, episode: dict, opt_cfg) -> tuple[jax.Array, dict]:
  """The SLAG objective of one episode of r successive updates ('sequential'): after update j, the
  generalization loss of point j, the retain loss of points 1..j-1 (still updated) and the KL to the original
  predictions on the episode's other beliefs ('local'); averaged over the r updates (one scan step each).
  Metrics: update success of the r points and the other beliefs' retain rate after all r."""
  points = {k: v for k, v in episode.items() if not k.startswith("other") and k != "weight"}  # each [r, ...]
  r = points["desired"].shape[0]
  original = jax.lax.stop_gradient(fn.logits(params0, episode["other"], episode["other_len"]))
  hyper_graph, hyper_state = nnx.split(hyper)

  def one_update(params, j):
    point = jax.tree.map(lambda x: x[j], points)
    params = learned_update(nnx.merge(hyper_graph, hyper_state), fn, params, point, int(opt_cfg.steps))
    loss = generalization_loss(fn, params, point, opt_cfg)
    if float(opt_cfg.retain_weight) > 0:
      nll = optax.softmax_cross_entropy_with_integer_labels(
          fn.logits(params, points["main"], points["main_len"]), points["desired"])
      earlier = (jnp.arange(r) < j).astype(nll.dtype)
      loss += float(opt_cfg.retain_weight) * jnp.sum(nll * earlier) / jnp.maximum(j, 1)
    if float(opt_cfg.kl_weight) > 0:
      loss += float(opt_cfg.kl_weight) * kl_to_original(original, fn.logits(params, episode["other"],
                                                                            episode["other_len"]))
    return params, loss

  params, losses = jax.lax.scan(one_update, params0, jnp.arange(r))
  main = fn.logits(params, points["main"], points["main_len"])
  new = fn.logits(params, episode["other"], episode["other_len"])
  success = jnp.mean((jnp.argmax(main, -1) == points["desired"]).astype(jnp.float32))
  retain = jnp.mean((jnp.argmax(new, -1) == jnp.argmax(original, -1)).astype(jnp.float32))
  return jnp.mean(losses), dict(update_success=success, retain=retain)


def slag_loss_fn(opt_cfg):
  """The learned-optimizer stage's loss (common.tasks.base.LossFn): the episode losses of a batch weighted by
  the episodes' weight; the classifier is frozen (stop_gradient) and only the hypernetwork learns."""

  def loss_fn(model, batch):
    graphdef, state = nnx.split(model.classifier)
    classifier = nnx.merge(graphdef, jax.lax.stop_gradient(state))
    fn = Functional.split(classifier, target_filter(opt_cfg))
    hyper_graph, hyper_state = nnx.split(model.hyper)

    def one(episode):
      return episode_loss(nnx.merge(hyper_graph, hyper_state), fn, fn.params, episode, opt_cfg)

    losses, metrics = jax.vmap(one)(batch)
    w = batch["weight"]
    return jnp.sum(losses * w), jnp.sum(w), {k: jnp.sum(v * w) for k, v in metrics.items()}
  return loss_fn


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  return {"sgd": optax.sgd, "adam": optax.adam}[name](learning_rate)


def baseline_updater(fn: Functional, optimizer: optax.GradientTransformation):
  """A jitted step of an off-the-shelf optimizer on `point_loss`: (params, opt_state, point) -> (params,
  opt_state, the prediction before the step)."""

  @jax.jit
  def step(params, opt_state, point):
    loss_grad = jax.value_and_grad(lambda p: point_loss(fn, p, point))
    logits = fn.logits(params, point["main"][None], point["main_len"][None])
    _, grads = loss_grad(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, jnp.argmax(logits[0])
  return step


def baseline_update(fn: Functional, params, point: dict, optimizer, step, max_steps: int):
  """Steps of `optimizer` until the main input's prediction is the desired label or `max_steps` were taken
  (the official baselines' stopping rule); the new parameters and the steps taken."""
  opt_state = optimizer.init(params)
  desired = int(point["desired"])
  for taken in range(max_steps + 1):
    new_params, new_state, pred = step(params, opt_state, point)
    if int(pred) == desired or taken == max_steps:
      return params, taken
    params, opt_state = new_params, new_state
  return params, max_steps
