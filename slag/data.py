"""The beliefs of Hase et al. (2023): true/false statements, each with paraphrases and entailed statements.

The default is a generated knowledge base in the style of LeapOfThought: made-up entities, each a
member of one category ("Zorvik is a bird"), categories with properties, and the entailment rule
is-a(X, C) => X has every property of C ("Zorvik is a bird" => "Zorvik has wings"). Every statement has
several paraphrase templates. Real data is read from the official jsonl files (`read_beliefs`): FEVER and
zsRE in the KILT schema, LeapOfThought (implicit rule as the belief, the hypothesis as its entailed statement).

A `Belief` is what an update targets: its main statement, paraphrases, truth label and entailed statements
(true when the main statement is made true). `statements` are what the base classifier is trained on.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from common.config import ConfigError
from common.data.epochs import EpochOrder
from common.data.jsonl import jsonl_objects
from common.tokenizers import Tokenizer

# category -> the properties its members have (each property belongs to one category only, so the label of
# "X <property>" is a pure function of X's category).
CATEGORIES = {
    "bird": ("has wings", "lays eggs"), "fish": ("has gills", "lives in water"),
    "tree": ("has leaves", "grows roots"), "metal": ("conducts heat", "can rust"),
    "insect": ("has six legs", "has antennae"), "planet": ("orbits a star", "has a core"),
    "song": ("has a melody", "can be sung"), "tool": ("has a handle", "is used for work"),
}
MEMBER_TEMPLATES = ("{x} is a {c}.", "{x} is a kind of {c}.", "One {c} is {x}.", "It is true that {x} is a {c}.")
PROPERTY_TEMPLATES = ("{x} {p}.", "It is a fact that {x} {p}.", "About {x}: it {p}.")
SYLLABLES = ("ka", "zo", "rin", "vel", "mu", "tor", "shi", "bex", "lo", "qua", "den", "fi", "gar", "nu", "pel",
             "ro", "sta", "vi", "wen", "yu")
FORMATS = ("generated", "fever", "zsre", "leapofthought")


@dataclasses.dataclass(frozen=True)
class Belief:
  main: str
  label: int                                  # truth of `main` (1 true, 0 false)
  paraphrases: tuple[str, ...] = ()           # the same statement in other words
  entailed: tuple[tuple[str, int], ...] = ()  # (statement, its label when `main` is made true)
  split: str = "train"                        # 'train' (the learned optimizer's training) or 'eval'


@dataclasses.dataclass(frozen=True)
class BeliefSet:
  statements: tuple[tuple[str, int], ...]  # everything the base classifier is trained on
  beliefs: tuple[Belief, ...]

  def split(self, name: str) -> list[Belief]:
    return [b for b in self.beliefs if b.split == name]


def entity_names(count: int, rng: np.random.Generator) -> list[str]:
  """`count` distinct made-up names of two or three syllables."""
  names: dict[str, None] = {}
  while len(names) < count:
    parts = rng.choice(SYLLABLES, size=int(rng.integers(2, 4)))
    names["".join(parts).capitalize()] = None
  return list(names)


def member_statements(x: str, c: str) -> list[str]:
  return [t.format(x=x, c=c) for t in MEMBER_TEMPLATES]


def property_statements(x: str, p: str) -> list[str]:
  return [t.format(x=x, p=p) for t in PROPERTY_TEMPLATES]


def entailments(category: str, entity: str, entity_category: str) -> tuple[tuple[str, int], ...]:
  """What making "entity is a category" true entails: every property of `category`, true; properties that
  already hold through the entity's own category are left out (they do not test the update)."""
  if category == entity_category:
    return ()
  return tuple((property_statements(entity, p)[0], 1) for p in CATEGORIES[category])


def generated_kb(num_entities: int, false_per_entity: int, eval_fraction: float, seed: int) -> BeliefSet:
  """The knowledge base: each entity in one category; its beliefs are the true membership and
  `false_per_entity` false ones (other categories); the statements add each entity's properties, true (its
  category's) and false (as many from other categories), every statement in all its templates. Entities are
  split between the learned optimizer's training beliefs and the evaluation beliefs."""
  rng = np.random.default_rng(seed)
  cats = list(CATEGORIES)
  names = entity_names(num_entities, rng)
  n_eval = max(1, int(round(eval_fraction * num_entities)))
  statements, beliefs = [], []
  for i, x in enumerate(names):
    own = cats[int(rng.integers(len(cats)))]
    split = "eval" if i >= num_entities - n_eval else "train"
    others = [c for c in cats if c != own]
    false_cats = [others[j] for j in rng.choice(len(others), size=false_per_entity, replace=False)]
    for c, label in [(own, 1)] + [(c, 0) for c in false_cats]:
      texts = member_statements(x, c)
      statements += [(t, label) for t in texts]
      pick = int(rng.integers(len(texts)))
      beliefs.append(Belief(texts[pick], label, tuple(t for j, t in enumerate(texts) if j != pick),
                            entailments(c, x, own), split))
    false_props = [p for c in false_cats for p in CATEGORIES[c]][:len(CATEGORIES[own])]
    for p, label in [(p, 1) for p in CATEGORIES[own]] + [(p, 0) for p in false_props]:
      statements += [(t, label) for t in property_statements(x, p)]
  return BeliefSet(tuple(statements), tuple(beliefs))


