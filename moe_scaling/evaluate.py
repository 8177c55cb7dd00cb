"""Scores a trained model: perplexity per domain and zero/few-shot priming accuracy (see data.py).

A row's scores must not depend on the rows batched with it: padding has segment id 0 (MoE layers route
none of it), and outside a train step MoE layers use their evaluation capacity
(`model.moe.eval_capacity_token_fraction`, dropless by default: exact)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_scaling import data


def load_trained(cfg, workdir: str, task) -> nnx.Module:
  """The model of `task` with the parameters of the newest checkpoint in `workdir`, on one device (scoring
  needs no mesh); evaluation never passes a training key, so routers run without noise."""
  from common.train.restore import load_run_model
  return load_run_model(workdir, cfg, task.build_model, key="--out")[0]


def _nll_fn(model):
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def nll(params, batch):
    m = nnx.merge(graphdef, params)
    logits = m(batch["inputs"], batch["positions"], batch["segment_ids"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * batch["loss_mask"]
  return lambda batch: np.asarray(nll(params, {k: jnp.asarray(v) for k, v in batch.items()}))


def pad_rows(rows: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
  """rows padded to `batch` rows (a fixed batch shape, one compilation) with rows of padding: token 0,
  segment 0, loss mask 0."""
  pad = batch - len(rows["inputs"])
  out = {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in rows.items()}
  out["positions"][batch - pad:] = np.arange(out["positions"].shape[1])
  return out


def domain_perplexity(model, data_cfg, *, seq_len: int, max_rows: int = 64, batch: int = 32,
                      user_glob: str = "") -> dict[str, float]:
  """{f'{domain}/bpb', f'{domain}/perplexity'} over up to max_rows rows of each domain."""
  nll = _nll_fn(model)
  out = {}
  for domain, texts in data.domain_documents(data_cfg, user_glob).items():
    rows = data.lm_rows(texts, seq_len, max_rows)
    total, count = 0.0, 0.0
    for i in range(0, len(rows["inputs"]), batch):
      chunk = pad_rows({k: v[i:i + batch] for k, v in rows.items()}, batch)
      total += float(nll(chunk).sum())
      count += float(chunk["loss_mask"].sum())
    if count:
      out[f"{domain}/bpb"] = total / count / math.log(2)
      out[f"{domain}/perplexity"] = math.exp(min(total / count, 50.0))
  return out


def choice_rows(prompt: str, choices: list[str], seq_len: int) -> dict[str, np.ndarray]:
  """One row per choice: the prompt (cut from the left to fit) then the choice, the loss mask on the choice's
  bytes only, so a row's summed nll is -log p(choice | prompt); segment 1 on the row's bytes, 0 on padding."""
  targets = np.zeros((len(choices), seq_len), np.int32)
  mask = np.zeros((len(choices), seq_len), np.float32)
  segment_ids = np.zeros((len(choices), seq_len), np.int32)
  for i, choice in enumerate(choices):
    answer = data.encode(choice)
    context = data.encode(prompt)[-(seq_len - len(answer)):]
    targets[i, :len(context) + len(answer)] = context + answer
    mask[i, len(context):len(context) + len(answer)] = 1.0
    segment_ids[i, :len(context) + len(answer)] = 1
  inputs = np.concatenate([np.zeros((len(choices), 1), np.int32), targets[:, :-1]], axis=1)
  return dict(inputs=inputs, targets=targets, loss_mask=mask, segment_ids=segment_ids,
              positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), targets.shape).copy())


def priming_accuracy(model, *, shots=(0, 4), n: int = 32, seq_len: int = 128, batch: int = 32) -> dict[str, float]:
  """Accuracy of picking the most likely continuation (summed log-likelihood) per task and shot count; the
  rows of all questions are scored `batch` at a time (each question's 4 choices in one batch)."""
  nll = _nll_fn(model)
  per_batch = max(1, batch // 4)
  out = {}
  for shot in shots:
    for task in data.TASKS:
      questions = data.priming_examples(task, n, shot)
      correct = 0
      for start in range(0, n, per_batch):
        group = [choice_rows(p, c, seq_len) for p, c in questions[start:start + per_batch]]
        rows = pad_rows({k: np.concatenate([g[k] for g in group]) for k in group[0]}, per_batch * 4)
        scores = nll(rows).sum(-1)[:len(group) * 4].reshape(len(group), 4)
        correct += int(np.sum(np.argmin(scores, axis=1) == 0))
      out[f"{shot}shot/{task}"] = correct / n
  return out
