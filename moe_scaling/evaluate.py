"""Scores a trained model: perplexity per domain and zero/few-shot priming accuracy (see data.py)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_scaling import data


def _nll_fn(model):
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def nll(params, batch):
    m = nnx.merge(graphdef, params)
    logits = m(batch["inputs"], batch["positions"], batch["segment_ids"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * batch["loss_mask"]
  return lambda batch: np.asarray(nll(params, {k: jnp.asarray(v) for k, v in batch.items()}))


def domain_perplexity(model, data_cfg, *, seq_len: int, max_rows: int = 64, batch: int = 8,
                      user_glob: str = "") -> dict[str, float]:
  """{f'{domain}/bpb', f'{domain}/perplexity'} over up to max_rows rows of each domain."""
  nll = _nll_fn(model)
  out = {}
  for domain, texts in data.domain_documents(data_cfg, user_glob).items():
    rows = data.lm_rows(texts, seq_len, max_rows)
    total, count = 0.0, 0.0
    for i in range(0, len(rows["inputs"]) - batch + 1, batch):
      chunk = {k: v[i:i + batch] for k, v in rows.items()}
      total += float(nll(chunk).sum())
      count += float(chunk["loss_mask"].sum())
    if count:
      out[f"{domain}/bpb"] = total / count / math.log(2)
      out[f"{domain}/perplexity"] = math.exp(min(total / count, 50.0))
  return out


def priming_accuracy(model, *, shots=(0, 4), n: int = 32, seq_len: int = 128) -> dict[str, float]:
  """Accuracy of picking the most likely continuation (summed log-likelihood) per task and shot count."""
  nll = _nll_fn(model)
  out = {}
  for shot in shots:
    for task in data.TASKS:
      correct = 0
      for prompt, choices in data.priming_examples(task, n, shot):
        rows = []
        for c in choices:
          p, t = data.encode(prompt)[-(seq_len - len(data.encode(c))):], data.encode(c)
          targets = np.zeros(seq_len, np.int32)
          mask = np.zeros(seq_len, np.float32)
          seq = p + t
          targets[:len(seq)] = seq
          mask[len(p):len(seq)] = 1.0
          rows.append((targets, mask))
        targets = np.stack([r[0] for r in rows])
        mask = np.stack([r[1] for r in rows])
        batch = dict(targets=targets, loss_mask=mask, segment_ids=np.ones_like(targets),
                     inputs=np.concatenate([np.zeros((len(rows), 1), np.int32), targets[:, :-1]], 1),
                     positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), targets.shape).copy())
        scores = nll(batch).sum(-1)
        correct += int(np.argmin(scores) == 0)
      out[f"{shot}shot/{task}"] = correct / n
  return out
