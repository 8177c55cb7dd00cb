"""EASE on generated documents, about a minute on a 2-core CPU.

`--config=ease/configs/tiny.py:variant=ease,level=sentence,pi=0.3,beta=1` (variants: abstractive, the whole
document; lead, the first sentences at model.budget; ease, the learned extractor; level: sentence | token).
Real data: `--config.data.source=jsonl --config.data.path=FILE --config.data.tokenizer=byte` with a longer
`data.doc_len`; a pretrained abstractor: `--config.model.init_from=NAME`, a checkpoint-library entry (its
architecture and tokenizer with it; see ease/README.md)."""
import ml_collections

from common.config import ConfigError, config_args
from common.configs.base import base_config
from ease.model import LEVELS, VARIANTS, model_config


def data_config():
  return ml_collections.ConfigDict(dict(
      source="generated", path="", eval_path="", tfds_name="", tfds_data_dir="", tfds_train_split="train",
      tfds_eval_split="validation", document_key="document", summary_key="summary",
      tokenizer="words", tokenizer_path="",
      doc_len=112, summary_len=32, max_units=12,  # tokens of the document region (bos included), of the summary
      train_docs=20000, eval_docs=256, seed=0,
      min_sents=6, max_sents=10, min_key=2, max_key=3,  # generated documents
      style="cnndm",  # generated: cnndm (key sentences restated) | xsum (key spans in one sentence; ease/data.py)
  ))


def get_config(arg=None):
  a = config_args(arg, dict(variant="ease", level="sentence", pi="0.3", beta="1.0"))
  for key, valid in (("variant", VARIANTS), ("level", LEVELS)):
    if a[key] not in valid:
      raise ConfigError(f"config argument '{key}': unknown value '{a[key]}' (valid: {', '.join(valid)})")
  c = base_config()
  c.model = model_config(a["variant"], a["level"], float(a["pi"]), float(a["beta"]))
  c.data = data_config()
  c.train.update(steps=300, batch_size=16, warmup_steps=30, learning_rate=3e-3)
  c.eval.update(every_steps=100, batches=8)
  c.checkpoint.every_steps = 100
  return c
