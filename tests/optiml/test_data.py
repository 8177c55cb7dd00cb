"""The bench's data: importers of both Super-NaturalInstructions schemas and of prompt/completion jsonl, the
generated suite, the three held-out levels (no leak over the whole suite), the leakage filter and k-shot
prompts that never show the instance they ask about."""
import json

import numpy as np
import pytest

from common.config import ConfigError
from optiml import data as D

OLD_SCHEMA = {  # Natural Instructions v2.x as first released: strings everywhere
    "Definition": "Reverse the word.", "Categories": ["String Edit"], "Source": ["made up"],
    "Positive Examples": [{"input": "cat", "output": "tac", "explanation": "backwards"}],
    "Negative Examples": [{"input": "dog", "output": "dog", "explanation": "not reversed"}],
    "Instances": [{"id": "t1-1", "input": "abc", "output": "cba"}, {"id": "t1-2", "input": "xy", "output": "yx"}]}
NEW_SCHEMA = {  # later releases: Definition a list, each instance's output a list of accepted answers
    "Definition": ["Answer the question.", "Use one word."], "Categories": ["Question Answering"],
    "Positive Examples": [], "Negative Examples": [],
    "Instances": [{"id": "t2-1", "input": "sky?", "output": ["blue", "azure"]}]}


def write(path, obj):
  path.write_text(json.dumps(obj))
  return str(path)


def test_niv2_task_files_of_both_schemas_read_the_same_fields(tmp_path):
  old = D.read_niv2_task(write(tmp_path / "task001_reverse.json", OLD_SCHEMA))
  assert (old.name, old.category, old.templates) == ("task001_reverse", "string_edit", ("Reverse the word.",))
  assert [(i.input, i.references) for i in old.instances] == [("abc", ("cba",)), ("xy", ("yx",))]
  assert [(d.input, d.output) for d in old.demos] == [("cat", "tac")] and old.metric == "rouge_l"
  new = D.read_niv2_task(write(tmp_path / "task002_qa.json", NEW_SCHEMA))
  assert new.templates == ("Answer the question.\nUse one word.",) and new.category == "question_answering"
  assert new.instances[0].output == "blue" and new.instances[0].references == ("blue", "azure")
  assert new.demos == ()


@pytest.mark.parametrize("change, pattern", [
    (dict(Instances=[{"id": "x", "input": "a"}]), r"field 'Instances'\[0\]: expected an object with 'input' and"),
    (dict(Definition=7), "field 'Definition': expected a string or a list of strings"),
    (dict(Instances=[{"input": "a", "output": []}]), r"field 'Instances'\[0\].output"),
    (dict(Categories=[]), "field 'Categories'"),
])
def test_a_bad_niv2_field_is_named_with_its_file(tmp_path, change, pattern):
  path = write(tmp_path / "task9.json", {**OLD_SCHEMA, **change})
  with pytest.raises(ConfigError, match=f"{path}: {pattern}"):
    D.read_niv2_task(path)
  del_instances = {k: v for k, v in OLD_SCHEMA.items() if k != "Instances"}
  with pytest.raises(ConfigError, match="missing field 'Instances'"):
    D.read_niv2_task(write(tmp_path / "task10.json", del_instances))


def test_prompt_jsonl_reads_both_field_forms_and_names_a_bad_line(tmp_path):
  good = tmp_path / "flan_sum.jsonl"
  good.write_text('{"inputs": "Add 2 and 3.", "targets": "5"}\n\n'
                  '{"prompt": "Say hi.", "completion": ["hi", "hello"]}\n')
  task = D.read_prompt_jsonl(str(good))
  assert [(i.input, i.references) for i in task.instances] == [("Add 2 and 3.", ("5",)), ("Say hi.", ("hi", "hello"))]
  assert task.category == "flan_sum" and task.benchmark == "promptsource"
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"inputs": "a", "targets": "b"}\n{"inputs": "c" "targets": "d"}\n')
  with pytest.raises(ConfigError, match=f"{bad}:2: not a JSON object"):
    D.read_prompt_jsonl(str(bad))
  bad.write_text('{"inputs": "a"}\n')
  with pytest.raises(ConfigError, match=f"{bad}:1: missing field 'targets'"):
    D.read_prompt_jsonl(str(bad))
  with pytest.raises(ConfigError, match="no such file"):
    D.read_prompt_jsonl(str(tmp_path / "absent.jsonl"))


def test_the_generated_suite_has_60_tasks_in_12_categories_with_distinct_instances():
  suite = [t for t in D.generated_suite(0) if t.category not in D.COMPONENTS]
  assert len(suite) >= 60 and len({t.category for t in suite}) >= 12
  assert len({t.name for t in suite}) == len(suite)
  for t in suite:
    assert len({i.input for i in t.instances}) == len(t.instances) >= 8, t.name
    assert t.metric in D.METRICS and (t.metric == "accuracy") == bool(t.options)
    if t.options:
      assert all(i.output in t.options for i in t.instances), t.name
  assert D.generated_suite(0)[5].instances == D.generated_suite(0)[5].instances  # a pure function of the seed
  assert {t.benchmark for t in suite} == set(D.BENCHMARKS)


