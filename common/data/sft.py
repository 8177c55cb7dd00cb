"""Supervised fine-tuning data: instruction examples, tokenised with a loss mask on response tokens only, and
packed whole into rows whose segments never attend to each other.

Examples are `{"prompt", "response"}` or `{"messages": [{"role", "content"}, ...]}` (assistant turns are the
responses), from a jsonl file (`data.sft_path`) or generated here (`generate_examples`). The loss covers the
response tokens and the end-of-turn / end-of-sequence token after each, as in instruction tuning (Ouyang et al.
2022, section 3.5; Touvron et al. 2023, section 3.1: "we zero-out the loss on tokens from the user prompt").
Batches have the keys of `common.data.LMData` and are a pure function of (seed, position), so the common loop
trains them, resumes them and the dense LM's `next_token_loss` applies unchanged.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from typing import Iterable, Iterator, Mapping, Sequence

import ml_collections
import numpy as np

from common.data import DataError
from common.data.epochs import EpochOrder
from common.data.jsonl import jsonl_objects
from common.tokenizers import Llama3Tokenizer, Tokenizer

OVERLONG_POLICIES = ("error", "truncate")
_ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
_WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "maple", "ocean", "falcon", "violet",
          "copper", "garden", "silver", "rocket", "meadow")


def default_sft_data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      sft_path="",            # jsonl of {prompt, response} or {messages}; '' = generated examples
      eval_path="",           # held-out jsonl; '' = hold out eval_fraction of the training examples
      eval_fraction=0.05,
      num_examples=4000,      # generated examples (sft_path '')
      example_seed=0,
      tokenizer="byte",       # used when model.init_from is '' or its hub entry has no tokenizer
      tokenizer_path="",
      seq_len=128,
      overlong="error",       # an example longer than seq_len: 'error' or 'truncate' (counted)
  ))


def generate_examples(n: int, seed: int) -> list[dict[str, str]]:
  """`n` instruction examples of four kinds (addition, string reversal, copying, sorting words), a pure
  function of `seed`: the offline default that small models can learn in minutes."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    kind = int(rng.integers(4))
    words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(2, 5)), replace=False)]
    if kind == 0:
      a, b = (int(x) for x in rng.integers(0, 500, size=2))
      out.append({"prompt": f"Add: {a}+{b}\nAnswer: ", "response": str(a + b)})
    elif kind == 1:
      out.append({"prompt": f"Reverse: {words[0]}\nAnswer: ", "response": words[0][::-1]})
    elif kind == 2:
      text = " ".join(words)
      out.append({"prompt": f"Copy: {text}\nAnswer: ", "response": text})
    else:
      out.append({"prompt": f"Sort: {' '.join(words)}\nAnswer: ", "response": " ".join(sorted(words))})
  return out


def read_jsonl(path: str, key: str) -> list[dict]:
  """The examples of a jsonl file; a missing file or a bad line is a DataError naming `key` and the line."""
  error = lambda message: DataError(f"config key '{key}': {message}")
  path = os.path.expanduser(path)
  examples = [_checked(row, f"{path}:{number}", key) for number, row in jsonl_objects(path, error)]
  if not examples:
    raise DataError(f"config key '{key}': '{path}' holds no examples")
  return examples


def _checked(example, where: str, key: str) -> dict:
  if isinstance(example, dict) and isinstance(example.get("prompt"), str) and isinstance(example.get("response"), str):
    return example
  messages = example.get("messages") if isinstance(example, dict) else None
  if isinstance(messages, list) and messages and all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
    return example
  raise DataError(f"config key '{key}': {where} needs string 'prompt' and 'response', or 'messages' "
                  "[{'role', 'content'}, ...]")


def _as_messages(example: Mapping) -> list[dict[str, str]]:
  if "messages" in example:
    return list(example["messages"])
  return [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["response"]}]


