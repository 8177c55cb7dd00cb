"""`python -m blt.robustness --runs=NAME=DIR,NAME=DIR [--n=200] [--seed=0] [--out=runs/blt_robustness]`

Robustness to noised text and character-level probes (Pagnoni et al. 2024, Sec. 6.1, Table 4: noised
HellaSwag and CUTE), in miniature, for the runs of `python -m blt.reproduce` (a dense LM on bytes, the same on
BPE tokens, BLTs with space or entropy patching), scored by log-likelihood on the same held-out text.

Noise, per character of a str (unicode code points, so the UTF-8 stays valid; each noiser a pure function of
(text, rate, seed) through a numpy Generator), each character drawn independently with probability `rate`:
  swap    the character trades places with the next one (pairs never overlap: a typo's transposition),
  delete  the character is dropped,
  case    a cased character flips case (those whose flip is not one character, such as 'ß', stay),
  repeat  the character is written 2 to 4 times.
Default rates (`NOISES`) follow the paper's noised HellaSwag: Drop 10%, RandomCase 50% (random case for every
character there; here half the cased characters flip, about the same text), Repeat 20% up to four times;
swap (10%) is not in the paper, a typing error between drop and repeat.

Probes, `n` of each, from the held-out documents of the runs' `data.*` (the validation split that their eval
bpb is measured on), deterministic in the seed:
  continuation  (the paper's noised-HellaSwag design) a context of held-out text, then 4 candidates: the true
                next `CONTINUATION_CHARS` characters and 3 of the same length from elsewhere in the held-out
                text; the split falls before a space between words, so every candidate is ' word...'. The
                model picks the candidate of highest total log-likelihood, with the context clean and noised by
                each noiser (the candidates stay clean); also the bits per byte of the true continuation;
  spelling      a held-out word (4 to 12 ASCII letters) in its real context, against 3 one-character
                corruptions of it (a letter substituted or two adjacent letters swapped; never a word of the
                held-out text), each followed by the character after the word;
  counting      'Count "s" in "class": 2' as 3 in-context examples, then the query; candidates 1, 2, 3, with
                each answer a third of the queries (so a model that always says one number scores chance);
  substitution  'Replace "a" with "o" in "cat": cot' as 3 examples, then the query (x with y); candidates x -> y
                (the answer), x2 -> y, x -> z, x2 -> z for another letter x2 of the word and a letter z not in
                it, so that neither knowing which letter to replace nor copying y alone beats chance.
Accuracy is reported beside chance (`CHANCE`). Spelling, scored this way, asks only whether the real word is
likelier than its typos, which a small LM learns from word frequency alone. Counting and substitution need
characters handled in context: the models that `blt.reproduce` trains in minutes are far too small for that,
so expect chance there (or a bias below it); the continuation probe, its bits per byte and their drop under
noise are where small models differ.

Scoring (`Scorer`, `load_scorer`, `continuation_logprobs`): the continuation's total log-likelihood given the
context, read off one forward pass over BOS + context + continuation (a BOS opens every packed training row,
also rows that start inside a document), under the full softmax the run trained with. Every row fits the
run's training row (`data.seq_len` positions): a longer context loses its oldest characters (bytes or tokens).
- dense LM (`common.scoring.score_continuations`) on bytes: one id per byte;
- dense LM on BPE: context + continuation are tokenised once, and a token is the continuation's when it covers
  any of the continuation's bytes. A token straddling the boundary is thus scored with the continuation, so
  that no continuation byte is ever read as context (its score then includes the straddled context bytes).
  The probes split before a space, which SentencePiece (splitting at whitespace) never joins to the preceding
  character, so no token straddles them (on the reproduce BPE vocabulary, every probe's split equals the
  context and the continuation tokenised apart);
- BLT: patches from the run's own patcher over the whole row (`blt.patcher.patch`; entropies of the run's
  entropy model as `blt.data.PatchingData` computes them, BPE starts with the byte after the inputs), then the
  model's logits; BPE patching looks ahead, so there the context's patches may depend on the continuation, as
  in training.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blt.data import BOS, ENTROPY_METHODS, PAD, load_sentencepiece
from blt.entropy import EntropyScorer, load_entropy_model
from blt.generate import PatchRule, load_blt
from blt.patcher import bpe_starts, patch
from common.cli import ArgumentParser
from common.config import ConfigError
from common.data import corpus, with_defaults
from common.generate import StaticGraph, split_for_jit
from common.scaling.intervals import t_interval
from common.scoring import WIDTH_BUCKET, score_continuations
from common.tokenizers import ByteTokenizer

CONTEXT_CHARS = 128  # context before a continuation or a spelled word; rows are cut to the run's seq_len
CONTINUATION_CHARS = 32
N_CANDIDATES = 4
N_SHOTS = 3
WORD_LENGTHS = (4, 12)
MAX_REPEAT = 4  # copies of a repeated character, at most (the paper's Repeat)
CHANCE = {"continuation": 1 / N_CANDIDATES, "spelling": 1 / N_CANDIDATES, "counting": 1 / 3,
          "substitution": 1 / N_CANDIDATES}
CHAR_PROBES = ("spelling", "counting", "substitution")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ------------------------------------------------------------------------------------------------- noise


def _drawn(text: str, rate: float, seed) -> tuple[np.ndarray, np.random.Generator]:
  """(bool [len(text)]: the characters a noiser touches, the generator for any further draws). One uniform
  draw per character, so for one seed a higher rate touches a superset of the characters."""
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"noise rate {rate}: must be within [0, 1]")
  rng = np.random.default_rng(seed)
  return rng.random(len(text)) < rate, rng


def swap_adjacent(text: str, rate: float, seed) -> str:
  """Each drawn character trades places with the next, left to right; a swapped pair is not drawn again."""
  chars, (drawn, _) = list(text), _drawn(text, rate, seed)
  i = 0
  while i < len(chars) - 1:
    if drawn[i]:
      chars[i], chars[i + 1] = chars[i + 1], chars[i]
      i += 1
    i += 1
  return "".join(chars)


def delete_chars(text: str, rate: float, seed) -> str:
  """Drops each drawn character."""
  return "".join(c for c, d in zip(text, _drawn(text, rate, seed)[0]) if not d)


def _flipped(c: str) -> str:
  f = c.swapcase()
  return f if len(f) == 1 and f != c and f.swapcase() == c else c


def flip_case(text: str, rate: float, seed) -> str:
  """Flips the case of each drawn character that has a one-character flip ('a' <-> 'A'; 'ß' stays)."""
  return "".join(_flipped(c) if d else c for c, d in zip(text, _drawn(text, rate, seed)[0]))


def repeat_chars(text: str, rate: float, seed) -> str:
  """Writes each drawn character 2 to MAX_REPEAT times (uniformly)."""
  drawn, rng = _drawn(text, rate, seed)
  copies = rng.integers(2, MAX_REPEAT, size=len(text), endpoint=True)
  return "".join(c * int(k) if d else c for c, d, k in zip(text, drawn, copies))


NOISES = {"swap": (swap_adjacent, 0.1), "delete": (delete_chars, 0.1), "case": (flip_case, 0.5),
          "repeat": (repeat_chars, 0.2)}


# ------------------------------------------------------------------------------------------------ probes


class Item(NamedTuple):
  """One multiple-choice question: the model scores each candidate as the continuation of the context."""
  context: str
  candidates: tuple[str, ...]
  answer: int  # index of the right candidate


def held_out_texts(data_cfg) -> list[str]:
  """The held-out documents of `data.*` (its validation split, as the eval rows of `common.data.LMData`)."""
  data_cfg = with_defaults(data_cfg)
  if data_cfg.source not in ("embedded", "files"):
    raise ConfigError(f"config key 'data.source': the probes read held-out files; '{data_cfg.source}' has none")
  root, rels = corpus.list_documents(data_cfg, "validation")
  return [corpus.read_text(os.path.join(root, rel)) for rel in rels]


def _item(rng: np.random.Generator, context: str, truth: str, others: Sequence[str]) -> Item:
  """The candidates in a random order (ties in the scores then favour no position)."""
  candidates = [truth, *others]
  order = rng.permutation(len(candidates))
  return Item(context, tuple(candidates[i] for i in order), int(np.argmax(order == 0)))


# a single space between two non-space characters: where the probes split text
_SPLIT = re.compile(r"(?<=\S) (?=\S)")
_WORD = re.compile(r"(?<![A-Za-z0-9_])[A-Za-z]+(?![A-Za-z0-9_])")


def continuation_items(texts: Sequence[str], n: int, seed: int, *, context_chars: int = CONTEXT_CHARS,
                       continuation_chars: int = CONTINUATION_CHARS) -> list[Item]:
  """`n` contexts of `context_chars` held-out characters, each with its true next `continuation_chars`
  characters and N_CANDIDATES - 1 others that start at other splits (not within the item's own window)."""
  splits = [(d, m.start()) for d, text in enumerate(texts) for m in _SPLIT.finditer(text)
            if context_chars <= m.start() <= len(text) - continuation_chars]
  if len(splits) < n + N_CANDIDATES:
    raise ValueError(f"the held-out text has {len(splits)} places for a continuation probe; {n} need more")
  rng = np.random.default_rng([seed, 0])
  window = context_chars + continuation_chars
  items = []
  for d, s in (splits[i] for i in rng.permutation(len(splits))[:n]):
    truth = texts[d][s:s + continuation_chars]
    others: list[str] = []
    for _ in range(1000):
      d2, s2 = splits[int(rng.integers(len(splits)))]
      other = texts[d2][s2:s2 + continuation_chars]
      if (d2 != d or abs(s2 - s) >= window) and other != truth and other not in others:
        others.append(other)
      if len(others) == N_CANDIDATES - 1:
        break
    else:
      raise ValueError("the held-out text repeats itself too much for distinct continuation candidates")
    items.append(_item(rng, texts[d][s - context_chars:s], truth, others))
  return items


def _vocabulary(texts: Sequence[str]) -> set[str]:
  return {m.group().lower() for text in texts for m in _WORD.finditer(text)}


def _corruption(rng: np.random.Generator, word: str) -> str:
  """The word with one letter substituted (same case) or two adjacent letters swapped."""
  i = int(rng.integers(len(word)))
  if rng.random() < 0.5 and i + 1 < len(word):
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]
  letter = LETTERS[int(rng.integers(len(LETTERS)))]
  return word[:i] + (letter.upper() if word[i].isupper() else letter) + word[i + 1:]


