"""Evaluation: text and math answer metrics (math graded in a bounded worker pool), pass@k / majority@k, loaders
of the public math layouts (MATH, GSM8K, AIME/AMC, OlympiadBench, Minerva), and a harness that scores sampled
generations.

    from common.eval import evaluate_generations, load_math, generation_examples
    problems = load_math("../shared/data/math/math500_test.jsonl")
    result = evaluate_generations(generation_examples(problems), generate_fn, "math", n=8, k=4)

Importing this package is cheap: math-verify (SymPy) and rouge-score load on first use.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "normalize_answer": "text_metrics",
    "exact_match": "text_metrics",
    "token_f1": "text_metrics",
    "rouge_l": "text_metrics",
    "last_boxed": "math_answers",
    "extract_math_answer": "math_answers",
    "math_equivalent": "math_answers",
    "pass_at_k": "sampling",
    "majority_vote": "sampling",
    "MathProblem": "math_data",
    "load_math": "math_data",
    "load_gsm8k": "math_data",
    "load_math_problems": "math_data",
    "detect_layout": "math_data",
    "Fields": "math_data",
    "LAYOUTS": "math_data",
    "WorkerPool": "worker_pool",
    "generation_examples": "math_data",
    "GenerationExample": "harness",
    "Metric": "harness",
    "METRICS": "harness",
    "evaluate_generations": "harness",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"common.eval.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'common.eval' has no attribute '{name}'")


__all__ = list(_LAZY)
