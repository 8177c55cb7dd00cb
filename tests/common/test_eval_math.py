"""Math-answer equivalence on tricky pairs and on MATH-500's own reference answers; bounded grading."""
from __future__ import annotations

import pathlib
import threading

import pytest

from common.eval import math_answers, math_data, worker_pool

MATH500 = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "math" / "math500_test.jsonl"

EQUIVALENT = [
    (r"\frac{1}{2}", r"\dfrac{1}{2}"),
    (r"\frac{1}{2}", "0.5"),
    (r"\frac12", "1/2"),
    (r"\tfrac{3}{4}", "0.75"),
    (r"\frac{14}{3}", r"4\frac{2}{3}"),
    (r"3\sqrt{13}", r"\sqrt{117}"),
    (r"[2, 5)", r"[2,5)"),
    (r"(-\infty, 3]", r"(-\infty,3]"),
    (r"90^\circ", "90"),
    (r"90^\circ", r"90^{\circ}"),
    (r"\text{Evelyn}", "Evelyn"),
    (r"\text{(C)}", "C"),
    (r"6 - 5i", "6-5i"),
    ("x=5", "5"),
    ("1,-2", "-2, 1"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)"),
    ("2000", "2,000"),
    (r"\$18", "18"),
    ("p - q", "-q + p"),
    (r"\boxed{\frac{1}{2}}", r"The answer is $\boxed{0.5}$."),
    # Typesetting only: a trailing period, \text around a number, spaces, thin spaces, synonyms.
    ("204", r"The answer is $\boxed{204.}$"),
    ("27.0", r"\text{27}"),
    (r"\text{27}", "27.0"),
    ("b>a>c", "b > a > c"),
    (r"\{x|-2\leq x < 1\}", r"\left\{ x \mid -2 \le x < 1 \right\}"),
    (r"x \neq \pm 5", r"x\ne\pm5"),
    ("1\\,000", "1000"),
    # The percent sign is a unit, dropped like `^\circ`: a percent answer is the number before it.
    (r"50\%", "50"),
    ("50", r"50\%"),
    (r"50\%", "50%"),
]