def spelling_items(texts: Sequence[str], n: int, seed: int, *, context_chars: int = CONTEXT_CHARS) -> list[Item]:
  """`n` held-out words in their context (`context_chars` before the space that precedes them), each against
  N_CANDIDATES - 1 one-character corruptions that are not words of the held-out text."""
  lo, hi = WORD_LENGTHS
  places = [(d, m.start()) for d, text in enumerate(texts) for m in _WORD.finditer(text)
            if lo <= len(m.group()) <= hi and m.start() > context_chars and m.end() < len(text)
            and text[m.start() - 1] == " " and not text[m.start() - 2].isspace()]
  if len(places) < n:
    raise ValueError(f"the held-out text has {len(places)} words for the spelling probe; {n} asked")
  vocabulary = _vocabulary(texts)
  rng = np.random.default_rng([seed, 1])
  items = []
  for d, start in (places[i] for i in rng.permutation(len(places))):
    if len(items) == n:
      break
    text = texts[d]
    word = _WORD.match(text, start).group()
    after = text[start + len(word)]
    corrupted: list[str] = []
    for _ in range(100):
      c = _corruption(rng, word)
      if c != word and c.lower() not in vocabulary and c not in corrupted:
        corrupted.append(c)
      if len(corrupted) == N_CANDIDATES - 1:
        items.append(_item(rng, text[start - 1 - context_chars:start - 1], f" {word}{after}",
                           [f" {c}{after}" for c in corrupted]))
        break
  if len(items) < n:
    raise ValueError(f"the held-out text gave {len(items)} spelling items; {n} asked")
  return items


