"""Train a SentencePiece BPE model on the embedded corpus (or a user glob), entirely offline.

    python -m common.data.train_tokenizer --out=PATH.model [--vocab_size=4096] [--path=GLOB]
        [--max_bytes=N] [--force]

Ids: pad 0, eos 1, unk 2, no bos: what seqio.SentencePieceVocabulary expects. Text is not normalised
and whitespace is kept (identity rule, no dummy prefix), so code round-trips exactly. Byte fallback
(unseen characters as UTF-8 bytes, so any text round-trips) needs 256 pieces and is therefore only on
for vocab_size >= 512; smaller models map unseen characters to unk.
"""
from __future__ import annotations

import os
import time

from common.cli import ArgumentParser
from common.config import ConfigError, run_main
from common.data import DataError, corpus, default_data_config


def _lines(root: str, rels: list[str]):
  """SentencePiece trains on lines; newlines themselves become a user-defined piece."""
  for rel in rels:
    for line in corpus.read_text(os.path.join(root, rel)).split("\n"):
      if line:
        yield line


def train(out: str, *, vocab_size: int = 4096, path: str = "", max_bytes: int = 0,
          max_lines: int = 2_000_000) -> str:
  """Trains and writes `out` (a .model file, plus the .vocab beside it); returns the model path."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  cfg = default_data_config()
  cfg.source, cfg.path, cfg.max_train_bytes = ("files" if path else "embedded"), path, max_bytes
  root, rels = corpus.list_documents(cfg, "train")
  byte_fallback = vocab_size >= 512
  print(f"training a {vocab_size}-piece BPE model on {len(rels)} files under {root}"
        f" (byte fallback {'on' if byte_fallback else 'off: vocab_size < 512'})", flush=True)
  prefix = out[:-len(".model")] if out.endswith(".model") else out
  if os.path.dirname(prefix):
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
  start = time.time()
  spm.SentencePieceTrainer.train(
      sentence_iterator=_lines(root, rels), model_prefix=prefix, model_type="bpe",
      vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      user_defined_symbols=["\n", "\t"], byte_fallback=byte_fallback,
      character_coverage=0.9995 if byte_fallback else 1.0,
      normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=16384,
      input_sentence_size=max_lines, shuffle_input_sentence=True, num_threads=os.cpu_count() or 1,
      minloglevel=2)
  model = prefix + ".model"
  print(f"wrote {model} ({time.time() - start:.1f}s)", flush=True)
  return model


def main(argv=None) -> int:
  parser = ArgumentParser(prog="python -m common.data.train_tokenizer", description=__doc__)
  parser.add_argument("--out", required=True, help="output model path, ending in .model")
  parser.add_argument("--vocab_size", type=int, default=4096)
  parser.add_argument("--path", default="", help="glob of text files (default: embedded corpus)")
  parser.add_argument("--max_bytes", type=int, default=0, help="train-text budget, 0 = all")
  parser.add_argument("--force", action="store_true", help="overwrite an existing model")
  args = parser.parse_args(argv)
  out = args.out if args.out.endswith(".model") else args.out + ".model"
  if os.path.exists(out) and not args.force:
    raise ConfigError(f"--out={out} already exists (pass --force to overwrite)")
  if args.vocab_size < 16:
    raise ConfigError(f"--vocab_size={args.vocab_size} is too small")
  try:
    train(out, vocab_size=args.vocab_size, path=args.path, max_bytes=args.max_bytes)
  except DataError as e:
    raise ConfigError(str(e).replace("data.path", "--path (data.path)")) from None
  except RuntimeError as e:  # sentencepiece's own argument errors (e.g. vocab too large for the text)
    raise ConfigError(f"sentencepiece: {str(e).splitlines()[0]}") from None
  return 0


if __name__ == "__main__":
  run_main(main)