def tokenize_example(example: Mapping, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(ids [n], trained [n] bool). Llama 3 tokenizers use their chat format (headers untrained; an assistant
  turn's content and <|eot_id|> trained). Others: a prompt/response pair is the prompt text then the response
  and EOS; a dialog renders each message as 'role: ' (untrained), its content and EOS (trained if it is the
  assistant's)."""
  ids: list[int] = []
  trained: list[bool] = []

  def add(piece: Sequence[int], train: bool) -> None:
    ids.extend(piece)
    trained.extend([train] * len(piece))

  if isinstance(tokenizer, Llama3Tokenizer):
    add([tokenizer.bos_id], False)
    for message in _as_messages(example):
      turn = tokenizer.encode_chat([message], add_generation_prompt=False)[1:]  # header, content, eot
      header = len(tokenizer.encode_chat([{"role": message["role"], "content": ""}], add_generation_prompt=False)) - 2
      add(turn[:header], False)
      add(turn[header:], message["role"] == "assistant")
  elif "messages" in example:
    if tokenizer.bos_id is not None:
      add([tokenizer.bos_id], False)
    for message in example["messages"]:
      add(tokenizer.encode(f"{message['role']}: "), False)
      add(tokenizer.encode(message["content"], eos=True), message["role"] == "assistant")
  else:
    add(tokenizer.encode(example["prompt"], bos=tokenizer.bos_id is not None), False)
    add(tokenizer.encode(example["response"], eos=True), True)
  return np.asarray(ids, np.int32), np.asarray(trained, bool)


def generation_prompt(example: Mapping, tokenizer: Tokenizer) -> list[int]:
  """The ids a model fine-tuned by `tokenize_example` is prompted with: `{"prompt"}` or the dialog so far
  (`{"messages"}`, without the reply to generate), rendered exactly as training renders it, up to where the
  trained assistant tokens begin (Llama 3: an open assistant header; others: 'assistant: ' after the turns, or
  the prompt text itself)."""
  if isinstance(tokenizer, Llama3Tokenizer):
    return tokenizer.encode_chat(example["messages"] if "messages" in example else
                                 [{"role": "user", "content": example["prompt"]}], add_generation_prompt=True)
  if "messages" not in example:
    return tokenizer.encode(example["prompt"], bos=tokenizer.bos_id is not None)
  ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
  for message in example["messages"]:
    ids += tokenizer.encode(f"{message['role']}: ") + tokenizer.encode(message["content"], eos=True)
  return ids + tokenizer.encode("assistant: ")


def pack_examples(examples: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int, *,
                  overlong: str = "error") -> tuple[dict[str, np.ndarray], int]:
  """First-fit packing of whole examples into [rows, seq_len] arrays; returns (rows, number truncated).

  An example of n tokens takes n - 1 positions: inputs ids[:-1], targets ids[1:], loss_mask trained[1:].
  segment_ids are 1, 2, ... within a row (0 on padding) and positions restart at 0 in each example, so with
  the segment mask of `common.nn.attention` packed examples never see each other. An example is never split:
  one longer than seq_len + 1 tokens is a DataError (`overlong='error'`) or cut to fit (`'truncate'`, counted);
  one left without a trained target is dropped."""
  if overlong not in OVERLONG_POLICIES:
    raise DataError(f"config key 'data.overlong': must be one of {OVERLONG_POLICIES}, got '{overlong}'")
  placed: list[list[tuple[np.ndarray, np.ndarray]]] = []
  free: list[int] = []
  truncated = 0
  for index, (ids, trained) in enumerate(examples):
    if len(ids) - 1 > seq_len:
      if overlong == "error":
        raise DataError(f"config key 'data.seq_len': example {index} has {len(ids) - 1} positions, more than "
                        f"{seq_len} (raise data.seq_len or set data.overlong='truncate')")
      ids, trained = ids[:seq_len + 1], trained[:seq_len + 1]
      truncated += 1
    if len(ids) < 2 or not trained[1:].any():
      continue
    need = len(ids) - 1
    row = next((r for r, room in enumerate(free) if room >= need), None)
    if row is None:
      placed.append([])
      free.append(seq_len)
      row = len(placed) - 1
    placed[row].append((ids, trained))
    free[row] -= need
  arrays = {k: np.zeros((len(placed), seq_len), np.float32 if k == "loss_mask" else np.int32) for k in _ROW_KEYS}
  for r, row_examples in enumerate(placed):
    offset = 0
    for segment, (ids, trained) in enumerate(row_examples, start=1):
      span = slice(offset, offset + len(ids) - 1)
      arrays["inputs"][r, span] = ids[:-1]
      arrays["targets"][r, span] = ids[1:]
      arrays["loss_mask"][r, span] = trained[1:]
      arrays["segment_ids"][r, span] = segment
      arrays["positions"][r, span] = np.arange(len(ids) - 1)
      offset += len(ids) - 1
  return arrays, truncated


def split_examples(examples: list[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
  """(train, eval): an example is held out by a stable hash of its JSON text, so adding examples to a file
  never moves an old one between the splits."""
  train, held_out = [], []
  for example in examples:
    h = zlib.crc32(json.dumps(example, sort_keys=True).encode("utf-8")) / 2**32
    (held_out if h < eval_fraction else train).append(example)
  return train, held_out


class SFTData:
  """Packed SFT rows with the interface of `common.data.LMData`: `train_batch(position)` (each epoch a
  permutation of the rows by rng((seed, epoch))) and `eval_batches(n)` (held-out rows in order)."""

  def __init__(self, train_rows: dict[str, np.ndarray], eval_rows: dict[str, np.ndarray], *, batch_size: int,
               seed: int, truncated: int = 0):
    self.batch_size, self.seed, self.truncated = int(batch_size), int(seed), int(truncated)
    self._train, self._eval = train_rows, eval_rows
    self.num_train_rows = int(train_rows["targets"].shape[0])
    self.num_eval_rows = int(eval_rows["targets"].shape[0])
    self.seq_len = int(train_rows["targets"].shape[1])
    if self.num_train_rows == 0:
      raise DataError("config key 'data.sft_path': no training example left after the eval split")
    self._order = EpochOrder(self.num_train_rows, self.seed)

  def train_batch(self, position: int) -> dict[str, np.ndarray]:
    rows = self._order.rows_at(position, self.batch_size)
    return {k: v[rows] for k, v in self._train.items()}

  def eval_batches(self, max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Held-out rows in order, the last batch padded with empty rows (loss_mask 0); max_batches <= 0: all."""
    n = math.ceil(self.num_eval_rows / self.batch_size)
    if max_batches > 0:
      n = min(n, max_batches)
    short = n * self.batch_size - self.num_eval_rows
    padded = {k: np.concatenate([v, np.zeros((max(short, 0), self.seq_len), v.dtype)]) for k, v in self._eval.items()}
    for b in range(n):
      yield {k: v[b * self.batch_size:(b + 1) * self.batch_size] for k, v in padded.items()}