def _words(texts: Sequence[str]) -> list[str]:
  """Distinct lowercase held-out words of WORD_LENGTHS letters, sorted (for determinism)."""
  lo, hi = WORD_LENGTHS
  return sorted({m.group() for text in texts for m in _WORD.finditer(text)
                 if m.group().islower() and lo <= len(m.group()) <= hi})


def counting_items(texts: Sequence[str], n: int, seed: int) -> list[Item]:
  """Few-shot letter counting: N_SHOTS examples (counts 1, 2, 3 in a random order), then a query whose
  answer is 1, 2 or 3 in turn; candidates ' 1\\n', ' 2\\n', ' 3\\n'."""
  pools = {c: [(w, x) for w in _words(texts) for x in sorted(set(w)) if w.count(x) == c] for c in (1, 2, 3)}
  if any(len({w for w, _ in p}) < 2 for p in pools.values()):
    raise ValueError("the held-out text has too few words with a letter once, twice and three times to count")
  rng = np.random.default_rng([seed, 2])
  line = lambda w, x: f'Count "{x}" in "{w}":'
  items = []
  for i in range(n):
    count = 1 + i % 3
    word, letter = pools[count][int(rng.integers(len(pools[count])))]
    shots = []
    for c in rng.permutation([1, 2, 3]):
      w, x = word, letter
      while w == word:
        w, x = pools[int(c)][int(rng.integers(len(pools[int(c)])))]
      shots.append(f"{line(w, x)} {int(c)}\n")
    items.append(Item("".join(shots) + line(word, letter), (" 1\n", " 2\n", " 3\n"), count - 1))
  return items


