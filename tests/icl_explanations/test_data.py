"""Explanations, their perturbations (exact text on hand-built exemplars), prompts, answer extraction, the
train/test split by problem identity, and the jsonl readers' errors."""
import numpy as np
import pytest

from common.config import ConfigError
from icl_explanations import data
from icl_explanations.data import Exemplar, Segment

RULE = {"plus": "#", "minus": "&", "times": "@"}
# 2 # 3 @ 4 = (2 + 3) x 4, by hand; the intermediate 5 is written twice, its wrong value 6.
FIVE = Segment("5", "value", "6")
MIXED = Exemplar("2 # 3 @ 4", "# means plus, @ means times.",
                 (Segment("2"), Segment("+", "op"), Segment("3="), FIVE, Segment(". "), FIVE, Segment("x", "op"),
                  Segment("4="), Segment("20"), Segment(".")), "20", "mixed")
ADD = Exemplar("1 # 1", "# means plus.", (Segment("1"), Segment("+", "op"), Segment("1="), Segment("2"), Segment(".")),
               "2", "add")


@pytest.mark.parametrize("perturbation, expected", [
    ("none", "# means plus, @ means times. 2+3=5. 5x4=20. The answer is 20."),
    ("mask_ops", "# means plus, @ means times. 2_3=5. 5_4=20. The answer is 20."),
    ("mask_values", "# means plus, @ means times. 2+3=_. _x4=20. The answer is 20."),
    ("incorrect_values", "# means plus, @ means times. 2+3=6. 6x4=20. The answer is 20."),
    ("no_nl", "2+3=5. 5x4=20. The answer is 20."),
    ("no_trace", "# means plus, @ means times. The answer is 20."),
    ("no_explanation", "The answer is 20."),
])
def test_each_perturbation_writes_the_expected_text(perturbation, expected):
  assert data.answer_text(MIXED, perturbation) == expected


def test_the_generator_writes_the_hand_built_explanation():
  made = data.arith_exemplar(RULE, ["plus", "times"], [2, 3, 4], np.random.default_rng(0))
  assert made.question == MIXED.question and made.answer == "20" and made.form == "mixed"
  assert data.answer_text(made) == data.answer_text(MIXED)
  wrong = data.explanation(made, "incorrect_values")  # the same wrong intermediate both times, answer kept
  first, second = wrong.split("2+3=")[1].split(". ")
  assert first != "5" and second.startswith(first + "x4=20")


def test_borrowed_explanations_come_from_the_next_exemplar():
  text = data.prompt([ADD, MIXED], ADD, "borrowed")
  assert text == ("Q: 1 # 1\nA: # means plus, @ means times. 2+3=5. 5x4=20. The answer is 2.\n\n"
                  "Q: 2 # 3 @ 4\nA: # means plus. 1+1=2. The answer is 20.\n\n"
                  "Q: 1 # 1\nA:")
  with pytest.raises(ConfigError, match="unknown perturbation 'shuffle'"):
    data.prompt([ADD], ADD, "shuffle")


def test_letter_and_coin_traces_by_hand():
  letter = data.letter_exemplar("last", ["tiger", "lemon"], np.random.default_rng(0))
  assert data.answer_text(letter) == "take the last letter. tiger:r. lemon:n. rn. The answer is rn."
  assert data.answer_text(letter, "mask_values") == "take the last letter. tiger:_. lemon:_. rn. The answer is rn."
  coin = data.coin_exemplar(dict(flip="zips", keep="pats"), "heads", [True, False], np.random.default_rng(0))
  assert coin.question == "heads. zips. pats."
  assert data.answer_text(coin) == "zips flips, pats keeps. heads. zips tails. pats tails. The answer is tails."
  assert data.answer_text(coin, "incorrect_values") == (
      "zips flips, pats keeps. heads. zips heads. pats tails. The answer is tails.")
  assert data.answer_text(coin, "mask_ops") == "zips flips, pats keeps. heads. _ tails. _ tails. The answer is tails."


@pytest.mark.parametrize("text, expected", [
    (" # means plus. 4+3=7. The answer is 7.", "7"),
    ("The answer is 1,234.", "1234"),
    ("The answer is -3", "-3"),
    ("The answer is rn.\nQ: next", "rn"),
    ("The answer is heads. The answer is tails.", "heads"),
    ("4+3=7. so it is 7", None),
    ("", None),
])
def test_answer_extraction(text, expected):
  assert data.extract_answer(text) == expected


@pytest.mark.parametrize("family", data.FAMILIES)
def test_splits_never_put_a_test_problem_into_training(family):
  rng = np.random.default_rng(0)
  train = [data.make_episode(family, rng, split="train", pool_size=3, queries=1) for _ in range(40)]
  test = [data.make_episode(family, rng, split="test", pool_size=3, queries=1) for _ in range(40)]
  train_ids = {e.identity for ep in train for e in ep.pool + ep.queries}
  test_ids = {e.identity for ep in test for e in ep.pool + ep.queries}
  assert train_ids and test_ids and not train_ids & test_ids
  assert all(data.is_test_identity(i) for i in test_ids) and not any(data.is_test_identity(i) for i in train_ids)
  assert all(q.identity not in {p.identity for p in ep.pool} for ep in test for q in ep.queries)


def test_a_complementarity_pool_has_the_forms_asked_for():
  ep = data.make_episode("arith", np.random.default_rng(1), split="test", pool_size=4, queries=2, query_form="mixed",
                         pool_forms=["add", "add", "mul", "mul"])
  assert [e.form for e in ep.pool] == ["add", "add", "mul", "mul"] and {q.form for q in ep.queries} == {"mixed"}
  with pytest.raises(ConfigError, match="unknown form 'div'"):
    data.make_episode("arith", np.random.default_rng(1), split="test", pool_size=1, queries=1, query_form="div")


def test_readers_name_the_file_and_line_of_a_bad_row(tmp_path):
  good = tmp_path / "plain.jsonl"
  good.write_text('{"question": "q1", "explanation": "e1", "answer": "a1"}\n\n'
                  '{"question": "q2", "explanation": "e2", "answer": 2}\n')
  rows = data.read_exemplars(str(good))
  assert [(r.question, data.answer_text(r)) for r in rows] == [("q1", "e1 The answer is a1."),
                                                              ("q2", "e2 The answer is 2.")]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"premise": "p", "hypothesis": "h", "label": "entailment", "explanation": "x"}\n{"premise": \n')
  with pytest.raises(ConfigError, match=f"{bad}:2: not a JSON object"):
    data.read_exemplars(str(bad), "esnli")
  missing = tmp_path / "ecqa.jsonl"
  missing.write_text('{"question": "q", "choices": ["a", "b"], "explanation": "x"}\n')
  with pytest.raises(ConfigError, match=f"{missing}:1: missing or empty field 'answer'"):
    data.read_exemplars(str(missing), "ecqa")
  with pytest.raises(ConfigError, match="no/such.jsonl: no such file"):
    data.read_exemplars(str(tmp_path / "no/such.jsonl"))
  with pytest.raises(ConfigError, match="unknown reader 'csv'"):
    data.read_exemplars(str(good), "csv")


def test_gsm8k_reuses_the_shared_loader(tmp_path):
  path = tmp_path / "gsm8k.jsonl"
  path.write_text('{"question": "Tom has 2 apples and buys 3. How many?", '
                  '"answer": "He has 2+3=<<2+3=5>>5 apples.\\n#### 5"}\n')
  (ex,) = data.read_exemplars(str(path), "gsm8k")
  assert ex.answer == "5" and "<<" not in data.explanation(ex) and "5 apples" in data.explanation(ex)