def _need(row: dict, key: str, path: str, line: int):
  if key not in row:
    raise ConfigError(f"{path}:{line}: missing key '{key}'")
  return row[key]


def _answer(row: dict, path: str, line: int) -> str:
  outputs = _need(row, "output", path, line)
  if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], dict) or "answer" not in outputs[0]:
    raise ConfigError(f"{path}:{line}: 'output' must be a list of objects with an 'answer'")
  return str(outputs[0]["answer"])


def read_beliefs(path: str, fmt: str, eval_every: int = 5) -> BeliefSet:
  """Beliefs of an official jsonl file; every `eval_every`-th becomes an evaluation belief. FEVER: the claim,
  SUPPORTS = true. zsRE: "question answer" true, the question with the next line's answer false, the other
  template questions as paraphrases. LeapOfThought: the implicit rule (true) with the hypothesis and its
  answer as the entailed statement."""
  if fmt not in FORMATS[1:]:
    raise ConfigError(f"config key 'data.format': must be one of {FORMATS[1:]} for a file, got '{fmt}'")
  rows = list(jsonl_objects(path, ConfigError))
  beliefs: list[Belief] = []
  for index, (line, row) in enumerate(rows):
    split = "eval" if index % eval_every == eval_every - 1 else "train"
    if fmt == "fever":
      label = _answer(row, path, line)
      if label not in ("SUPPORTS", "REFUTES"):
        raise ConfigError(f"{path}:{line}: FEVER answer must be SUPPORTS or REFUTES, got '{label}'")
      beliefs.append(Belief(str(_need(row, "input", path, line)), int(label == "SUPPORTS"), split=split))
    elif fmt == "zsre":
      questions = _need(row, "meta", path, line).get("template_questions") or [_need(row, "input", path, line)]
      answer = _answer(row, path, line)
      next_line, next_row = rows[(index + 1) % len(rows)]
      wrong = _answer(next_row, path, next_line)
      for value, label in ((answer, 1), (wrong, 0)):
        if label == 0 and wrong == answer:
          continue
        texts = [f"{q} {value}" for q in questions]
        beliefs.append(Belief(texts[0], label, tuple(texts[1:]), split=split))
    else:
      sentences = _need(row, "metadata", path, line).get("separate_sentences", {})
      if "implicit_rule" not in sentences:
        continue  # knowledge-only lines carry no rule
      hypothesis = (str(_need(row, "phrase", path, line)), int(_need(row, "answer", path, line)))
      beliefs.append(Belief(sentences["implicit_rule"], 1, entailed=(hypothesis,), split=split))
  if not beliefs:
    raise ConfigError(f"{path}: no beliefs read (format '{fmt}')")
  statements = [(t, b.label) for b in beliefs for t in (b.main, *b.paraphrases)]
  statements += [e for b in beliefs for e in b.entailed]
  return BeliefSet(tuple(statements), tuple(beliefs))


def belief_set(data_cfg) -> BeliefSet:
  if data_cfg.path:
    return read_beliefs(data_cfg.path, data_cfg.format)
  if data_cfg.format != "generated":
    raise ConfigError(f"config key 'data.format': '{data_cfg.format}' needs data.path")
  return generated_kb(int(data_cfg.num_entities), int(data_cfg.false_per_entity), float(data_cfg.eval_fraction),
                      int(data_cfg.kb_seed))


