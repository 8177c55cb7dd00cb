"""Generation-task evaluation: sample n completions per prompt, score them, aggregate.

The model side is a plain function `generate_fn(prompts, n) -> [[completion] * n for each prompt]`, so
the same harness grades a JAX model, an API, or a fake in a test. For each example it reports the mean
score of the n samples, pass@k (Chen et al., 2021, eq. 1) counting a sample correct when its score
reaches `pass_threshold`, and majority@k (Wang et al., 2023): the score of the sample whose answer wins
the vote among the first k samples.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, Sequence

from common.config import ConfigError
from common.eval import math_answers, sampling, text_metrics


@dataclasses.dataclass(frozen=True)
class GenerationExample:
  prompt: str
  references: tuple[str, ...]  # any one of them is a right answer


@dataclasses.dataclass(frozen=True)
class Metric:
  """How a completion is scored against the references, and which answer it casts in a vote."""
  name: str
  score: Callable[[str, Sequence[str]], float]   # (completion, references) -> [0, 1]
  answer: Callable[[str], Hashable | None]       # completion -> its answer (None: no vote)
  same: Callable[[Any, Any], bool] | None = None  # when two answers are one (None: equality)


def math_score(completion: str, references: Sequence[str]) -> float:
  """1.0 when the completion's final answer is mathematically equal to a reference answer."""
  answer = math_answers.extract_math_answer(completion)
  return float(answer is not None and any(math_answers.math_equivalent(ref, answer)
                                          for ref in references))


METRICS = {
    "exact_match": Metric("exact_match", text_metrics.exact_match, text_metrics.normalize_answer),
    "f1": Metric("f1", text_metrics.token_f1, text_metrics.normalize_answer),
    "rouge_l": Metric("rouge_l", text_metrics.rouge_l, text_metrics.normalize_answer),
    "math": Metric("math", math_score, math_answers.extract_math_answer, math_answers.math_equivalent),
}


def get_metric(metric: str | Metric) -> Metric:
  if isinstance(metric, Metric):
    return metric
  if metric not in METRICS:
    raise ConfigError(f"metric '{metric}' is unknown (expected one of {sorted(METRICS)})")
  return METRICS[metric]


def _generate(generate_fn, prompts: list[str], n: int) -> list[list[str]]:
  completions = generate_fn(prompts, n)
  if len(completions) != len(prompts) or any(len(samples) != n for samples in completions):
    shape = [len(samples) for samples in completions]
    raise ValueError(f"generate_fn returned completions per prompt {shape} for {len(prompts)} prompts "
                     f"and n={n}: expected {n} completions for each prompt")
  return [list(samples) for samples in completions]


def evaluate_generations(task_records: Sequence[GenerationExample],
                         generate_fn: Callable[[list[str], int], Sequence[Sequence[str]]],
                         metric: str | Metric, n: int = 1, k: int = 1, *,
                         batch_size: int = 0, pass_threshold: float = 1.0) -> dict[str, Any]:
  """Scores n completions of every record; returns the aggregates and per-example details.

  Keys: `mean` (over all samples), `pass@k`, `maj@k` (means over examples), `n`, `k`, `metric`,
  `num_examples`, and `examples`: one dict per record with its `scores`, `num_correct`, `pass@k`,
  `maj@k` and the `majority_answer`. `batch_size` prompts go to generate_fn at a time (0: all).
  """
  metric = get_metric(metric)
  if n < 1:
    raise ConfigError(f"n={n}: need at least one sample per prompt")
  if not 1 <= k <= n:
    raise ConfigError(f"k={k}: must be between 1 and n={n}")
  if not task_records:
    raise ConfigError("task_records: nothing to evaluate")
  step = batch_size if batch_size > 0 else len(task_records)
  examples = []
  for start in range(0, len(task_records), step):
    batch = task_records[start:start + step]
    for record, completions in zip(batch, _generate(generate_fn, [r.prompt for r in batch], n)):
      scores = [metric.score(completion, record.references) for completion in completions]
      num_correct = sum(score >= pass_threshold for score in scores)
      answers = [metric.answer(completion) for completion in completions[:k]]
      winner = sampling.majority_vote(answers, metric.same)
      examples.append({
          "scores": scores,
          "num_correct": num_correct,
          f"pass@{k}": sampling.pass_at_k(n, num_correct, k),
          f"maj@{k}": scores[winner] if winner is not None else 0.0,
          "majority_answer": answers[winner] if winner is not None else None,
      })
  num = len(examples)
  return {
      "metric": metric.name, "n": n, "k": k, "num_examples": num,
      "mean": sum(sum(e["scores"]) for e in examples) / (num * n),
      f"pass@{k}": sum(e[f"pass@{k}"] for e in examples) / num,
      f"maj@{k}": sum(e[f"maj@{k}"] for e in examples) / num,
      "examples": examples,
  }