NOT_EQUIVALENT = [
    (r"\frac{1}{2}", r"\frac{1}{3}"),
    ("0.5", "0.50001"),
    (r"(-\infty, 3]", r"(-\infty,3)"),
    (r"[2, 5)", "(2, 5)"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(\pi/2, 3)"),
    (r"\text{Evelyn}", r"\text{Bob}"),
    (r"\pi", "3.14"),
    ("5", "6"),
    ("1,-2", "1, 2"),
    ("5", ""),
    # A reference that does not parse whole is never reduced to one of its numbers.
    (r"\{x|-2\leq x < 1\}", "1"),
    (r"\{x|-2\leq x < 1\}", "-2"),
    (r"x \neq \pm 5", "5"),
    ("5", r"x \neq \pm 5"),
    (r"x \in (1, 4]", "4"),
    # ... and a percent is not its fraction.
    (r"50\%", "0.5"),
    ("0.5", r"50\%"),
]


@pytest.mark.parametrize("reference,prediction", EQUIVALENT)
def test_equivalent_answers(reference, prediction):
  assert math_answers.math_equivalent(reference, prediction)


@pytest.mark.parametrize("reference,prediction", NOT_EQUIVALENT)
def test_different_answers(reference, prediction):
  assert not math_answers.math_equivalent(reference, prediction)


def test_last_boxed_takes_the_last_top_level_box_with_nested_braces():
  assert math_answers.last_boxed(r"first \boxed{1}, then \boxed{\frac{a}{b^{2}}}.") == r"\frac{a}{b^{2}}"
  assert math_answers.last_boxed(r"\boxed{\boxed{3} + 1}") == r"\boxed{3} + 1"
  assert math_answers.last_boxed(r"\fbox{7}") == "7"
  assert math_answers.last_boxed(r"so $\boxed 5$.") == "5"
  assert math_answers.last_boxed(r"\boxed{2} and \boxed{3") == "2"  # an unclosed box is no answer
  assert math_answers.last_boxed("no box here") is None


def test_extract_math_answer_prefers_the_box_then_reads_the_prose():
  assert math_answers.extract_math_answer(r"We get $x=2$, so \boxed{2}. Check: 2+2=4.") == "2"
  assert math_answers.extract_math_answer("Therefore, the final answer is $\\frac{1}{2}$.") == r"\frac{1}{2}"
  assert math_answers.extract_math_answer("I do not know.") is None


def test_equivalence_works_off_the_main_thread():
  """math-verify's SIGALRM bound is main-thread only; a worker thread must still get answers."""
  results = []
  worker = threading.Thread(target=lambda: results.append(
      (math_answers.math_equivalent(r"\frac{3}{8}", "0.375"), math_answers.math_equivalent("2", "3"))))
  worker.start()
  worker.join()
  assert results == [(True, False)]


HUGE = r"9^{9^{9^{9}}}"  # big-integer work that holds the GIL; math-verify's own SIGALRM bound cannot stop it


@pytest.fixture(scope="module")
def pool():
  """One pool for the module, with a short limit; the first call's worker start is not counted in it."""
  pool = worker_pool.WorkerPool(workers=1, timeout_s=2.0)
  yield pool
  pool.close()


def test_a_huge_answer_is_graded_wrong_in_a_thread_and_the_worker_is_replaced(pool):
  assert math_answers.math_equivalent("3", "3 + 0", pool)  # starts the worker
  results = []
  grader = threading.Thread(target=lambda: results.append(math_answers.math_equivalent("1", HUGE, pool)))
  grader.start()
  grader.join()
  assert results == [False] and pool.timeouts == 1
  assert math_answers.math_equivalent(r"\frac{3}{8}", "0.375", pool)  # a fresh worker took its place


def test_the_pool_raises_timeout_error_past_its_limit(pool):
  timeouts = pool.timeouts
  with pytest.raises(TimeoutError):
    pool.call(math_answers._equivalent_in_worker, "1", HUGE)  # pylint: disable=protected-access
  assert pool.timeouts == timeouts + 1


@pytest.fixture(scope="module")
def math500():
  if not MATH500.is_file():
    pytest.skip(f"{MATH500} is not here (the shared evaluation data sits beside the repository)")
  problems = math_data.load_math(str(MATH500))
  assert len(problems) == 500
  return problems


def _rerendered(answer: str) -> str:
  """The same answer typeset differently: display fractions, no \\left/\\right sizing."""
  return answer.replace(r"\frac", r"\dfrac").replace(r"\left", "").replace(r"\right", "")


def test_every_math500_answer_equals_the_last_box_of_its_solution(math500):
  mismatched = [(p.id, p.answer, math_answers.last_boxed(p.solution)) for p in math500
                if not math_answers.math_equivalent(p.answer, p.solution)]
  assert not mismatched, mismatched


def test_every_math500_answer_survives_retypesetting_inside_a_generation(math500):
  mismatched = [(p.id, p.answer) for p in math500 if not math_answers.math_equivalent(
      p.answer, "So the answer is $\\boxed{" + _rerendered(p.answer) + "}$.")]
  assert not mismatched, mismatched


def test_math_verify_own_extraction_of_each_solution_agrees(math500):
  """math-verify's extraction from the whole solution is independent of `last_boxed`."""
  import math_verify  # pylint: disable=g-import-not-at-top
  mismatched = [(p.id, p.answer) for p in math500
                if not math_verify.verify(math_verify.parse("\\boxed{" + p.answer + "}"),
                                          math_verify.parse(p.solution))]
  assert not mismatched, mismatched


def test_answers_of_neighbouring_math500_problems_differ(math500):
  # Neighbours match only where their answers coincide ('3' and '3'), or where the reference is an
  # assignment whose value is the other answer ('x=5' against '5').
  for a, b in zip(math500, math500[1:]):
    if math_answers.math_equivalent(a.answer, b.solution):
      assert a.answer == b.answer or "=" in a.answer + b.answer, (a.id, a.answer, b.id, b.answer)