def encode(texts: list[str], tokenizer: Tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [n, seq_len] right-padded with the pad id, lengths [n]): the classifier pools the last token, so a
  text longer than seq_len keeps its end."""
  tokens = np.full((len(texts), seq_len), tokenizer.pad_id or 0, np.int32)
  lengths = np.zeros(len(texts), np.int32)
  for i, text in enumerate(texts):
    ids = tokenizer.encode(text)[-seq_len:] or [tokenizer.pad_id or 0]
    tokens[i, :len(ids)] = ids
    lengths[i] = len(ids)
  return tokens, lengths


class ArrayData:
  """Batches of fixed-shape rows (any number of trailing axes per key) for the common loop: `train_batch` is a
  pure function of the data position (epochs of `common.data.epochs.EpochOrder`), `eval_batches` the held-out
  rows in order, the last batch padded with rows of weight 0 (every row set has a 'weight' key)."""

  def __init__(self, train_rows: dict[str, np.ndarray], eval_rows: dict[str, np.ndarray], *, batch_size: int,
               seed: int):
    self.train_rows, self.eval_rows, self.batch_size = train_rows, eval_rows, int(batch_size)
    self.num_train_rows = len(next(iter(train_rows.values())))
    self.num_eval_rows = len(next(iter(eval_rows.values())))
    self._order = EpochOrder(self.num_train_rows, seed)

  def train_batch(self, position: int) -> dict[str, np.ndarray]:
    rows = self._order.rows_at(position, self.batch_size)
    return {k: v[rows] for k, v in self.train_rows.items()}

  def eval_batches(self, max_batches: int = 0):
    n = -(-self.num_eval_rows // self.batch_size)
    if max_batches > 0:
      n = min(n, max_batches)
    for b in range(n):
      index = np.arange(b * self.batch_size, (b + 1) * self.batch_size)
      valid = index < self.num_eval_rows
      batch = {k: v[np.where(valid, index, 0)] for k, v in self.eval_rows.items()}
      batch["weight"] = valid.astype(np.float32) * batch["weight"]
      yield batch


LABEL_WORDS = ("false", "true")


def _padded(groups: list[list[str]], width: int, tokenizer: Tokenizer, seq_len: int):
  """Texts of each point padded to `width` slots: tokens [n, width, seq_len], lengths and mask [n, width]."""
  flat = [t for g in groups for t in (g + [""] * width)[:width]]
  tokens, lengths = encode(flat, tokenizer, seq_len)
  mask = np.array([[j < len(g) for j in range(width)] for g in groups], np.float32)
  return tokens.reshape(len(groups), width, seq_len), lengths.reshape(len(groups), width), mask


def point_arrays(beliefs: list[Belief], preds: np.ndarray, tokenizer: Tokenizer, seq_len: int,
                 cond_len: int) -> dict[str, np.ndarray]:
  """Every belief as an update point (slag.update): the desired label is the opposite of the model's
  prediction (the official `fit_opposite_label` setting), the conditioning text the official
  "<prediction> >> <desired> || <statement>", paraphrases and entailed statements padded to the most any
  belief has (at least one slot, masked)."""
  preds = np.asarray(preds, np.int32)
  desired = 1 - preds
  main, main_len = encode([b.main for b in beliefs], tokenizer, seq_len)
  cond, cond_len_ = encode([f"{LABEL_WORDS[p]} >> {LABEL_WORDS[d]} || {b.main}"
                            for b, p, d in zip(beliefs, preds, desired)], tokenizer, cond_len)
  width_p = max([len(b.paraphrases) for b in beliefs] + [1])
  width_e = max([len(b.entailed) for b in beliefs] + [1])
  para, para_len, para_mask = _padded([list(b.paraphrases) for b in beliefs], width_p, tokenizer, seq_len)
  ent, ent_len, ent_mask = _padded([[t for t, _ in b.entailed] for b in beliefs], width_e, tokenizer, seq_len)
  ent_label = np.array([[lab for _, lab in b.entailed] + [0] * (width_e - len(b.entailed)) for b in beliefs],
                       np.int32)
  return dict(main=main, main_len=main_len, desired=desired, label=np.array([b.label for b in beliefs], np.int32),
              cond=cond, cond_len=cond_len_, para=para, para_len=para_len, para_mask=para_mask, ent=ent,
              ent_len=ent_len, ent_mask=ent_mask, ent_label=ent_label)


def episodes(points: dict[str, np.ndarray], count: int, sequential: int, num_other: int,
             seed: int) -> dict[str, np.ndarray]:
  """`count` training episodes: each `sequential` distinct points to update in turn ([count, r, ...]) and
  `num_other` other points whose predictions the KL term keeps (`other`, `other_len` [count, O, ...])."""
  n = len(points["desired"])
  if n < sequential + num_other:
    raise ConfigError(f"config key 'learned_opt.num_other': {sequential} updated + {num_other} other beliefs "
                      f"need more than the {n} beliefs of the split")
  rng = np.random.default_rng(seed)
  picks = np.stack([rng.choice(n, sequential + num_other, replace=False) for _ in range(count)])
  rows = {k: v[picks[:, :sequential]] for k, v in points.items() if k != "label"}
  rows.update(other=points["main"][picks[:, sequential:]], other_len=points["main_len"][picks[:, sequential:]],
              weight=np.ones(count, np.float32))
  return rows
