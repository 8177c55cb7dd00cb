"""Evaluating a belief-update method on the evaluation beliefs (Hase et al. 2023).

A method updates the base classifier on one belief at a time. Single updates start each from the base model;
sequential updates chain r of them (each from the previous update's parameters) before anything is measured.
After each chain: update success on the updated beliefs' main inputs, paraphrases and entailed statements,
paraphrase consistency of the updated beliefs, and on every other evaluation belief the retain rate, the
change in accuracy and the beliefs corrupted (slag/metrics.py), counts pooled over chains as the official
code pools them. Single updates also give the belief graph (slag/graph.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slag import graph as slag_graph
from slag import metrics
from slag.model import BeliefClassifier, HyperNetwork, target_filter
from slag.update import Functional, baseline_update, baseline_updater, learned_update, make_optimizer


class Predictor:
  """Predicted labels of the main inputs, paraphrases and entailed statements of every point, for any
  parameters of one `Functional`."""

  def __init__(self, fn: Functional, points: dict):
    self.points = points
    self._run = jax.jit(lambda params, tokens, lengths: jnp.argmax(fn.logits(params, tokens, lengths), -1))

  def __call__(self, params) -> dict[str, np.ndarray]:
    out = {}
    for name in ("main", "para", "ent"):
      t, n = self.points[name], self.points[f"{name}_len"]
      flat = np.asarray(self._run(params, t.reshape(-1, t.shape[-1]), n.reshape(-1)))
      out[name] = flat.reshape(n.shape)
    return out


def make_updater(method: str, classifier: BeliefClassifier, updates_cfg, opt_cfg=None,
                 hyper: HyperNetwork | None = None):
  """(Functional, update(params, point) -> (params, steps taken)) of a method."""
  if method == "learned":
    fn = Functional.split(classifier, target_filter(opt_cfg))
    hyper_graph, hyper_state = nnx.split(hyper)
    steps = int(opt_cfg.steps)
    run = jax.jit(lambda h, params, point: learned_update(nnx.merge(hyper_graph, h), fn, params, point, steps))
    return fn, lambda params, point: (run(hyper_state, params, point), steps)
  fn = Functional.split(classifier, nnx.Param)
  optimizer = make_optimizer(method, float(updates_cfg[f"{method}_lr"]))
  step = baseline_updater(fn, optimizer)
  max_steps = int(updates_cfg.max_steps)
  return fn, lambda params, point: baseline_update(fn, params, point, optimizer, step, max_steps)


def _point(points: dict, index: int) -> dict:
  return {k: jnp.asarray(v[index]) for k, v in points.items() if k != "label"}


def run_chains(fn: Functional, update, points: dict, chains: list[list[int]]) -> dict:
  """The metrics of `chains` of successive updates (each from the base parameters), and per single-update
  chain the beliefs it flipped and corrupted."""
  predict = Predictor(fn, points)
  before = predict(fn.params)
  n = len(points["desired"])
  desired, labels = points["desired"], points["label"]
  pooled = {k: [] for k in ("main", "main_desired", "para", "para_desired", "ent", "ent_label", "ret_before",
                            "ret_after", "ret_label")}
  groups, flips, corrupted_by, steps = [], {}, {}, []
  for chain in chains:
    params = fn.params
    for index in chain:
      params, taken = update(params, _point(points, index))
      steps.append(taken)
    after = predict(params)
    updated = np.array(chain)
    others = np.setdiff1d(np.arange(n), updated)
    pooled["main"] += after["main"][updated].tolist()
    pooled["main_desired"] += desired[updated].tolist()
    for i in updated:
      para_mask = points["para_mask"][i] > 0
      pooled["para"] += after["para"][i][para_mask].tolist()
      pooled["para_desired"] += [int(desired[i])] * int(para_mask.sum())
      if para_mask.any():
        groups.append(after["para"][i][para_mask].tolist() + [int(after["main"][i])])
      ent_mask = (points["ent_mask"][i] > 0) & (desired[i] == 1)
      pooled["ent"] += after["ent"][i][ent_mask].tolist()
      pooled["ent_label"] += points["ent_label"][i][ent_mask].tolist()
    pooled["ret_before"] += before["main"][others].tolist()
    pooled["ret_after"] += after["main"][others].tolist()
    pooled["ret_label"] += labels[others].tolist()
    if len(chain) == 1:
      changed = others[after["main"][others] != before["main"][others]]
      flips[int(chain[0])] = changed.tolist()
      corrupted_by[int(chain[0])] = metrics.corrupted(before["main"][others], after["main"][others],
                                                      labels[others])[0]
  result = dict(
      update_success=metrics.update_success(pooled["main"], pooled["main_desired"]),
      paraphrase_success=metrics.update_success(pooled["para"], pooled["para_desired"]),
      entailed_accuracy=metrics.entailment_accuracy(pooled["ent"], pooled["ent_label"]),
      consistency=metrics.paraphrase_consistency(groups),
      retain_rate=metrics.retain_rate(pooled["ret_before"], pooled["ret_after"]),
      delta_accuracy=metrics.delta_accuracy(pooled["ret_before"], pooled["ret_after"], pooled["ret_label"]),
      mean_steps=float(np.mean(steps)) if steps else 0.0, updates=len(steps))
  return dict(metrics=result, flips=flips, corrupted=corrupted_by)


def base_metrics(fn: Functional, points: dict) -> dict:
  """The base classifier before any update: accuracy on the beliefs and its paraphrase consistency."""
  preds = Predictor(fn, points)(fn.params)
  groups = [preds["para"][i][points["para_mask"][i] > 0].tolist() + [int(preds["main"][i])]
            for i in range(len(preds["main"])) if points["para_mask"][i].any()]
  return dict(accuracy=float(100 * np.mean(preds["main"] == points["label"])),
              consistency=metrics.paraphrase_consistency(groups))


def evaluate_method(method: str, classifier: BeliefClassifier, points: dict, updates_cfg, seed: int,
                    opt_cfg=None, hyper: HyperNetwork | None = None) -> dict:
  """Single updates of every evaluation belief (or `updates.max_single`) with their belief graph, and
  `updates.chains` chains of `updates.sequential` successive updates."""
  fn, update = make_updater(method, classifier, updates_cfg, opt_cfg, hyper)
  n = len(points["desired"])
  count = n if int(updates_cfg.max_single) <= 0 else min(n, int(updates_cfg.max_single))
  single = run_chains(fn, update, points, [[i] for i in range(count)])
  r = min(int(updates_cfg.sequential), n)
  order = np.random.default_rng(seed).permutation(n)
  chains = [order[(c * r) % n:][:r].tolist() for c in range(int(updates_cfg.chains))]
  sequential = run_chains(fn, update, points, [c for c in chains if len(c) == r])
  graph = slag_graph.belief_graph(n, single["flips"])
  return dict(single=single["metrics"], sequential=sequential["metrics"], sequential_r=r,
              graph=slag_graph.graph_stats(graph, single["corrupted"], updated=list(range(count))),
              edges=[list(e) for e in graph.edges()], num_beliefs=n)
