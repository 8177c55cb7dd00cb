"""The generated world and the variants' schedules (pit/data.py, pit/train.py): determinism, entity splits that
never leak a test fact into training text, answer-only loss on QA and all-token loss on documents, and each
variant's phases in the paper's order."""
import numpy as np
import pytest

from common.config import load
from common.data.sft import pack_examples
from common.tokenizers import ByteTokenizer
from pit import data as pit_data
from pit import train as pit_train

BYTE = ByteTokenizer()
SMALL = dict(old_per_kind=3, train_entities=9, test_entities=6, docs_per_entity=2)


def small_config(variant, setting="in_domain", tmp_path=None):
  cfg = load(f"pit/configs/tiny.py:variant={variant},setting={setting}")
  cfg.data.update(SMALL, tokenizer="byte", seq_len=1024, base_epochs=1.0, doc_epochs=2.0, qa_epochs=3.0, replay=0.0)
  cfg.train.batch_size = 4
  return cfg


def test_the_same_seed_generates_the_same_world_and_another_seed_another():
  a, b = pit_data.generate_world(seed=3, **SMALL), pit_data.generate_world(seed=3, **SMALL)
  assert a == b
  assert pit_data.generate_world(seed=4, **SMALL).test_docs != a.test_docs


def test_splits_are_by_entity_and_every_fact_has_a_question():
  world = pit_data.generate_world(seed=0, **SMALL)
  titles = lambda items: {x.title for x in items}
  assert titles(world.test_docs) == titles(world.test_qa) and len(titles(world.test_docs)) == 6
  assert titles(world.train_docs) == titles(world.train_qa) and len(titles(world.train_docs)) == 9
  assert not titles(world.test_docs) & (titles(world.train_docs) | titles(world.old_docs))
  assert len(world.test_docs) == 2 * 6 and len(world.test_qa) == 4 * 6
  for qa in world.test_qa:  # the answer is stated in each of the entity's documents
    assert all(qa.answer in d.text for d in world.test_docs if d.title == qa.title)


@pytest.mark.parametrize("setting", ["in_domain", "cross_domain"])
@pytest.mark.parametrize("variant", sorted(pit_data.VARIANTS))
def test_no_test_entity_or_test_question_appears_in_training_text_but_its_own_test_documents(variant, setting):
  cfg = small_config(variant, setting)
  corpus = pit_data.corpus_for(cfg.data)
  test_names = {d.title for d in corpus.test_docs}
  own_docs = {BYTE.decode(pit_data.encode_doc(d, BYTE)[0]): d.title for d in corpus.test_docs}
  questions = [q.question for q in corpus.test_qa]
  sets = pit_data.example_sets(corpus, BYTE, answer_weight=2.0)
  for spec in pit_data.phase_specs(variant, cfg.data):
    for name in spec.sets:
      for ids, _ in sets[name]:
        text = BYTE.decode(ids)
        assert not any(q in text for q in questions), (spec.name, text)
        mentioned = {n for n in test_names if n in text}
        if mentioned:  # only a test document, naming only its own entity
          assert name in ("test_docs", "test_docs_weighted") and mentioned == {own_docs[text]}, (spec.name, text)


def test_documents_train_every_token_and_qa_pairs_only_the_answer():
  doc = pit_data.Doc("Ana", (("Ana was born in ", False), ("Tolvale", True), (".", False)))
  ids, weights = pit_data.encode_doc(doc, BYTE, answer_weight=3.0)
  text = "Ana was born in Tolvale."
  assert ids.tolist() == [b + 3 for b in text.encode()] + [BYTE.eos_id]
  assert weights.tolist() == [1.0] * 16 + [3.0] * 7 + [1.0, 1.0]
  qa = pit_data.QA("Ana", "Where?", "Tolvale")
  rows, _ = pack_examples([pit_data.encode_qa(qa, BYTE), pit_data.encode_doc(doc, BYTE)], 128)
  prompt = len("Question: Where?\nAnswer: ")
  qa_len = prompt + len("Tolvale") + 1
  # Position t predicts token t + 1: the QA pair's answer (7 bytes) and EOS, then every token of the document.
  expected = [0.0] * (prompt - 1) + [1.0] * 8 + [1.0] * (len(text) + 1 - 1)
  assert rows["loss_mask"][0, :qa_len - 1 + len(text)].tolist() == expected
  assert rows["loss_mask"][0, qa_len - 1 + len(text):].sum() == 0


