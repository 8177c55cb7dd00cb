"""Exact match and answer recall of the answers (pit/evaluate.py) on hand-made cases."""
import pytest

from pit.evaluate import answer_recall, score_answers


def test_answer_recall_finds_the_answer_as_whole_words_after_normalisation():
  assert answer_recall("He was born in Momouth.", "Momouth") == 1.0
  assert answer_recall("the Usve Holdings", "Usve Holdings") == 1.0
  assert answer_recall("Momouthton", "Momouth") == 0.0
  assert answer_recall("1926", "1927") == 0.0


def test_scores_are_percentages_over_the_questions():
  scores = score_answers(["Momouth", "born in 1926", "painter"], ["momouth", "1926", "poet"])
  assert scores["em"] == pytest.approx(100 / 3)
  assert scores["recall"] == pytest.approx(200 / 3)
  assert 100 / 3 < scores["rouge_l"] < 200 / 3  # 1, 2/3 (LCS 1 of 3 and 1 tokens), 0
  with pytest.raises(ValueError):
    score_answers(["a"], [])
