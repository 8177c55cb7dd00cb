"""EASE's data as specifications: the CNN/DM-like generator frozen, the XSum-like generator's one-sentence summaries
built from key spans scattered over distractor sentences, and the tfds reader on a dataset prepared on disk with
tfds's own API (offline), with its config errors."""
from __future__ import annotations

import hashlib
import os
import re

import pytest

from common.config import ConfigError, load
from common.train.restore import read_run_config
from ease import data as ease_data
from ease import train
from ease.configs.tiny import data_config

CONFIG = "ease/configs/tiny.py"
# Of the first 5 train and 5 eval documents of data_config() (seed 0), computed before data.style existed.
CNNDM_SHA256 = "fecd755227f92656825f96c36da93e739473a3e4064b9c3466b1669f5a42edf6"


def _digest(d) -> str:
  h = hashlib.sha256()
  for split in ("train", "eval"):
    for ex in ease_data.generated_examples(d, split):
      h.update(repr((ex.sentences, ex.summary, ex.gold)).encode())
  return h.hexdigest()


def test_cnndm_style_is_the_generator_as_it_was():
  d = data_config()
  d.update(train_docs=5, eval_docs=5)
  assert d.style == "cnndm" and _digest(d) == CNNDM_SHA256
  del d["style"]  # a config written before the key existed
  assert _digest(d) == CNNDM_SHA256


def _xsum(count=300, seed=0):
  d = data_config()
  d.update(style="xsum", train_docs=count, seed=seed)
  ease_data.check_data(d)
  return ease_data.generated_examples(d, "train")


def test_xsum_summary_is_one_sentence_of_key_spans_scattered_over_sentences():
  """Every content word of the summary is in a gold sentence (the summary verb: a rephrasing of the event's
  verb there); each gold sentence adds a detail no other one has; the rest of the document never mentions the
  event; and the gold sentences are several times longer than the words the summary needs."""
  function_words = {"the", "in", "with", "."}
  rephrased = {alt: verb for verb, alt, _ in ease_data.RELATIONS.values()}
  objects = {o for _, _, objs in ease_data.RELATIONS.values() for o in objs}
  kept_words = gold_words = 0
  for ex in _xsum():
    assert ease_data.split_sentences(ex.summary) == (ex.summary,) and ex.summary.endswith(" .")
    name, alt, _, obj, *_ = ex.summary.split()
    content = [w for w in ex.summary.split() if w not in function_words]
    gold = [ex.sentences[i].split() for i in ex.gold]
    in_gold = {w for s in gold for w in s}
    assert all(w in in_gold or rephrased.get(w) in in_gold for w in content)
    details = [set(s) & {rephrased.get(w, w) for w in content} - {name, obj} for s in gold]
    assert all(details) and sum(map(len, details)) == len(set().union(*details))
    assert len(ex.gold) == len(content) - 2 and 2 <= len(ex.gold) <= 3  # name, verb, obj + one per extra span
    assert rephrased[alt] in in_gold
    others = [s for i, s in enumerate(ex.sentences) if i not in ex.gold]
    assert not any(w in objects for s in others for w in s.split())
    kept_words += len(content)
    gold_words += sum(map(len, gold))
  assert kept_words / gold_words < 0.25  # the cnndm style's summaries need 0.44 of their gold sentences' words


def test_xsum_generator_is_a_function_of_the_seed():
  assert _xsum(20) == _xsum(20) != _xsum(20, seed=1)


def test_style_errors_name_the_key():
  d = data_config()
  d.style = "news"
  with pytest.raises(ConfigError, match="data.style.*'news'.*cnndm, xsum"):
    ease_data.check_data(d)
  d.update(style="xsum", max_key=5, min_sents=6)
  with pytest.raises(ConfigError, match="data.max_key"):
    ease_data.check_data(d)


# ---------------------------------------------------------------------------------------------- tfds

ARTICLES = {
    "train": [f"Storm {i} reached Malmö. Trains stopped for {i} hours!\nWill it end? Nobody knows." for i in range(5)],
    "validation": ["The council met. It voted no.", "A bridge opened in Lund."] + [f"Day {i}." for i in range(6)],
}
HIGHLIGHTS = {"train": [f"storm {i} stops trains" for i in range(5)],
              "validation": ["council says no", "bridge"] + [f"day {i}" for i in range(6)]}


