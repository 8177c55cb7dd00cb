"""The generation harness with deterministic fake generators whose metrics are known by hand."""
from __future__ import annotations

import pathlib

import pytest

from common.config import ConfigError
from common.eval import harness, math_data
from common.eval.harness import GenerationExample


def _scripted(completions_by_prompt):
  """A generate_fn that returns fixed completions and records the batches it was called with."""
  calls = []

  def generate_fn(prompts, n):
    calls.append(list(prompts))
    return [completions_by_prompt[p][:n] for p in prompts]
  return generate_fn, calls


def test_math_task_mean_pass_at_k_and_majority():
  records = [GenerationExample("p1", (r"\frac{1}{2}",)), GenerationExample("p2", ("7",))]
  generate_fn, calls = _scripted({
      # p1: correct in samples 0 and 2 (0.5 written two ways); the vote over the first 3 is
      # {1/2: 2, 3: 1} -> right.
      "p1": [r"so \boxed{0.5}", r"\boxed{3}", r"hence $\boxed{\dfrac{1}{2}}$", r"\boxed{3}"],
      # p2: one correct sample of four; the first 3 vote 8, 8, 7 -> wrong.
      "p2": [r"\boxed{8}", "The final answer is $8$.", r"\boxed{7}", "no idea"],
  })
  result = harness.evaluate_generations(records, generate_fn, "math", n=4, k=3, batch_size=1)
  assert calls == [["p1"], ["p2"]]
  assert [e["scores"] for e in result["examples"]] == [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
  assert result["mean"] == pytest.approx(3 / 8)
  # pass@3 with n=4: c=2 -> 1 - C(2,3)/C(4,3) = 1; c=1 -> 1 - C(3,3)/C(4,3) = 3/4.
  assert [e["pass@3"] for e in result["examples"]] == pytest.approx([1.0, 0.75])
  assert result["pass@3"] == pytest.approx(0.875)
  assert [e["majority_answer"] for e in result["examples"]] == ["0.5", "8"]
  assert result["maj@3"] == pytest.approx(0.5)


def test_exact_match_task_votes_on_normalised_answers():
  records = [GenerationExample("capital of France?", ("Paris",))]
  generate_fn, _ = _scripted({"capital of France?": ["The Paris.", "Lyon", "paris", "Lyon"]})
  result = harness.evaluate_generations(records, generate_fn, "exact_match", n=4, k=4)
  # {paris: 2, lyon: 2}: a tie, won by the class seen first.
  assert result["examples"][0]["majority_answer"] == "paris"
  assert result["maj@4"] == 1.0 and result["pass@4"] == 1.0 and result["mean"] == 0.5


def test_f1_task_counts_pass_only_at_full_score():
  records = [GenerationExample("q", ("new york city",))]
  generate_fn, _ = _scripted({"q": ["new york", "new york city"]})
  result = harness.evaluate_generations(records, generate_fn, "f1", n=2, k=1)
  assert result["examples"][0]["scores"] == pytest.approx([0.8, 1.0])
  assert result["pass@1"] == pytest.approx(0.5)  # one of two samples reaches F1 = 1
  assert result["maj@1"] == pytest.approx(0.8)   # k=1: the first sample alone


def test_bad_arguments_and_malformed_generations_are_named():
  records = [GenerationExample("q", ("a",))]
  generate_fn, _ = _scripted({"q": ["a", "b"]})
  with pytest.raises(ConfigError, match="metric 'bleu'"):
    harness.evaluate_generations(records, generate_fn, "bleu")
  with pytest.raises(ConfigError, match="k=3"):
    harness.evaluate_generations(records, generate_fn, "exact_match", n=2, k=3)
  with pytest.raises(ValueError, match="expected 3 completions"):
    harness.evaluate_generations(records, generate_fn, "exact_match", n=3, k=1)


def test_gsm8k_end_to_end_with_a_generator_of_known_accuracy():
  """Problem i gets i % 4 right samples of n=3: the worked solution and the answer written with
  thousands separators; the other samples box the answer plus one."""
  path = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "math" / "gsm8k_test.jsonl"
  if not path.is_file():
    pytest.skip(f"{path} is not here (the shared evaluation data sits beside the repository)")
  problems = math_data.load_gsm8k(str(path))[:16]
  by_prompt = {}
  for i, (problem, example) in enumerate(zip(problems, math_data.generation_examples(problems))):
    right = f"{problem.solution}\nThe answer is $\\boxed{{{int(problem.answer):,}}}$."
    wrong = f"\\boxed{{{int(problem.answer) + 1}}}"
    by_prompt[example.prompt] = [right if j < i % 4 else wrong for j in range(3)]
  generate_fn, _ = _scripted(by_prompt)
  result = harness.evaluate_generations(math_data.generation_examples(problems), generate_fn, "math",
                                        n=3, k=2, batch_size=5)
  correct = [i % 4 for i in range(16)]
  assert [e["num_correct"] for e in result["examples"]] == correct
  assert result["mean"] == pytest.approx(sum(correct) / 48)
  # pass@2 of 3 samples: 0 right -> 0, 1 right -> 1 - C(2,2)/C(3,2) = 2/3, 2 or 3 right -> 1.
  assert result["pass@2"] == pytest.approx(sum({0: 0, 1: 2 / 3, 2: 1, 3: 1}[c] for c in correct) / 16)
  # The first two samples vote; a 1-1 tie goes to the first sample, which is right iff any is.
  assert result["maj@2"] == pytest.approx(sum(c >= 1 for c in correct) / 16)
