"""Evaluation data of the study: perplexity by domain and generated multiple-choice priming tasks.

Domains (Artetxe et al. 2021, sec. 4.1, report in-domain and out-of-domain perplexity): the trainer's corpus
is the standard library, mostly Python source. In-domain: the held-out (validation-split) `.py` files.
Out-of-domain: `prose`, the English documentation topics of `pydoc_data.topics` (prose, not code; the file
holding them is code-wrapped, and may sit in the training split, which `domain_documents` reports), and
`user`, any text files named by a glob (another language's text, your own files).

Priming (sec. 5, zero- and few-shot): templated code questions with one right and three wrong
continuations, scored by the log-likelihood of each continuation given the prompt (and n solved examples
before it for n-shot).
"""
from __future__ import annotations

import glob
import os
import random

import numpy as np

from common.data.corpus import hash_score, list_documents, read_text

BYTE_OFFSET, EOS_ID = 3, 1  # seqio.ByteVocabulary: ids 0-2 are pad, eos, unk; byte b is b + 3


def encode(text: str) -> list[int]:
  return [b + BYTE_OFFSET for b in text.encode("utf-8")]


def domain_documents(data_cfg, user_glob: str = "") -> dict[str, list[str]]:
  """{domain: texts}: 'python' (validation .py files), 'prose' (pydoc topics), 'user' (if a glob is given)."""
  root, rels = list_documents(data_cfg, "validation")
  out = {"python": [read_text(os.path.join(root, r)) for r in rels if r.endswith(".py")]}
  try:
    from pydoc_data import topics
    out["prose"] = [topics.topics[k] for k in sorted(topics.topics)]
  except ImportError:
    pass
  if user_glob:
    out["user"] = [read_text(p) for p in sorted(glob.glob(os.path.expanduser(user_glob), recursive=True))
                   if os.path.isfile(p)]
  return {k: v for k, v in out.items() if v}


def prose_seen_in_training(data_cfg) -> bool:
  """Whether pydoc_data/topics.py is in the trainer's train split (then 'prose' is only format-shifted)."""
  return hash_score(os.path.join("pydoc_data", "topics.py")) >= float(data_cfg.validation_fraction)


def lm_rows(texts: list[str], seq_len: int, max_rows: int) -> dict[str, np.ndarray]:
  """Byte texts (each followed by EOS) cut into rows of `seq_len` targets, inputs shifted right, one segment
  per row; the last row padded (loss_mask 0, segment 0: MoE layers route no padding)."""
  stream = []
  for t in texts:
    stream.extend(encode(t) + [EOS_ID])
    if len(stream) >= seq_len * max_rows:
      break
  stream = stream[:seq_len * max_rows]
  n_rows = -(-len(stream) // seq_len)
  targets = np.zeros((n_rows, seq_len), np.int32)
  mask = np.zeros((n_rows, seq_len), np.float32)
  flat = np.asarray(stream, np.int32)
  targets.reshape(-1)[:len(flat)] = flat
  mask.reshape(-1)[:len(flat)] = 1.0
  inputs = np.concatenate([np.zeros((n_rows, 1), np.int32), targets[:, :-1]], axis=1)
  return dict(inputs=inputs, targets=targets, loss_mask=mask, segment_ids=(mask > 0).astype(np.int32),
              positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), targets.shape).copy())


# ------------------------------------------------------------------------------------------ priming tasks

def _bracket(r: random.Random):
  pairs = {"(": ")", "[": "]", "{": "}"}
  opener = r.choice(sorted(pairs))
  items = ", ".join(str(r.randint(0, 99)) for _ in range(r.randint(1, 4)))
  name = r.choice(["x", "values", "items", "data"])
  prompt = f"{name} = {opener}{items}"
  choices = [pairs[opener]] + [c for c in (")", "]", "}", ">") if c != pairs[opener]][:3]
  return prompt, choices


def _sum(r: random.Random):
  a, b = r.randint(1, 9), r.randint(1, 9)
  wrong = r.sample([v for v in range(2, 19) if v != a + b], 3)
  return f"assert {a} + {b} == ", [str(a + b)] + [str(v) for v in wrong]


def _keyword(r: random.Random):
  name = r.choice(["i", "item", "line", "key"])
  seq = r.choice(["range(10)", "items", "lines", "data.keys()"])
  return f"for {name} ", ["in " + seq + ":", "of " + seq + ":", "to " + seq + ":", "at " + seq + ":"]


def _copy(r: random.Random):
  word = "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
  wrong = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)) for _ in range(3)]
  return f"name = '{word}'\nassert name == '", [word + "'"] + [w + "'" for w in wrong]


TASKS = {"brackets": _bracket, "arithmetic": _sum, "for_loop": _keyword, "copy": _copy}


def priming_examples(task: str, n: int, shots: int, seed: int = 0) -> list[tuple[str, list[str]]]:
  """n questions (prompt with `shots` solved examples before it, choices with the right one first)."""
  r = random.Random(f"{task}-{seed}")
  out = []
  for _ in range(n):
    demos = [TASKS[task](r) for _ in range(shots)]
    prompt, choices = TASKS[task](r)
    context = "".join(p + c[0] + "\n" for p, c in demos)
    out.append((context + prompt, choices))
  return out