@pytest.fixture(scope="module")
def news_tfds(tmp_path_factory) -> str:
  """A tiny news dataset prepared with tfds's own API in tfrecord (tfds's default format, the usual one of a
  prepared cnn_dailymail): article / highlights string features, train and validation splits."""
  from common.data._tf import import_tfds  # pylint: disable=g-import-not-at-top
  tfds = import_tfds()
  root = str(tmp_path_factory.mktemp("tfds"))
  tfds.dataset_builders.store_as_tfds_dataset(
      name="ease_tiny_news", version="1.0.0", data_dir=root, disable_shuffling=True,
      features=tfds.features.FeaturesDict({"article": tfds.features.Text(), "highlights": tfds.features.Text()}),
      split_datasets={split: list(enumerate(dict(article=a, highlights=h)
                                            for a, h in zip(ARTICLES[split], HIGHLIGHTS[split])))
                      for split in ARTICLES})
  return root


def _tfds_data(root, **changes):
  d = data_config()
  d.update(source="tfds", tfds_name="ease_tiny_news", tfds_data_dir=root, document_key="article",
           summary_key="highlights", train_docs=20, eval_docs=20)
  d.update(changes)
  return d


def test_tfds_reader_reads_the_prepared_documents_and_summaries(news_tfds):
  d = _tfds_data(news_tfds)
  for split, name in (("train", "train"), ("eval", "validation")):
    got = ease_data.examples_for(d, split)
    assert [ex.summary for ex in got] == HIGHLIGHTS[name]
    assert [ex.sentences for ex in got] == [tuple(re.split(r"(?<=[.!?])\s+", a)) for a in ARTICLES[name]]
    assert all(ex.gold == () for ex in got)
  assert got[0].sentences == ("The council met.", "It voted no.")
  assert ease_data.examples_for(d, "train")[0].sentences[0] == "Storm 0 reached Malmö."
  d.train_docs = 3  # the first data.train_docs documents
  assert [ex.summary for ex in ease_data.examples_for(d, "train")] == HIGHLIGHTS["train"][:3]


@pytest.mark.parametrize("changes, key", [
    (dict(tfds_eval_split="test"), r"data.tfds_eval_split': 'test' is not a split .* train, validation"),
    (dict(tfds_train_split="training"), r"data.tfds_train_split': 'training'"),
    (dict(document_key="document"), r"data.document_key': 'document' is not a feature .* article, highlights"),
    (dict(summary_key="summary"), r"data.summary_key': 'summary'"),
    (dict(tfds_name="ease_no_such_news"), r"data.tfds_name'.*ease_no_such_news"),
    (dict(tfds_data_dir="/nonexistent/ease_tfds"), r"data.tfds_data_dir': '/nonexistent/ease_tfds'"),
])
def test_tfds_reader_errors_are_one_line_naming_the_key(news_tfds, changes, key):
  split = "train" if "tfds_train_split" in changes else "eval"
  with pytest.raises(ConfigError, match=key) as e:
    ease_data.examples_for(_tfds_data(news_tfds, **changes), split)
  assert "\n" not in str(e.value)


def test_train_on_a_tfds_dataset(news_tfds, tmp_path):
  """`python -m ease.train` in-process, 2 steps on the tfds documents (byte tokenizer); a wrong split is refused
  before the workdir is made."""
  flags = [f"--config={CONFIG}:variant=ease,level=sentence", "--config.data.source=tfds",
           "--config.data.tfds_name=ease_tiny_news", f"--config.data.tfds_data_dir={news_tfds}",
           "--config.data.document_key=article", "--config.data.summary_key=highlights",
           "--config.data.tokenizer=byte", "--config.data.doc_len=64", "--config.data.summary_len=24",
           "--config.data.max_units=4", "--config.data.eval_docs=8", "--config.model.d_model=32",
           "--config.model.n_heads=2", "--config.model.d_ff=64", "--config.model.n_layers=1",
           "--config.train.steps=2", "--config.train.batch_size=8", "--config.eval.every_steps=2",
           "--config.eval.batches=1", "--config.checkpoint.every_steps=2", "--config.log.progress=lines"]
  bad = tmp_path / "bad"
  with pytest.raises(ConfigError, match="data.tfds_eval_split"):
    train.main([*flags, f"--workdir={bad}", "--config.data.tfds_eval_split=test"])
  assert not bad.exists()
  workdir = str(tmp_path / "run")
  assert train.main([*flags, f"--workdir={workdir}"]) == 0
  data = train.data_for(read_run_config(workdir, "--workdir"))
  assert [ex.summary for ex in data.examples["train"]] == HIGHLIGHTS["train"]
  assert [ex.summary for ex in data.examples["eval"]] == HIGHLIGHTS["validation"]
  rows = data.rows["train"]
  assert data.tokenizer.decode(rows["inputs"][0][rows["doc_mask"][0]]).startswith("Storm 0 reached Malmö. Trains")
  assert os.path.exists(os.path.join(workdir, "metrics.jsonl"))
