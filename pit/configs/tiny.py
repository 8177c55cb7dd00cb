"""A small dense LM trained from scratch on one variant's schedule over the generated world, minutes on a 2-core
CPU: `--config=pit/configs/tiny.py:variant=pit` (variants: pit/data.py `VARIANTS`; `setting=cross_domain`
trains on films, towns and organisations and tests on people). Real data: `--config.data.docs_path=...
--config.data.qa_path=...` with a pretrained base, `--config.model.init_from=NAME` (its tokenizer is used)."""
import ml_collections

from common.config import config_args
from common.configs.base import base_config, dense_model
from common.data import DEFAULT_CACHE_DIR
from pit.data import SETTINGS, VARIANTS


def data_config(variant: str, setting: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      variant=variant,          # pit/data.py VARIANTS
      setting=setting,          # 'in_domain' | 'cross_domain'
      docs_path="",             # Wiki2023 documents jsonl {title, text, split?}; '' = the generated world
      qa_path="",               # Wiki2023 QA jsonl {title, question, answer}
      world_seed=0,             # the generated world (the same for every run of a study)
      old_per_kind=24,          # base entities per kind (the base phase)
      train_entities=96,
      test_entities=48,
      docs_per_entity=2,        # paraphrased documents per train/test entity
      name_rate=1.0,            # a mention after a document's first: the name with this probability, else a pronoun
      base_epochs=8.0,          # passes over each phase's rows, by what the phase holds
      doc_epochs=16.0,
      qa_epochs=8.0,
      answer_weight=3.0,        # it_weighted: loss weight of answer tokens in documents
      replay=0.3,               # base examples mixed into each later phase, per example of the phase
      example_seed=0,           # the order in which each phase's examples are packed
      tokenizer="world",        # 'world': SentencePiece trained on the corpus; or byte | spm | llama3
      tokenizer_path="",
      vocab_size=1024,          # pieces of the world tokenizer
      seq_len=288,              # two QA-then-document sequences fit a row
      overlong="error",
      cache_dir=DEFAULT_CACHE_DIR,
  ))


def get_config(arg=None):
  a = config_args(arg, dict(variant="pit", setting="in_domain"))
  if a["variant"] not in VARIANTS:
    raise ValueError(f"unknown variant '{a['variant']}' (valid: {', '.join(VARIANTS)})")
  if a["setting"] not in SETTINGS:
    raise ValueError(f"unknown setting '{a['setting']}' (valid: {', '.join(SETTINGS)})")
  c = base_config()
  c.model = dense_model(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384)
  c.model.init_from = ""  # a hub checkpoint name; '' = random init
  c.data = data_config(a["variant"], a["setting"])
  # train.steps is replaced by the schedule's length (pit.train.resolve); a constant rate after warmup, so
  # that no phase of a schedule trains at a rate the others do not get.
  c.train.update(steps=1, batch_size=16, learning_rate=1e-3, min_learning_rate_ratio=1.0, warmup_steps=20,
                 weight_decay=0.0)
  c.eval.update(every_steps=100, batches=4)
  c.checkpoint.update(every_steps=100, keep=1)
  return c
