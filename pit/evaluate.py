"""The metrics of a trained run (Jiang et al. 2024, sec. 2.3): greedy answers to the held-out test questions
scored by exact match and answer recall (normalised as in SQuAD) and ROUGE-L, closed-book (the question alone)
or open-book (the test document in context, the ceiling); and the perplexity of the test documents, which
the paper sets beside QA accuracy: a document can be well predicted and its facts still not answerable.

`python -m pit.evaluate --workdir=DIR [--open_book] [--max_questions=N]` prints them for one run as JSON.
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

import numpy as np
from flax import nnx

from common.cli import ArgumentParser
from common.config import run_main
from common.eval.text_metrics import exact_match, normalize_answer, rouge_l
from common.generate import generate
from common.models import build_model
from common.scoring import perplexity
from common.tokenizers import Tokenizer
from common.train.restore import load_run_model, read_run_config
from pit import data as pit_data
from pit import train as pit_train

MAX_NEW_TOKENS = 16


def answer_recall(prediction: str, reference: str) -> float:
  """1.0 if the normalised reference occurs in the normalised prediction as a run of whole words."""
  pred, ref = f" {normalize_answer(prediction)} ", f" {normalize_answer(reference)} "
  return float(ref.strip() != "" and ref in pred)


def score_answers(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Mean exact match, answer recall and ROUGE-L (x100, as the paper reports them)."""
  if len(predictions) != len(references) or not references:
    raise ValueError(f"need as many predictions as references (>= 1), got {len(predictions)} and {len(references)}")
  n = len(references)
  return dict(em=100 * sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
              recall=100 * sum(answer_recall(p, r) for p, r in zip(predictions, references)) / n,
              rouge_l=100 * sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n)


def answers(model: nnx.Module, tokenizer: Tokenizer, qas: Sequence[pit_data.QA],
            docs: dict[str, pit_data.Doc] | None = None) -> list[str]:
  """Greedy answers (common.generate), up to EOS; open-book when `docs` maps each title to its document."""
  prompts = [tokenizer.encode(pit_data.qa_prompt(q, docs[q.title] if docs else None)) for q in qas]
  rows = generate(model, prompts, max_new_tokens=MAX_NEW_TOKENS, stop_ids=tokenizer.stop_ids, tokenizer=tokenizer)
  return [tokenizer.decode(row).strip() for row in rows]


def evaluate_run(model: nnx.Module, tokenizer: Tokenizer, corpus: pit_data.Corpus, *, open_book: bool = False,
                 max_questions: int = 0, train_questions: int = 64) -> dict:
  """Closed-book test QA, test-document perplexity, train QA (whether the format was learnt) and, with
  `open_book`, test QA with the document in context."""
  test_qa = list(corpus.test_qa[:max_questions] if max_questions > 0 else corpus.test_qa)
  refs = [q.answer for q in test_qa]
  predictions = answers(model, tokenizer, test_qa)
  out = {f"closed/{k}": v for k, v in score_answers(predictions, refs).items()}
  out["examples"] = [dict(question=q.question, answer=q.answer, prediction=p) for q, p in
                     zip(test_qa[:8], predictions[:8])]
  docs = [pit_data.encode_doc(d, tokenizer)[0].tolist() for d in corpus.test_docs]
  out["doc_ppl"] = perplexity(model, docs, vocab_size=tokenizer.vocab_size)
  if train_questions > 0:
    train_qa = list(corpus.train_qa[:train_questions])
    out["train/em"] = score_answers(answers(model, tokenizer, train_qa), [q.answer for q in train_qa])["em"]
  if open_book:
    first_doc = {}
    for d in corpus.test_docs:
      first_doc.setdefault(d.title, d)
    out.update({f"open/{k}": v for k, v in score_answers(answers(model, tokenizer, test_qa, first_doc), refs).items()})
  return out


def main(argv=None) -> int:
  parser = ArgumentParser(prog="python -m pit.evaluate", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a pit.train run")
  parser.add_argument("--open_book", action="store_true", help="also answer with the test document in context")
  parser.add_argument("--max_questions", type=int, default=0, help="test questions scored (0: all)")
  args = parser.parse_args(argv)
  cfg = read_run_config(args.workdir, "--workdir")
  _, tokenizer, corpus = pit_train.schedule_for(cfg)
  model = load_run_model(args.workdir, cfg, lambda: build_model(cfg.model, seed=0), key="--workdir")[0]
  result = evaluate_run(model, tokenizer, corpus, open_book=args.open_book, max_questions=args.max_questions)
  json.dump(result, sys.stdout, indent=1)
  print()
  return 0


if __name__ == "__main__":
  run_main(main)
