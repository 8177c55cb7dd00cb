"""`python -m ease.evaluate --workdir=DIR [--budgets=0.2,0.4,1.0] [--docs=128]`: the metrics of a trained run.

Greedy summaries of the eval documents from the evidence at each budget (the hard top-k mask; the lead and
the whole document for the baselines), scored on ROUGE-1/2/L against the references (rouge-score), evidence
precision and recall against the gold key sentences (token-weighted: the share of kept tokens that lie in a
gold sentence, the share of gold-sentence tokens kept), faithfulness (the share of the summary's words found
in the evidence; the reference's share beside it as the ceiling) and the compression rate (kept / document
tokens).
"""
from __future__ import annotations

import functools
import json
import re
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.cli import ArgumentParser
from common.config import ConfigError, run_main
from common.models.dense_lm import unrolled
from common.train.restore import load_run_model, read_run_config
from ease import train
from ease.data import SummaryData
from ease.model import key_bias

_WORDS = re.compile(r"\w+")


@functools.lru_cache(maxsize=1)
def _scorer():
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)


def rouge(prediction: str, reference: str) -> dict[str, float]:
  """ROUGE-1/2/L F-measures (rouge-score's tokenizer, no stemming)."""
  scores = _scorer().score(reference, prediction)
  return {k: scores[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")}


def faithfulness(summary: str, evidence: str) -> float:
  """The share of the summary's words (lower-cased, alphanumeric) that occur in the evidence; 1 for an empty
  summary (it claims nothing)."""
  words = _WORDS.findall(summary.lower())
  support = set(_WORDS.findall(evidence.lower()))
  return sum(w in support for w in words) / len(words) if words else 1.0


def evidence_scores(keep: np.ndarray, doc_mask: np.ndarray, gold: np.ndarray) -> dict[str, float]:
  """Token-weighted precision and recall of the kept document tokens against the gold sentences' tokens, and
  the compression rate, of one document (precision and recall NaN without gold sentences)."""
  kept = (keep > 0) & doc_mask
  in_gold = gold > 0
  out = dict(compression=kept.sum() / max(doc_mask.sum(), 1))
  out["evidence_precision"] = (kept & in_gold).sum() / kept.sum() if in_gold.any() and kept.any() else np.nan
  out["evidence_recall"] = (kept & in_gold).sum() / in_gold.sum() if in_gold.any() else np.nan
  return out


@functools.partial(nnx.jit, static_argnames=("budget", "doc_len", "summary_len"))
def generate(model, batch: dict, *, budget: float, doc_len: int, summary_len: int):
  """(keep [b, l], generated ids [b, summary_len]): greedy decoding of the summary from the hard evidence, with
  the abstractor's KV cache (`DenseLM.decode`, the evidence bias over the row's tokens at every step)."""
  unit_mask, _ = model.unit_mask(batch, hard=True, budget=budget)
  keep = model.keep(batch, unit_mask)
  bias, lm = key_bias(keep), model.abstractor
  prompt = batch["inputs"][:, :doc_len + 1]  # [bos] document [sep]
  rows = prompt.shape[0]
  positions = jnp.broadcast_to(jnp.arange(doc_len + 1), prompt.shape)
  caches = lm.init_cache(rows, doc_len + summary_len)
  logits, caches = lm.decode(prompt, positions, jnp.ones_like(prompt), caches, last_only=True, key_bias=bias)
  first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
  out = jnp.zeros((rows, summary_len), jnp.int32).at[:, 0].set(first)
  ones = jnp.ones((rows, 1), jnp.int32)

  def body(t, carry):
    out, caches = carry
    token = jax.lax.dynamic_slice_in_dim(out, t - 1, 1, axis=1)
    logits, caches = lm.decode(token, (doc_len + t) * ones, ones, caches, key_bias=bias)
    return out.at[:, t].set(jnp.argmax(logits[:, 0], -1).astype(jnp.int32)), caches

  out, _ = jax.lax.fori_loop(1, summary_len, body, (out, caches))
  return keep, out


def _mean(values: Sequence[float]) -> float:
  finite = [v for v in values if not np.isnan(v)]
  return float(np.mean(finite)) if finite else float("nan")


def _until_eos(ids: Sequence[int], eos: int) -> list[int]:
  ids = list(ids)
  return ids[:ids.index(eos)] if eos in ids else ids


def evaluate(model, data: SummaryData, *, budgets: Sequence[float], docs: int, batch_size: int = 64) -> dict:
  """{budget: mean metrics} over the first `docs` eval documents, and a few example summaries."""
  if model.abstractor.scan_layers:  # the KV cache runs the unrolled blocks
    model.abstractor = unrolled(model.abstractor)
  rows = {k: v[:docs] for k, v in data.rows["eval"].items()}
  examples = data.examples["eval"][:docs]
  tok, doc_len = data.tokenizer, data.doc_len
  summary_len = rows["inputs"].shape[1] - doc_len
  results, samples = {}, []
  for budget in budgets:
    per_doc = []
    for start in range(0, len(examples), batch_size):
      batch = {k: jnp.asarray(v[start:start + batch_size]) for k, v in rows.items()}
      keep, ids = jax.device_get(generate(model, batch, budget=float(budget), doc_len=doc_len,
                                          summary_len=summary_len))
      for i in range(ids.shape[0]):
        ex = examples[start + i]
        doc_ids, doc_mask = rows["inputs"][start + i], rows["doc_mask"][start + i]
        evidence = tok.decode([int(t) for t, k, d in zip(doc_ids, keep[i], doc_mask) if k > 0 and d])
        summary = tok.decode(_until_eos(ids[i], tok.eos_id))
        row = dict(rouge(summary, ex.summary), faithfulness=faithfulness(summary, evidence),
                   reference_faithfulness=faithfulness(ex.summary, evidence),
                   **evidence_scores(keep[i], doc_mask, rows["gold"][start + i]))
        per_doc.append(row)
        if len(samples) < 3 and budget == budgets[0]:
          samples.append(dict(evidence=evidence, summary=summary, reference=ex.summary))
    results[f"{budget:g}"] = {k: _mean([r[k] for r in per_doc]) for k in per_doc[0]}
  return dict(budgets=results, samples=samples)


def load_run(workdir: str):
  """(config, data, model) of a trained run."""
  cfg = read_run_config(workdir, "--workdir")
  model, _ = load_run_model(workdir, cfg, train.make_task(cfg).build_model, key="--workdir")
  return cfg, train.data_for(cfg), model


def main(argv=None) -> int:
  p = ArgumentParser(prog="python -m ease.evaluate", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="a run of python -m ease.train")
  p.add_argument("--budgets", default="0.2,0.4,1.0", help="shares of units kept at inference")
  p.add_argument("--docs", type=int, default=128, help="eval documents summarised")
  a = p.parse_args(argv)
  try:
    budgets = [float(b) for b in a.budgets.split(",")]
  except ValueError:
    raise ConfigError(f"--budgets: expected numbers separated by commas, got '{a.budgets}'") from None
  if not all(0 < b <= 1 for b in budgets):
    raise ConfigError("--budgets: each share must be in (0, 1]")
  _, data, model = load_run(a.workdir)
  print(json.dumps(evaluate(model, data, budgets=budgets, docs=a.docs), indent=1))
  return 0


if __name__ == "__main__":
  run_main(lambda: main(sys.argv[1:]))