def _substitution(rng: np.random.Generator, words: Sequence[str]) -> tuple[str, str, str, list[str]] | None:
  """(word, x, y, [x -> y, x2 -> y, x -> z, x2 -> z]), or None where a word lacks two letters or two absent."""
  word = words[int(rng.integers(len(words)))]
  present = sorted(set(word))
  absent = [c for c in LETTERS if c not in word]
  if len(present) < 2 or len(absent) < 2:
    return None
  x, x2 = rng.choice(present, 2, replace=False)
  y, z = rng.choice(absent, 2, replace=False)
  return str(word), str(x), str(y), [word.replace(x, y), word.replace(x2, y), word.replace(x, z), word.replace(x2, z)]


def substitution_items(texts: Sequence[str], n: int, seed: int) -> list[Item]:
  """Few-shot letter substitution: N_SHOTS solved examples, then a query; candidates the answer and the three
  other pairings of (the letter or another of the word) with (the replacement or another letter)."""
  words = _words(texts)
  if len(words) < N_SHOTS + 1:
    raise ValueError(f"the held-out text has {len(words)} words for the substitution probe")
  rng = np.random.default_rng([seed, 3])
  line = lambda w, x, y: f'Replace "{x}" with "{y}" in "{w}":'

  def draw(exclude: set[str]):
    for _ in range(1000):
      drawn = _substitution(rng, words)
      if drawn is not None and drawn[0] not in exclude:
        return drawn
    raise ValueError("the held-out words give too few letter substitutions")

  items = []
  for _ in range(n):
    word, x, y, candidates = draw(set())
    shots, used = [], {word}
    for _ in range(N_SHOTS):
      w, a, b, c = draw(used)
      used.add(w)
      shots.append(f"{line(w, a, b)} {c[0]}\n")
    items.append(_item(rng, "".join(shots) + line(word, x, y), f" {candidates[0]}\n",
                       [f" {c}\n" for c in candidates[1:]]))
  return items


def build_probes(texts: Sequence[str], n: int, seed: int) -> dict[str, list[Item]]:
  return {"continuation": continuation_items(texts, n, seed), "spelling": spelling_items(texts, n, seed),
          "counting": counting_items(texts, n, seed), "substitution": substitution_items(texts, n, seed)}


def noised(items: Sequence[Item], noise: str, seed: int, rate: float | None = None) -> list[Item]:
  """The items with each context noised by NOISES[noise] (its rate unless given), item i with seed
  (seed, 10 + noise index, i), apart from the probes' streams: the same items, seed and rate give the same
  text."""
  fn, default = NOISES[noise]
  k = list(NOISES).index(noise)
  return [it._replace(context=fn(it.context, default if rate is None else rate, [seed, 10 + k, i]))
          for i, it in enumerate(items)]


# ----------------------------------------------------------------------------------------------- scoring