def test_the_three_levels_never_leak_into_training_over_the_whole_suite():
  suite = D.generated_suite(0)
  split = D.split_suite(suite, heldout_categories=["logic", "set_ops"], heldout_tasks_per_category=1,
                        eval_instances=8)
  train_names = {t.name for t in split.train}
  train_categories = {t.category for t in split.train}
  train_pairs = {(t.name, i.input) for t in split.train for i in t.instances}
  assert not train_categories & {"logic", "set_ops"}
  for t, items, _ in split.evals["heldout_category"]:
    assert t.category in ("logic", "set_ops") and t.name not in train_names
  for t, items, _ in split.evals["heldout_task"]:
    assert t.category in train_categories and t.name not in train_names
  assert len(split.evals["heldout_task"]) == len(train_categories)
  for t, items, _ in split.evals["heldout_instance"]:
    assert t.name in train_names and items
    assert not {(t.name, i.input) for i in items} & train_pairs
  # the leakage filter ran: no evaluated input+output is a training text verbatim
  train_texts = {f"{i.input} {i.output}" for t in split.train for i in t.instances}
  assert all(f"{i.input} {i.output}" not in train_texts for entries in split.evals.values() for _, items, _ in entries
             for i in items)


def test_unknown_held_out_category_names_the_key():
  with pytest.raises(ConfigError, match="data.heldout_categories.*unknown category 'poetry'"):
    D.split_suite(D.generated_suite(0), heldout_categories=["poetry"], heldout_tasks_per_category=1, eval_instances=4)


def test_leakage_is_the_share_of_word_ngrams_seen_in_training():
  grams = D.training_ngrams(["the cat sat on the mat", "red"], 3)
  # 'the cat sat' and 'cat sat on' are in training; 'sat on a', 'on a rug' are not: 2 of 4
  assert D.leakage("the cat sat on a rug", grams, 3) == pytest.approx(0.5)
  assert D.leakage("red", grams, 3) == 1.0      # shorter than n: the whole text is its one gram
  assert D.leakage("blue", grams, 3) == 0.0
  tasks = [D.TaskSpec("copy", "c", "t5", ("Copy.",), "exact_match",
                      tuple(D.instance(x, x) for x in ("a b", "a b x", "a b y", "a b z"))),
           D.TaskSpec("echo", "d", "t5", ("Echo.",), "exact_match", tuple(D.instance(x, x) for x in ("a b", "g h")),
                      demos=(D.instance("z", "z"),))]
  split = D.split_suite(tasks, heldout_categories=["d"], heldout_tasks_per_category=0, eval_instances=2,
                        leakage_ngram=2, leakage_threshold=0.5)
  # every copy text holds the 2-gram (a b): echo's 'a b a b' has grams (a b), (b a), (a b), 2 of 3 seen -> dropped;
  # 'g h g h' shares none -> kept. Copy holds out 'a b' (dropped: 'a b a b' as above) and 'a b x' (kept:
  # 'a b x a b x' has 5 grams, only the two (a b) seen, 0.4 < 0.5).
  evaluated = [i.input for _, items, _ in split.evals["heldout_category"] for i in items]
  assert evaluated == ["g h"]
  assert [i.input for _, items, _ in split.evals["heldout_instance"] for i in items] == ["a b x"]
  assert split.dropped == 2


def test_k_shot_demonstrations_never_include_the_instance():
  suite = D.generated_suite(0)
  split = D.split_suite(suite, heldout_categories=["logic"], heldout_tasks_per_category=1, eval_instances=8)
  rng = np.random.default_rng(0)
  for entries in split.evals.values():
    for task, items, pool in entries:
      for item in items:
        demos = D.pick_demos(pool, item, 3, rng)
        assert demos and all(d.input != item.input for d in demos)
        prompt = D.render_prompt(task, item, demos)
        assert prompt.count(f"Input: {item.input}\n") == 1 and prompt.endswith("Output:")
  only = D.instance("x", "y")
  assert D.pick_demos([only], only, 2, rng) == []


def test_seqio_registration_gives_each_task_its_prompts_and_the_mixture_its_rates(tmp_path):
  import seqio
  tasks = [D.read_niv2_task(write(tmp_path / "task001_reverse.json", OLD_SCHEMA)),
           D.read_niv2_task(write(tmp_path / "task002_qa.json", NEW_SCHEMA))]
  name = D.register_seqio(tasks, [3.0, 1.0], prefix="optiml_test")
  assert D.register_seqio(tasks, [3.0, 1.0], prefix="optiml_test") == name  # idempotent
  mixture = seqio.get_mixture_or_task(name)
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {"optiml_test_task001_reverse": 3.0,
                                                                   "optiml_test_task002_qa": 1.0}
  task = seqio.get_mixture_or_task("optiml_test_task001_reverse")
  rows = list(task.get_dataset(sequence_length=None, split="train", shuffle=False).as_numpy_iterator())
  decode = task.output_features["inputs"].vocabulary.decode
  assert [decode(r["inputs"].tolist()) for r in rows] == [D.render_prompt(tasks[0], i) for i in tasks[0].instances]
  assert [decode(r["targets"].tolist()) for r in rows] == ["cba", "yx"]
  assert rows[0]["targets"][-1] == 1  # eos after the target
  assert task.metric_fns[0](["cba", "yx"], ["cba", "xy"]) == {"rouge_l": 50.0}