def test_a_documents_qa_pairs_come_right_before_it_in_one_sequence():
  world = pit_data.generate_world(seed=0, **SMALL)
  doc = world.train_docs[0]
  qas = [q for q in world.train_qa if q.title == doc.title]
  ids, weights = pit_data.encode_qa_then_doc(qas, doc, BYTE)
  text = BYTE.decode(ids)
  expected = "".join(pit_data.qa_prompt(q) + q.answer for q in qas) + doc.text
  assert text == expected
  assert weights[-len(BYTE.encode(doc.text)) - 1:].min() == 1.0


# The paper's orders (secs. 3-4): (example sets, epochs key) per phase after the base phase.
EXPECTED = {
    "base": [],
    "open_book": [({"train_qa_open"}, "doc")],
    "cpt": [({"test_docs"}, "doc")],
    "it": [({"train_docs", "test_docs"}, "doc"), ({"train_qa"}, "qa")],
    "it_no_forget": [({"train_docs", "test_docs"}, "doc"), ({"train_qa", "test_docs"}, "qa")],
    "mix_all": [({"train_qa", "train_docs", "test_docs"}, "doc")],
    "pit": [({"train_qa_then_docs"}, "doc"), ({"test_docs"}, "doc")],
    "pit_pp": [({"train_qa"}, "qa"), ({"train_qa_then_docs"}, "doc"), ({"test_docs"}, "doc")],
    "pit_qa_only": [({"train_qa"}, "qa"), ({"test_docs"}, "doc")],
    "pit_qa_then_docs": [({"train_qa"}, "qa"), ({"train_docs"}, "doc"), ({"test_docs"}, "doc")],
    "pit_interleaved": [({"train_qa", "train_docs"}, "doc"), ({"test_docs"}, "doc")],
    "it_weighted": [({"train_docs_weighted", "test_docs_weighted"}, "doc"), ({"train_qa"}, "qa")],
}


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_each_variant_is_its_phases_in_order_for_their_epochs_and_steps(variant):
  cfg = small_config(variant)
  epochs = {"doc": 2.0, "qa": 3.0}
  specs = pit_data.phase_specs(variant, cfg.data)
  assert [(set(s.sets), s.epochs) for s in specs] == [({"base"}, 1.0)] + [(s, epochs[k]) for s, k in EXPECTED[variant]]
  corpus = pit_data.corpus_for(cfg.data)
  data = pit_train.build_schedule(cfg, corpus, BYTE)
  sets = pit_data.example_sets(corpus, BYTE, answer_weight=float(cfg.data.answer_weight))
  step = 0
  for spec, phase in zip(specs, data.phases):
    assert phase.name == spec.name
    # every example of the phase's sets is in its rows, and nothing else: the trained tokens add up
    assert phase.rows["loss_mask"].sum() == pytest.approx(sum(w[1:].sum() for n in spec.sets for _, w in sets[n]))
    assert phase.steps == int(np.ceil(phase.num_rows * spec.epochs / 4))
    for s in (step, step + phase.steps - 1):  # the phase's first and last step draw its own rows
      batch = data.train_batch(s * 4)
      phase_rows = {r.tobytes() for r in phase.rows["inputs"]}
      assert all(r.tobytes() in phase_rows for r in batch["inputs"])
    step += phase.steps
  assert data.total_steps == step


def test_each_later_phase_replays_base_examples_in_proportion_to_its_own():
  cfg = small_config("pit_qa_then_docs")
  cfg.data.replay = 0.5
  corpus = pit_data.corpus_for(cfg.data)
  data = pit_train.build_schedule(cfg, corpus, BYTE)
  sets = pit_data.example_sets(corpus, BYTE, answer_weight=1.0)
  count = lambda rows: int(rows["segment_ids"].max(axis=1).sum())  # examples packed in the rows
  specs = pit_data.phase_specs("pit_qa_then_docs", cfg.data)
  assert count(data.phases[0].rows) == len(sets["base"])
  for spec, phase in zip(specs[1:], data.phases[1:]):
    own = sum(len(sets[n]) for n in spec.sets)
    assert count(phase.rows) == own + int(np.ceil(0.5 * own))
