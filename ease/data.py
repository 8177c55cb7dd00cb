"""Summarisation data for EASE: documents split into sentences, reference summaries, gold key sentences.

Sources (`data.source`):
- `generated` (default, offline): a document about one person mixes 2-3 key facts ("mira founded the bakery
  in lund in 1984 .") with distractors (chatter about the same person, weather and city notes); the key facts
  lean towards the front, as news does, without being the lead. The reference summary rephrases each key fact
  in document order ("in 1984 , mira started the bakery ."): the place is dropped and the verb changes, so a
  summary needs the evidence but is not a copy of it. The gold evidence is the key sentences. This is
  `data.style=cnndm` (the default): summaries restate a few whole sentences, as CNN/DailyMail's highlights do.
  `data.style=xsum`: one event ("mira founded the bakery") and some of its details (the place, the year, a
  partner) are data.min_key..max_key (at most 4) short key spans, each inside an otherwise distractor sentence
  and tied to the event by its object ("the weather near the bakery was cold in 1984 ."); the summary is ONE
  sentence combining them ("mira started the bakery with ivan in lund in 1984 ."), as XSum's are, so whole key
  sentences cost several times the evidence budget of the key tokens. The gold evidence is again the sentences
  holding a key span.
- `jsonl` (`data.path`, optional `data.eval_path`; without it the file's last data.eval_docs examples are held
  out): one `{"document": str, "summary": str[, "gold_sentences": [int, ...]]}` per line (CNN/DailyMail or
  XSum exported to jsonl); documents are split into sentences at ., ! and ?.
- `tfds` (`data.tfds_name`, `data.tfds_data_dir`, `data.document_key`, `data.summary_key`): a dataset already
  prepared on disk (cnn_dailymail: article / highlights; xsum: document / summary). Nothing is downloaded.

Rows have a fixed layout, so the abstractor always knows where the evidence ends: `[bos] document (padded to
data.doc_len) [sep] summary [eos] (padded)`; `inputs` drop the last id, `targets` the first.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterator, Sequence

import numpy as np

from common.config import ConfigError, require
from common.tokenizers import Tokenizer, load_tokenizer

SOURCES = ("generated", "jsonl", "tfds")
STYLES = ("cnndm", "xsum")  # generated documents: whole key sentences, or key spans (module docstring)
TOKENIZERS = ("words", "byte", "spm")

NAMES = ("mira", "tomas", "lena", "omar", "ines", "kofi", "yuki", "pavel", "sara", "diego", "amal", "felix",
         "nora", "ivan", "leila", "hugo")
PLACES = ("lund", "porto", "oslo", "lyon", "cork", "graz", "turin", "ghent", "krakow", "bergen", "split",
          "delft")
YEARS = tuple(str(y) for y in range(1960, 2020, 3))
# relation: (document verb, summary verb, objects)
RELATIONS = {
    "founded": ("founded", "started", ("bakery", "school", "band", "clinic", "museum")),
    "wrote": ("wrote", "authored", ("novel", "poem", "play", "song", "memoir")),
    "won": ("won", "received", ("prize", "medal", "cup", "award", "title")),
    "built": ("built", "constructed", ("bridge", "tower", "boat", "library", "garden")),
    "discovered": ("discovered", "found", ("comet", "fossil", "cave", "shipwreck", "manuscript")),
}
FOODS = ("tea", "coffee", "bread", "olives", "soup", "apples", "cheese", "rice")
HOBBIES = ("chess", "running", "painting", "sailing", "cycling", "music", "gardening", "reading")
WEATHER = ("cold", "warm", "rainy", "windy", "sunny", "grey", "mild", "snowy")
CITY = ("busy", "quiet", "crowded", "calm", "loud", "empty", "festive", "sleepy")
TEMPLATE_WORDS = ("the", "in", ".", ",", "likes", "and", "often", "walks", "near", "weather", "was", "market",
                  "seemed", "that", "day", "a", "friend", "of", "talked", "about", "with", "for", "hours")
SPECIALS = ("<pad>", "</s>", "<unk>", "<sep>", "<s>")  # pad 0, eos 1, unk 2, sep 3, bos 4 in every vocabulary


@dataclasses.dataclass(frozen=True)
class Example:
  """One document as sentences, its reference summary, and the indices of its gold key sentences (empty
  when the source has none)."""
  sentences: tuple[str, ...]
  summary: str
  gold: tuple[int, ...] = ()


class WordTokenizer(Tokenizer):
  """The closed word vocabulary of the generated documents (plus the specials); other words are unk. Text
  is split at spaces and punctuation; decoding joins words with spaces, as the generator writes them."""

  def __init__(self):
    words = sorted({*NAMES, *PLACES, *YEARS, *FOODS, *HOBBIES, *WEATHER, *CITY, *TEMPLATE_WORDS,
                    *(w for verb, alt, objs in RELATIONS.values() for w in (verb, alt, *objs))})
    self.itos = list(SPECIALS) + words
    self.stoi = {w: i for i, w in enumerate(self.itos)}
    self.vocab_size, self.pad_id, self.eos_id, self.bos_id = len(self.itos), 0, 1, 4
    self.special_tokens = {s: i for i, s in enumerate(SPECIALS)}

  def _encode(self, text: str) -> list[int]:
    return [self.stoi.get(w, 2) for w in re.findall(r"\w+|[^\w\s]", text.lower())]

  def decode(self, ids: Sequence[int]) -> str:
    return " ".join(self.itos[int(i)] for i in ids if len(SPECIALS) <= int(i) < self.vocab_size)


def tokenizer_for(data_cfg, pretrained: Tokenizer | None = None) -> tuple[Tokenizer, int, int]:
  """(tokenizer, sep id, bos id): the word vocabulary has its own; byte and SentencePiece vocabularies get
  two ids past their own (the model's vocabulary covers them). A pretrained abstractor's tokenizer
  (`pretrained`) replaces data.tokenizer and keeps to the ids its model was trained on: its eos separates
  document and summary, and its bos (eos where it has none) opens the row."""
  if pretrained is not None:
    return pretrained, pretrained.eos_id, pretrained.eos_id if pretrained.bos_id is None else pretrained.bos_id
  if data_cfg.tokenizer == "words":
    tok = WordTokenizer()
    return tok, 3, 4
  tok = load_tokenizer(data_cfg.tokenizer, data_cfg.tokenizer_path)
  return tok, tok.vocab_size, tok.vocab_size + 1


def _distractor(rng: np.random.Generator, name: str) -> str:
  """Chatter about the person, weather or market notes: no key fact."""
  pick = lambda pool: pool[rng.integers(len(pool))]
  kind = rng.integers(4)
  if kind == 0:
    return f"{name} likes {pick(FOODS)} and {pick(HOBBIES)} ."
  if kind == 1:
    return f"the weather in {pick(PLACES)} was {pick(WEATHER)} in {pick(YEARS)} ."
  if kind == 2:
    return f"the market in {pick(PLACES)} seemed {pick(CITY)} that day ."
  return f"{name} talked about {pick(HOBBIES)} with a friend of {pick(NAMES)} for hours ."


def generate_example(rng: np.random.Generator, min_sents: int = 6, max_sents: int = 10, min_key: int = 2,
                     max_key: int = 3) -> Example:
  """One generated document (see the module docstring)."""
  n = int(rng.integers(min_sents, max_sents + 1))
  n_key = int(rng.integers(min_key, max_key + 1))
  weights = 1.0 / (1.0 + 0.35 * np.arange(n))  # key facts lean to the front (a lead bias, not a lead)
  key_pos = sorted(rng.choice(n, size=n_key, replace=False, p=weights / weights.sum()).tolist())
  name = NAMES[rng.integers(len(NAMES))]
  pick = lambda pool: pool[rng.integers(len(pool))]
  relations = rng.choice(list(RELATIONS), size=n_key, replace=False)
  sentences, summary = [], []
  facts = iter(relations)
  for i in range(n):
    if i in key_pos:
      verb, alt, objects = RELATIONS[str(next(facts))]
      obj, place, year = pick(objects), pick(PLACES), pick(YEARS)
      sentences.append(f"{name} {verb} the {obj} in {place} in {year} .")
      summary.append(f"in {year} , {name} {alt} the {obj} .")
      continue
    sentences.append(_distractor(rng, name))
  return Example(tuple(sentences), " ".join(summary), tuple(key_pos))


def generate_xsum_example(rng: np.random.Generator, min_sents: int = 6, max_sents: int = 10, min_key: int = 2,
                          max_key: int = 3) -> Example:
  """One generated XSum-like document (module docstring): min_key..max_key key spans (the event, then some of
  its place, year and partner), each inside its own sentence, and a one-sentence summary of them all."""
  n = int(rng.integers(min_sents, max_sents + 1))
  n_key = int(rng.integers(min_key, max_key + 1))
  weights = 1.0 / (1.0 + 0.35 * np.arange(n))  # the lead bias of generate_example
  key_pos = sorted(rng.choice(n, size=n_key, replace=False, p=weights / weights.sum()).tolist())
  name = NAMES[rng.integers(len(NAMES))]
  pick = lambda pool: pool[rng.integers(len(pool))]
  verb, alt, objects = RELATIONS[str(rng.choice(list(RELATIONS)))]
  obj, place, year = pick(objects), pick(PLACES), pick(YEARS)
  partner = pick(tuple(x for x in NAMES if x != name))
  details = [str(d) for d in rng.choice(("partner", "place", "year"), size=n_key - 1, replace=False)]
  # Each key span sits in a distractor's frame; "the {obj}" ties it to the event.
  span_sentences = dict(
      event=f"{name} likes {pick(FOODS)} and {pick(HOBBIES)} , and {verb} the {obj} .",
      partner=f"{name} talked about the {obj} with {partner} for hours .",
      place=f"the market near the {obj} in {place} seemed {pick(CITY)} that day .",
      year=f"the weather near the {obj} was {pick(WEATHER)} in {year} .")
  spans = iter(rng.permutation(["event", *details]).tolist())
  sentences = []
  for i in range(n):
    if i in key_pos:
      sentences.append(span_sentences[next(spans)])
      continue
    sentences.append(_distractor(rng, name))
  tail = {"partner": f" with {partner}", "place": f" in {place}", "year": f" in {year}"}
  summary = f"{name} {alt} the {obj}" + "".join(tail[d] for d in ("partner", "place", "year") if d in details)
  return Example(tuple(sentences), summary + " .", tuple(key_pos))


def generated_examples(data_cfg, split: str) -> list[Example]:
  count = int(data_cfg.train_docs if split == "train" else data_cfg.eval_docs)
  rng = np.random.default_rng((int(data_cfg.seed), 0 if split == "train" else 1))
  make = generate_xsum_example if data_cfg.get("style", "cnndm") == "xsum" else generate_example
  return [make(rng, int(data_cfg.min_sents), int(data_cfg.max_sents), int(data_cfg.min_key),
               int(data_cfg.max_key)) for _ in range(count)]


def split_sentences(text: str) -> tuple[str, ...]:
  """Sentences of a document: breaks after ., ! or ? followed by space, and at newlines."""
  return tuple(s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip())


def read_jsonl(path: str, limit: int = 0) -> list[Example]:
  """Examples of a document/summary[/gold_sentences] jsonl file; a bad line is a ConfigError naming the file
  and line."""
  if not os.path.isfile(os.path.expanduser(path)):
    raise ConfigError(f"config key 'data.path': '{path}': no such file")
  out = []
  with open(os.path.expanduser(path), encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not JSON ({e.msg})") from None
      if not isinstance(row, dict) or not isinstance(row.get("document"), str) or \
          not isinstance(row.get("summary"), str):
        raise ConfigError(f"{where}: expected an object with string fields 'document' and 'summary'")
      sentences = split_sentences(row["document"])
      gold = row.get("gold_sentences", [])
      if not isinstance(gold, list) or not all(isinstance(g, int) and 0 <= g < len(sentences) for g in gold):
        raise ConfigError(f"{where}: 'gold_sentences' must be a list of sentence indices below "
                          f"{len(sentences)}")
      out.append(Example(sentences, row["summary"], tuple(sorted(set(gold)))))
      if limit and len(out) >= limit:
        break
  if not out:
    raise ConfigError(f"config key 'data.path': '{path}' has no examples")
  return out


def read_tfds(data_cfg, split: str, limit: int = 0) -> list[Example]:
  """Examples of a tfds dataset already prepared under data.tfds_data_dir (never downloaded), in its stored
  order. Read with `as_dataset`, which takes every file format; `as_data_source` takes only array_record and
  parquet, not tfds's default tfrecord (in which cnn_dailymail and xsum are usually prepared)."""
  from common.data import DataError, with_defaults  # pylint: disable=g-import-not-at-top
  from common.data._tf import import_tfds  # pylint: disable=g-import-not-at-top
  from common.data.tasks import check_tfds_prepared  # pylint: disable=g-import-not-at-top
  data_dir = data_cfg.tfds_data_dir
  require(not data_dir or os.path.isdir(os.path.expanduser(data_dir)), "data.tfds_data_dir",
          f"'{data_dir}': no such directory (prepare {data_cfg.tfds_name} there first; nothing is downloaded)")
  try:
    builder = check_tfds_prepared(with_defaults(data_cfg))
  except DataError as e:
    raise ConfigError(f"config key 'data.tfds_name': {e}") from None
  key = "data.tfds_train_split" if split == "train" else "data.tfds_eval_split"
  name = data_cfg.tfds_train_split if split == "train" else data_cfg.tfds_eval_split
  require(name in builder.info.splits, key,
          f"'{name}' is not a split of {data_cfg.tfds_name} (has {', '.join(sorted(builder.info.splits))})")
  features = sorted(builder.info.features)
  for field in ("document_key", "summary_key"):
    require(data_cfg[field] in features, f"data.{field}",
            f"'{data_cfg[field]}' is not a feature of {data_cfg.tfds_name} (has {', '.join(features)})")
  rows = builder.as_dataset(split=name, shuffle_files=False)
  text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
  out = []
  for row in import_tfds().as_numpy(rows.take(limit) if limit else rows):
    out.append(Example(split_sentences(text(row[data_cfg.document_key])), text(row[data_cfg.summary_key])))
  return out


def examples_for(data_cfg, split: str) -> list[Example]:
  if data_cfg.source == "generated":
    return generated_examples(data_cfg, split)
  limit = int(data_cfg.train_docs if split == "train" else data_cfg.eval_docs)
  if data_cfg.source == "jsonl" and data_cfg.eval_path:
    return read_jsonl(data_cfg.path if split == "train" else data_cfg.eval_path, limit)
  if data_cfg.source == "jsonl":  # the last eval_docs examples of the one file are held out
    examples, held_out = read_jsonl(data_cfg.path), int(data_cfg.eval_docs)
    if len(examples) <= held_out:
      raise ConfigError(f"config key 'data.eval_docs': '{data_cfg.path}' has {len(examples)} examples, not more "
                        f"than the {held_out} held out for eval (or give data.eval_path)")
    return examples[:-held_out][:limit] if split == "train" else examples[-held_out:]
  return read_tfds(data_cfg, split, limit)


def check_data(d) -> None:
  """The checks of `data.*`, each naming its key, before anything is generated or read."""
  require(d.source in SOURCES, "data.source", f"unknown source '{d.source}' (valid: {', '.join(SOURCES)})")
  style = d.get("style", "cnndm")
  require(style in STYLES, "data.style", f"unknown style '{style}' (valid: {', '.join(STYLES)})")
  require(style != "xsum" or int(d.max_key) <= 4, "data.max_key",
          f"at most 4 key spans (event, partner, place, year) with data.style=xsum, got {d.max_key}")
  require(d.tokenizer in TOKENIZERS, "data.tokenizer",
          f"unknown tokenizer '{d.tokenizer}' (valid: {', '.join(TOKENIZERS)})")
  require(d.source != "jsonl" or bool(d.path), "data.path", "a jsonl file is needed with data.source=jsonl")
  require(d.source != "tfds" or bool(d.tfds_name), "data.tfds_name", "a dataset name is needed with tfds")
  for key in ("doc_len", "summary_len", "max_units", "train_docs", "eval_docs"):
    require(int(d[key]) > 1, f"data.{key}", f"must be > 1, got {d[key]}")
  require(1 <= int(d.min_sents) <= int(d.max_sents), "data.min_sents", "needs 1 <= min_sents <= max_sents")
  require(1 <= int(d.min_key) <= int(d.max_key) <= int(d.min_sents), "data.min_key",
          "needs 1 <= min_key <= max_key <= min_sents")


def encode(examples: Sequence[Example], tokenizer: Tokenizer, sep_id: int, bos_id: int, doc_len: int,
           summary_len: int, max_units: int) -> dict[str, np.ndarray]:
  """Rows of the fixed layout (module docstring). Per input position: `doc_mask` (a document token),
  `sent_ids` (its sentence, 1-based; 0 elsewhere), `gold` (in a gold key sentence). Documents are cut at
  doc_len - 1 tokens or max_units sentences, summaries at summary_len - 1 tokens."""
  n, length = len(examples), doc_len + 1 + summary_len
  tokens = np.zeros((n, length), np.int32)
  sent_ids = np.zeros((n, length), np.int32)
  gold = np.zeros((n, length), np.float32)
  for r, ex in enumerate(examples):
    tokens[r, 0] = bos_id
    pos = 1
    for s, sentence in enumerate(ex.sentences[:max_units]):
      ids = tokenizer.encode(sentence if s == 0 or isinstance(tokenizer, WordTokenizer) else " " + sentence)
      ids = ids[:doc_len - pos]
      tokens[r, pos:pos + len(ids)] = ids
      sent_ids[r, pos:pos + len(ids)] = s + 1
      gold[r, pos:pos + len(ids)] = float(s in ex.gold)
      pos += len(ids)
    tokens[r, doc_len] = sep_id
    summary = tokenizer.encode(ex.summary)[:summary_len - 1] + [tokenizer.eos_id]
    tokens[r, doc_len + 1:doc_len + 1 + len(summary)] = summary
  targets = tokens[:, 1:]
  loss_mask = np.zeros(targets.shape, np.float32)
  loss_mask[:, doc_len:] = 1.0
  for r in range(n):  # targets through the first eos
    ends = np.nonzero(targets[r, doc_len:] == tokenizer.eos_id)[0]
    loss_mask[r, doc_len + (ends[0] + 1 if len(ends) else summary_len):] = 0.0
  return dict(inputs=tokens[:, :-1], targets=targets, loss_mask=loss_mask, doc_mask=sent_ids[:, :-1] > 0,
              sent_ids=sent_ids[:, :-1], gold=gold[:, :-1])


class SummaryData:
  """Encoded train and eval rows; `train_batch(position)` is a pure function of (seed, position): the rows
  of an epoch permutation drawn from (seed, epoch), plus uniform `noise` per position for the mask sampler and
  `hard` (0: the loss samples a relaxed mask; 1, on eval batches: it uses the top-k evidence)."""

  def __init__(self, data_cfg, *, batch_size: int, seed: int, pretrained: Tokenizer | None = None):
    check_data(data_cfg)
    self.tokenizer, self.sep_id, self.bos_id = tokenizer_for(data_cfg, pretrained)
    self.examples = {split: examples_for(data_cfg, split) for split in ("train", "eval")}
    shape = (int(data_cfg.doc_len), int(data_cfg.summary_len), int(data_cfg.max_units))
    self.rows = {split: encode(ex, self.tokenizer, self.sep_id, self.bos_id, *shape)
                 for split, ex in self.examples.items()}
    self.doc_len, self.batch_size, self.seed = shape[0], batch_size, seed
    self.num_train = len(self.examples["train"])
    self._orders: dict[int, np.ndarray] = {}

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      self._orders = {epoch: np.random.default_rng((self.seed, epoch)).permutation(self.num_train)}
    return self._orders[epoch]

  @property
  def seq_len(self) -> int:
    return self.rows["train"]["inputs"].shape[1]

  def train_batch(self, position: int) -> dict[str, np.ndarray]:
    start = position * self.batch_size
    index = np.empty(self.batch_size, np.int64)
    for i in range(self.batch_size):
      epoch, offset = divmod(start + i, self.num_train)
      index[i] = self._order(epoch)[offset]
    batch = {k: v[index] for k, v in self.rows["train"].items()}
    noise = np.random.default_rng((self.seed, 1 << 20, position)).random(batch["inputs"].shape, np.float32)
    return dict(batch, noise=noise, hard=np.zeros(self.batch_size, np.float32))

  def eval_batches(self, n: int) -> Iterator[dict[str, np.ndarray]]:
    """The first n batches of the eval rows (hard masks; the noise is unused)."""
    rows = self.rows["eval"]
    total = rows["inputs"].shape[0]
    for b in range(min(n, total // self.batch_size)):
      batch = {k: v[b * self.batch_size:(b + 1) * self.batch_size] for k, v in rows.items()}
      yield dict(batch, noise=np.full(batch["inputs"].shape, 0.5, np.float32),
                 hard=np.ones(self.batch_size, np.float32))
