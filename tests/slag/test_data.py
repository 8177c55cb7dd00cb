"""The knowledge base and the official jsonl readers: entailment rules give the expected statements, every
belief carries its paraphrases, and a malformed line is named by file and line."""
import json
import re

import numpy as np
import pytest

from common.config import ConfigError
from common.tokenizers import load_tokenizer
from slag import data as slag_data


def test_making_a_membership_true_entails_every_property_of_the_category():
  assert slag_data.entailments("bird", "Zorvik", "fish") == (("Zorvik has wings.", 1), ("Zorvik lays eggs.", 1))
  assert slag_data.entailments("fish", "Zorvik", "fish") == ()  # already true through its own category


def test_the_generated_kb_labels_memberships_and_properties_by_the_entity_category():
  kb = slag_data.generated_kb(10, 2, 0.3, seed=1)
  assert len(kb.beliefs) == 10 * 3 and len(kb.split("eval")) == 3 * 3
  for belief in kb.beliefs:
    assert len(belief.paraphrases) == len(slag_data.MEMBER_TEMPLATES) - 1 and belief.main not in belief.paraphrases
    assert (belief.label == 1) == (belief.entailed == ())  # only false memberships entail new properties
  statements = dict(kb.statements)
  for belief in kb.beliefs:
    name, category = next(re.fullmatch(r"(\w+) is a (\w+)\.", t).groups() for t in (belief.main, *belief.paraphrases)
                          if re.fullmatch(r"(\w+) is a (\w+)\.", t))
    for p in slag_data.CATEGORIES[category]:  # a true membership's properties are true statements
      assert belief.label == 0 or statements[f"{name} {p}."] == 1


def test_point_arrays_flip_the_prediction_and_mask_missing_paraphrases():
  beliefs = [slag_data.Belief("A is true.", 1, ("A holds.",)), slag_data.Belief("B is false.", 0)]
  points = slag_data.point_arrays(beliefs, np.array([1, 0]), load_tokenizer("byte"), 16, 40)
  assert points["desired"].tolist() == [0, 1]
  assert points["para_mask"].tolist() == [[1.0], [0.0]] and points["ent_mask"].tolist() == [[0.0], [0.0]]
  assert load_tokenizer("byte").decode(points["cond"][0][:points["cond_len"][0]]) == "true >> false || A is true."


def write(path, rows):
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
  return str(path)


def test_official_jsonl_files_are_read(tmp_path):
  fever = write(tmp_path / "fever.jsonl", [{"input": "Paris is in France.", "output": [{"answer": "SUPPORTS"}]},
                                           {"input": "Paris is in Peru.", "output": [{"answer": "REFUTES"}]}])
  assert [(b.main, b.label) for b in slag_data.read_beliefs(fever, "fever").beliefs] == [
      ("Paris is in France.", 1), ("Paris is in Peru.", 0)]
  zsre = write(tmp_path / "zsre.jsonl", [
      {"input": "x", "output": [{"answer": "Rome"}],
       "meta": {"template_questions": ["Capital of Italy?", "Italy's capital?"]}},
      {"input": "y", "output": [{"answer": "Oslo"}], "meta": {"template_questions": ["Capital of Norway?"]}}])
  first = slag_data.read_beliefs(zsre, "zsre").beliefs[:2]
  assert first[0] == slag_data.Belief("Capital of Italy? Rome", 1, ("Italy's capital? Rome",))
  assert first[1].main == "Capital of Italy? Oslo" and first[1].label == 0
  leap = write(tmp_path / "leap.jsonl", [{"phrase": "A crow can fly.", "answer": 1, "context": "c",
                                          "metadata": {"separate_sentences": {"implicit_rule": "A crow is a bird."}}},
                                         {"phrase": "k", "answer": 0, "context": "", "metadata": {}}])
  assert slag_data.read_beliefs(leap, "leapofthought").beliefs == (
      slag_data.Belief("A crow is a bird.", 1, (), (("A crow can fly.", 1),)),)


def test_a_malformed_or_incomplete_line_is_named_by_file_and_line(tmp_path):
  bad = write(tmp_path / "bad.jsonl", [{"input": "a", "output": [{"answer": "SUPPORTS"}]}, "{not json"])
  with pytest.raises(ConfigError, match="bad.jsonl:2: not a JSON object"):
    slag_data.read_beliefs(bad, "fever")
  missing = write(tmp_path / "missing.jsonl", [{"output": [{"answer": "SUPPORTS"}]}])
  with pytest.raises(ConfigError, match="missing.jsonl:1: missing key 'input'"):
    slag_data.read_beliefs(missing, "fever")
  with pytest.raises(ConfigError, match="no/such.jsonl: no such file"):
    slag_data.read_beliefs(str(tmp_path / "no/such.jsonl"), "fever")


def test_array_data_pads_the_last_eval_batch_with_zero_weight():
  rows = dict(x=np.arange(5), weight=np.ones(5, np.float32))
  data = slag_data.ArrayData(rows, rows, batch_size=4, seed=0)
  batches = list(data.eval_batches())
  assert [b["weight"].tolist() for b in batches] == [[1, 1, 1, 1], [1, 0, 0, 0]]
  assert sorted(np.concatenate([data.train_batch(0)["x"], data.train_batch(4)["x"][:1]]).tolist()) == [0, 1, 2, 3, 4]