class Scorer:
  """log p(continuation | context) in nats, f64 [pairs], of text pairs under one run's model."""

  def __call__(self, contexts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
    raise NotImplementedError


def _fit(context: list[int], continuation: list[int], row_len: int) -> list[int]:
  """The context's last ids such that BOS + context + continuation, less its last id, fits `row_len`."""
  keep = row_len - len(continuation)
  if keep < 0:
    raise ValueError(f"a continuation of {len(continuation)} ids does not fit rows of {row_len}")
  return context[len(context) - min(keep, len(context)):]


def bpe_split(sentencepiece_processor, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) of context + continuation tokenised once: a token belongs to the
  continuation when it covers any of its bytes (a straddling token is the continuation's)."""
  boundary = len(context.encode("utf-8"))
  pieces = sentencepiece_processor.encode(context + continuation, out_type="proto").pieces
  ids = [p.id for p in pieces]
  k = sum(1 for p in pieces if p.end <= boundary)  # piece ends do not decrease: a prefix
  return ids[:k], ids[k:]


class DenseScorer(Scorer):
  """A dense LM (`common.models.DenseLM`) on bytes, or on the SentencePiece model given."""

  def __init__(self, model: nnx.Module, *, row_len: int, sentencepiece_processor=None, batch_size: int = 16):
    self.model, self.row_len, self.sp, self.batch_size = model, row_len, sentencepiece_processor, batch_size
    self.bytes = ByteTokenizer()

  def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    if self.sp is not None:
      return bpe_split(self.sp, context, continuation)
    return self.bytes.encode(context), self.bytes.encode(continuation)

  def __call__(self, contexts, continuations):
    pairs = [self.split(c, x) for c, x in zip(contexts, continuations, strict=True)]
    prompts = [[0, *_fit(c, x, self.row_len)] for c, x in pairs]  # 0: the BOS of the packed rows
    scored = score_continuations(self.model, prompts, [x for _, x in pairs], batch_size=self.batch_size)
    return np.array([s.logprob for s in scored], np.float64)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _blt_target_logprobs(graph: StaticGraph, rule: PatchRule, state, inputs, targets, positions, segment_ids,
                         entropies, patch_starts):
  """log p(targets[:, t] | inputs[:, :t+1]) f32 [batch, width] of a BLT, patched by `rule`."""
  model = nnx.merge(graph.graphdef, state)
  width = inputs.shape[1]  # a patch slot per byte: never too few, and empty slots are read by no byte
  patches = patch(inputs, method=rule.method, max_patches=width, patch_size=rule.patch_size, entropies=entropies,
                  threshold=rule.threshold, max_patch_length=rule.max_patch_length, patch_starts=patch_starts,
                  segment_ids=segment_ids, positions=positions)
  logits = model(inputs, patches.patch_ids, width, positions, segment_ids, patches.next_patch_ids)
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]


class BLTScorer(Scorer):
  """A BLT (`blt.model.BLT`) with its patcher: `patching` is the run's `model.patching`; entropy patching
  needs `entropy_model`, BPE patching `sentencepiece_processor`."""

  def __init__(self, model: nnx.Module, patching, *, row_len: int, entropy_model: nnx.Module | None = None,
               sentencepiece_processor=None, batch_size: int = 16):
    # PatchRule's fields as static jit arguments, built directly: scoring may look ahead (bpe), generation not
    self.rule = PatchRule(patching.method, int(patching.patch_size), float(patching.get("threshold", 0.0)),
                          int(patching.get("max_patch_length", 0)), bool(patching.get("reset_at_newline", False)))
    if self.rule.method in ENTROPY_METHODS and entropy_model is None:
      raise ConfigError(f"config key 'model.patching.entropy_model': '{self.rule.method}' patching needs one")
    if self.rule.method == "bpe" and sentencepiece_processor is None:
      raise ConfigError("config key 'model.patching.spm_model': 'bpe' patching needs a SentencePiece model")
    self.graph, self.state = split_for_jit(model, None)
    self.entropy = (EntropyScorer(entropy_model, reset_at_newline=self.rule.reset_at_newline)
                    if self.rule.method in ENTROPY_METHODS else None)
    self.sp = sentencepiece_processor if self.rule.method == "bpe" else None
    self.row_len, self.batch_size = row_len, batch_size

  def __call__(self, contexts, continuations):
    rows, n_scored = [], []
    for context, continuation in zip(contexts, continuations, strict=True):
      x = list(continuation.encode("utf-8"))
      rows.append([BOS, *_fit(list(context.encode("utf-8")), x, self.row_len), *x])
      n_scored.append(len(x))
    out = np.zeros(len(rows), np.float64)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      width = -(-max(len(rows[i]) - 1 for i in chunk) // WIDTH_BUCKET) * WIDTH_BUCKET
      ids = np.full((self.batch_size, width + 1), PAD, np.int32)  # every batch the same rows: one compile a width
      segment_ids = np.zeros((self.batch_size, width + 1), np.int32)
      for r, i in enumerate(chunk):
        ids[r, :len(rows[i])], segment_ids[r, :len(rows[i])] = rows[i], 1
      positions = np.where(segment_ids > 0, np.arange(width + 1), 0).astype(np.int32)
      inputs, seg, pos = ids[:, :-1], segment_ids[:, :-1], positions[:, :-1]
      entropies = None if self.entropy is None else jnp.asarray(self.entropy(inputs, pos, seg))
      starts = None if self.sp is None else jnp.asarray(bpe_starts(ids, segment_ids, self.sp))
      logprobs = np.asarray(_blt_target_logprobs(self.graph, self.rule, self.state, jnp.asarray(inputs),
                                                 jnp.asarray(ids[:, 1:]), jnp.asarray(pos), jnp.asarray(seg),
                                                 entropies, starts))
      for r, i in enumerate(chunk):
        n = len(rows[i]) - 1
        out[i] = logprobs[r, n - n_scored[i]:n].sum(dtype=np.float64)
    return out


def load_scorer(run_dir: str, *, batch_size: int = 16) -> tuple[Scorer, dict]:
  """(scorer, description) of a training run: a `blt.train` run (its entropy model or SentencePiece model from
  `model.patching`) or a `common.train` dense LM on `data.vocab` byte or spm."""
  from common.models import build_model
  from common.train.restore import load_run_model, read_run_config
  cfg = read_run_config(run_dir, "--runs")
  row_len = int(cfg.data.seq_len)
  if cfg.model.get("name") == "blt":
    model, cfg = load_blt(run_dir)
    p = cfg.model.patching
    entropy_model = load_entropy_model(p.entropy_model)[0] if p.method in ENTROPY_METHODS else None
    sp = load_sentencepiece(p.spm_model) if p.method == "bpe" else None
    return (BLTScorer(model, p, row_len=row_len, entropy_model=entropy_model, sentencepiece_processor=sp,
                      batch_size=batch_size), dict(kind=f"blt {p.method}", row_len=row_len))
  vocab = cfg.data.get("vocab", "byte")
  if cfg.model.get("name") != "dense_lm" or vocab not in ("byte", "spm") or "tokenizer" in cfg.data:
    raise ConfigError(f"--runs: '{run_dir}' is neither a BLT nor a dense LM on data.vocab byte or spm")
  model, _ = load_run_model(run_dir, cfg, lambda: build_model(cfg.model, seed=0), key="--runs")
  sp = None
  if vocab == "spm":
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    sp = spm.SentencePieceProcessor(model_file=os.path.expanduser(cfg.data.spm_model))
  return (DenseScorer(model, row_len=row_len, sentencepiece_processor=sp, batch_size=batch_size),
          dict(kind=f"dense {vocab}", row_len=row_len))


def continuation_logprobs(run_dir: str, contexts: Sequence[str], continuations: Sequence[str], *,
                          batch_size: int = 16) -> np.ndarray:
  """f64 [len(contexts)]: log p(continuation | context) in nats under the run's newest checkpoint."""
  return load_scorer(run_dir, batch_size=batch_size)[0](contexts, continuations)


# ------------------------------------------------------------------------------------------------ report


def evaluate(scorer: Scorer, items: Sequence[Item]) -> dict:
  """Accuracy (highest total log-likelihood picks) and the bits per byte of the right candidates."""
  contexts = [it.context for it in items for _ in it.candidates]
  candidates = [c for it in items for c in it.candidates]
  scores = scorer(contexts, candidates)
  correct, nats, n_bytes, at = 0, 0.0, 0, 0
  for it in items:
    group = scores[at:at + len(it.candidates)]
    correct += int(np.argmax(group)) == it.answer
    nats -= group[it.answer]
    n_bytes += len(it.candidates[it.answer].encode("utf-8"))
    at += len(it.candidates)
  return dict(accuracy=correct / len(items), bpb=nats / n_bytes / math.log(2), n=len(items))


def score_model(scorer: Scorer, probes: dict[str, list[Item]], seed: int, rates: dict[str, float],
                log=lambda msg: None) -> dict:
  """One model's results: the continuation probe clean and under each noise (accuracy, bpb), the mean drop
  in accuracy, and the character probes' accuracy."""
  out = {"continuation": {}}
  for noise in ("clean", *rates):
    t = time.time()
    items = probes["continuation"] if noise == "clean" else noised(probes["continuation"], noise, seed, rates[noise])
    out["continuation"][noise] = r = evaluate(scorer, items)
    log(f"continuation {noise}: accuracy {r['accuracy']:.3f}, bpb {r['bpb']:.3f} ({time.time() - t:.0f} s)")
  clean = out["continuation"]["clean"]["accuracy"]
  out["mean_drop"] = float(np.mean([clean - out["continuation"][k]["accuracy"] for k in rates])) if rates else 0.0
  for probe in CHAR_PROBES:
    t = time.time()
    out[probe] = r = dict(evaluate(scorer, probes[probe]), chance=CHANCE[probe])
    log(f"{probe}: accuracy {r['accuracy']:.3f} (chance {CHANCE[probe]:.2f}, {time.time() - t:.0f} s)")
  return out


def robustness_report(run_dirs: dict[str, str], *, n: int = 200, seed: int = 0, rates: dict[str, float] | None = None,
                      batch_size: int = 16, log=print) -> dict:
  """Every run scored on the same probes, built from the held-out documents of the first run's `data.*`
  (the reproduce runs share them: one corpus, split and `max_eval_bytes`)."""
  from common.train.restore import read_run_config
  if not run_dirs:
    raise ConfigError("--runs: no run given")
  rates = {k: rate for k, (_, rate) in NOISES.items()} if rates is None else dict(rates)
  unknown = set(rates) - set(NOISES)
  if unknown:
    raise ValueError(f"unknown noise {sorted(unknown)} (known: {', '.join(NOISES)})")
  first = next(iter(run_dirs.values()))
  texts = held_out_texts(read_run_config(first, "--runs").data)
  try:
    probes = build_probes(texts, n, seed)
  except ValueError as e:
    raise ConfigError(f"--n={n}: {e} (data.max_eval_bytes of '{first}' sets the held-out text)") from None
  log(f"probes: {n} of each from {len(texts)} held-out documents ({sum(map(len, texts)):,} characters)")
  models = {}
  for name, run_dir in run_dirs.items():
    scorer, about = load_scorer(run_dir, batch_size=batch_size)
    log(f"{name}: {about['kind']} from {run_dir}")
    models[name] = dict(run_dir=run_dir, **about, **score_model(scorer, probes, seed, rates,
                                                               lambda msg, name=name: log(f"{name}: {msg}")))
  return dict(n=n, seed=seed, rates=rates, chance=CHANCE, context_chars=CONTEXT_CHARS,
              continuation_chars=CONTINUATION_CHARS, held_out=dict(documents=len(texts),
                                                                   characters=sum(map(len, texts))),
              models=models)


def markdown(report: dict) -> str:
  rates, n = report["rates"], report["n"]
  half = 1.96 * math.sqrt(0.25 / n)
  lines = [f"Robustness and character probes (Pagnoni et al. 2024, Sec. 6.1) on held-out text: {n} items a "
           f"probe, seed {report['seed']}; accuracy (95% binomial half-width at most {half:.3f}).", "",
           "| model | kind | clean | " + " | ".join(f"{k} ({rates[k]:g})" for k in rates) + " | mean drop | "
           + " | ".join(f"{p} (chance {report['chance'][p]:.2f})" for p in CHAR_PROBES) + " |",
           "|" + "---|" * (4 + len(rates) + len(CHAR_PROBES))]
  for name, m in report["models"].items():
    c = m["continuation"]
    cells = [name, m["kind"], f"{c['clean']['accuracy']:.3f}", *(f"{c[k]['accuracy']:.3f}" for k in rates),
             f"{m['mean_drop']:+.3f}", *(f"{m[p]['accuracy']:.3f}" for p in CHAR_PROBES)]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Bits per byte of the true continuation given the context, clean and noised:", "",
            "| model | clean | " + " | ".join(rates) + " |", "|" + "---|" * (2 + len(rates))]
  for name, m in report["models"].items():
    c = m["continuation"]
    lines.append("| " + " | ".join([name, *(f"{c[k]['bpb']:.3f}" for k in ("clean", *rates))]) + " |")
  lines += ["", f"Continuation: {N_CANDIDATES} candidates of {report['continuation_chars']} characters after "
            f"{report['context_chars']} characters of context (noised, the candidates clean); mean drop = clean "
            "accuracy minus the mean noised accuracy. The paper (8B models) finds BLT more robust than its BPE "
            "model on noised HellaSwag and far ahead on CUTE. Spelling (the word against its typos) follows word "
            "frequency, which small models learn; counting and substitution need more: expect chance there."]
  return "\n".join(lines) + "\n"


def combine(reports: Sequence[dict]) -> dict:
  """Reports of the same probes (n, seed, rates) on runs of several training seeds, model names alike ->
  {name: {metric: (mean, 95% t half-width)}} over the reports: continuation accuracy and bpb clean and under
  each noise, bpb increase under each noise (noised minus clean, paired within a report), the mean drop in
  accuracy and the character probes' accuracy."""
  first = reports[0]
  for r in reports[1:]:
    if (r["n"], r["seed"], r["rates"]) != (first["n"], first["seed"], first["rates"]) or set(r["models"]) != set(
        first["models"]):
      raise ConfigError("--combine: the reports differ in n, seed, rates or model names; combine the same probes")
  out = {}
  for name in first["models"]:
    values: dict[str, list[float]] = {}
    for r in reports:
      m, c = r["models"][name], r["models"][name]["continuation"]
      metrics = {"mean_drop": m["mean_drop"], **{p: m[p]["accuracy"] for p in CHAR_PROBES}}
      for k in ("clean", *first["rates"]):
        metrics.update({f"{k}/accuracy": c[k]["accuracy"], f"{k}/bpb": c[k]["bpb"]})
        if k != "clean":
          metrics[f"{k}/bpb_increase"] = c[k]["bpb"] - c["clean"]["bpb"]
      for key, value in metrics.items():
        values.setdefault(key, []).append(value)
    out[name] = {key: t_interval(v) for key, v in values.items()}
  return dict(n=first["n"], seed=first["seed"], rates=first["rates"], reports=len(reports), models=out)


def combined_markdown(combined: dict) -> str:
  rates, runs = combined["rates"], combined["reports"]
  pm = lambda v, fmt: format(v[0], fmt) + ("" if math.isnan(v[1]) else f" ± {v[1]:.3f}")
  lines = [f"Over {runs} training seeds (one report each; the same {combined['n']} items a probe, seed "
           f"{combined['seed']}): mean ± 95% t-interval over the seeds.", "",
           "| model | continuation bpb, clean | " + " | ".join(f"bpb increase, {k} ({rates[k]:g})" for k in rates)
           + " | accuracy, clean | mean accuracy drop | " + " | ".join(CHAR_PROBES) + " |",
           "|" + "---|" * (4 + len(rates) + len(CHAR_PROBES))]
  for name, m in combined["models"].items():
    cells = [name, pm(m["clean/bpb"], ".3f"), *(pm(m[f"{k}/bpb_increase"], "+.3f") for k in rates),
             pm(m["clean/accuracy"], ".3f"), pm(m["mean_drop"], "+.3f"), *(pm(m[p], ".3f") for p in CHAR_PROBES)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def parse_runs(spec: str) -> dict[str, str]:
  runs = {}
  for part in filter(None, spec.split(",")):
    name, eq, path = part.partition("=")
    if not eq or not name or not path:
      raise ConfigError(f"--runs: '{part}' is not NAME=DIR")
    if name in runs:
      raise ConfigError(f"--runs: the name '{name}' is given twice")
    runs[name] = path
  if not runs:
    raise ConfigError("--runs: no run given (NAME=DIR,NAME=DIR)")
  return runs


def _write(out: str, stem: str, data: dict, table: str) -> None:
  """OUT/STEM.json and OUT/STEM.md, and the table on stdout."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{stem}.json"), "w") as f:
    json.dump(data, f, indent=1)
  with open(os.path.join(out, f"{stem}.md"), "w") as f:
    f.write(table)
  print(table, end="")


def main(argv: list[str]) -> int:
  p = ArgumentParser(prog="python -m blt.robustness", description=__doc__.split("\n\n")[1])
  p.add_argument("--runs", default="", help="NAME=DIR,... training runs (blt.train or common.train)")
  p.add_argument("--combine", default="", help="OUT,OUT,...: instead of scoring, combine the results.json of "
                 "earlier reports on runs of other training seeds (mean ± t-interval) into --out")
  p.add_argument("--n", type=int, default=200, help="items per probe")
  p.add_argument("--seed", type=int, default=0, help="of the probes and the noise")
  p.add_argument("--batch_size", type=int, default=16, help="rows per model call")
  p.add_argument("--out", default="runs/blt_robustness", help="folder of results.json and results.md")
  args = p.parse_args(argv)
  for flag, least in (("n", 1), ("batch_size", 1), ("seed", 0)):
    if getattr(args, flag) < least:
      raise ConfigError(f"--{flag}={getattr(args, flag)}: must be >= {least}")
  if args.combine:
    reports = []
    for folder in filter(None, args.combine.split(",")):
      path = os.path.join(folder, "results.json")
      if not os.path.isfile(path):
        raise ConfigError(f"--combine: '{path}' does not exist (a folder written by --runs=... --out=FOLDER)")
      with open(path) as f:
        reports.append(json.load(f))
    combined = combine(reports)
    _write(args.out, "combined", combined, combined_markdown(combined))
    return 0
  runs = parse_runs(args.runs)
  report = robustness_report(runs, n=args.n, seed=args.seed, batch_size=args.batch_size,
                             log=lambda msg: print(f"[blt.robustness] {msg}", flush=True))
  _write(args.out, "results", report, markdown(report))
  return 0


if __name__ == "__main__":
  from common.config import run_main
  run_main(lambda: main(sys.argv[1:]))
