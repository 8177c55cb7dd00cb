"""The knowledge the model has never seen, its splits, and each training variant as a data schedule.

Jiang et al. (2024, sec. 2) build Wiki2023: documents about things that appeared after the model's
pretraining cut-off, with QA pairs about each document; the model trains on the test documents, and their QA
pairs are held out. Here the world is generated: fictional people, films, towns and organisations with four
attributes each; a document weaves an entity's facts in random order with pronouns and distractor sentences,
`docs_per_entity` paraphrased documents per entity (the augmentation that Allen-Zhu & Li 2023, "Physics of
Language Models 3.1", find decides whether stored knowledge is extractable); one templated question per fact.

Splits are by entity: train entities (documents + QA), test entities (documents; QA held out for
evaluation), and `old` entities that stand for the pretrained base model's knowledge (see README: a model
trained from scratch needs a base that reads the world's language and the QA format). The in-domain setting
trains and tests on people; cross-domain trains on films, towns and organisations and tests on people
(paper sec. 4.4). Real data (the paper's Wiki2023 layout) is read from `data.docs_path` and `data.qa_path`.

A variant (paper secs. 3-4, table `VARIANTS`) is a list of phases, each an example mix and a number of
epochs over it; documents train on all their tokens, QA pairs on the answer (and EOS) only.
"""
from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Sequence

import numpy as np

from common.config import ConfigError
from common.data.jsonl import jsonl_objects
from common.tokenizers import Tokenizer

KINDS = ("person", "film", "town", "organisation")
SETTINGS = ("in_domain", "cross_domain")
TEST_KIND = "person"

# The variants of the paper (secs. 3-4) after the shared base phase: phases of (example sets, epochs key).
# 'docs' epochs apply to phases with documents (trained, or in context), 'qa' epochs to QA-only phases.
VARIANTS: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {
    "base": (),                                                               # closed-book: no test docs
    "open_book": ((("train_qa_open",), "docs"),),  # reads a document in context: the open-book ceiling
    "cpt": ((("test_docs",), "docs"),),                                       # continued pretraining
    "it": ((("train_docs", "test_docs"), "docs"), (("train_qa",), "qa")),     # standard instruction tuning
    "it_no_forget": ((("train_docs", "test_docs"), "docs"), (("train_qa", "test_docs"), "qa")),
    "mix_all": ((("train_qa", "train_docs", "test_docs"), "docs"),),
    "pit": ((("train_qa_then_docs",), "docs"), (("test_docs",), "docs")),       # each doc's QA right before it
    "pit_pp": ((("train_qa",), "qa"), (("train_qa_then_docs",), "docs"), (("test_docs",), "docs")),
    "pit_qa_only": ((("train_qa",), "qa"), (("test_docs",), "docs")),
    "pit_qa_then_docs": ((("train_qa",), "qa"), (("train_docs",), "docs"), (("test_docs",), "docs")),
    "pit_interleaved": ((("train_qa", "train_docs"), "docs"), (("test_docs",), "docs")),  # QA and docs shuffled
    "it_weighted": ((("train_docs_weighted", "test_docs_weighted"), "docs"), (("train_qa",), "qa")),
}

_SYLLABLES = ("ka", "lo", "mi", "ra", "ve", "to", "sa", "ne", "li", "do", "ru", "pa", "fe", "zo", "ni", "ta",
              "be", "go", "la", "si", "mo", "vi", "da", "ke", "ar", "el", "in", "or", "us", "en")
_TOWN_ENDS = ("ton", "ford", "vale", "burg", "mouth", "field", "stead", "wick")
_OCCUPATIONS = ("architect", "botanist", "cartographer", "chemist", "composer", "engineer", "geologist",
                "historian", "journalist", "linguist", "mathematician", "painter", "pharmacist", "photographer",
                "physician", "pilot", "poet", "sculptor", "surveyor", "teacher", "translator", "violinist",
                "astronomer", "economist")
_INDUSTRIES = ("shipping", "textiles", "publishing", "mining", "banking", "railways", "brewing", "insurance",
               "aviation", "pharmaceuticals", "furniture", "glassmaking", "telegraphy", "printing")
_ORG_ENDS = ("Works", "Company", "Institute", "Society", "Holdings", "Guild")
_GENRES = ("comedy", "thriller", "western", "musical", "documentary", "drama", "horror", "romance", "fantasy",
           "mystery", "adventure", "satire")
_TITLE_ADJ = ("Silent", "Golden", "Broken", "Hidden", "Last", "Crimson", "Distant", "Frozen", "Quiet", "Wild",
              "Hollow", "Bright", "Lost", "Burning", "Pale", "Secret")
_TITLE_NOUN = ("Harbour", "Garden", "Orchard", "Lantern", "Bridge", "Mirror", "Valley", "Tower", "Letter", "Winter",
               "River", "Crown", "Voyage", "Island", "Meadow", "Signal")
_DISTRACTORS = ("Records from that period are incomplete.", "Little else is known about the early years.",
                "Several letters from the time survive in private collections.",
                "Historians still debate some details of this account.",
                "A short article about this appeared in a local newspaper.",
                "The story is retold in a number of regional guides.",
                "Later accounts add a few colourful but doubtful details.",
                "An exhibition in the capital once touched on this history.")

# attribute -> (document sentences, questions). Subject forms: {S} sentence-initial, {s} mid-sentence, {P}/{p}
# possessive; {N} the name; {v} the value (the answer).
_ATTRIBUTES = {
    "person": {
        "birth_year": (("{S} was born in {v}.", "{P} birth year is {v}.", "In {v}, {s} was born."),
                       ("In which year was {N} born?", "What is the birth year of {N}?")),
        "birth_city": (("{S} was born in the city of {v}.", "The birthplace of {p} is {v}.",
                        "{S} came into the world in {v}."),
                       ("In which city was {N} born?", "What is the birthplace of {N}?")),
        "occupation": (("{S} worked as a {v}.", "By profession, {s} was a {v}.", "{S} made a living as a {v}."),
                       ("What was the occupation of {N}?", "What did {N} work as?")),
        "employer": (("{S} was employed by {v}.", "For many years {s} worked for {v}.", "{S} joined {v}."),
                     ("Which organisation employed {N}?", "Who did {N} work for?")),
    },
    "film": {
        "release_year": (("{S} was released in {v}.", "{P} premiere took place in {v}.", "In {v}, {s} came out."),
                         ("In which year was {N} released?", "When did {N} come out?")),
        "director": (("{S} was directed by {v}.", "{P} director was {v}.", "{v} directed {s}."),
                     ("Who directed {N}?", "Who was the director of {N}?")),
        "genre": (("{S} is a {v}.", "Critics describe {s} as a {v}.", "{P} genre is {v}."),
                  ("What is the genre of {N}?", "What kind of film is {N}?")),
        "studio": (("{S} was produced by {v}.", "{v} produced {s}.", "{P} producer was {v}."),
                   ("Which studio produced {N}?", "Who produced {N}?")),
    },
    "town": {
        "country": (("{S} lies in {v}.", "{S} is a town in {v}.", "{P} country is {v}."),
                    ("In which country is {N}?", "Which country is {N} in?")),
        "founded_year": (("{S} was founded in {v}.", "{P} founding dates to {v}.", "In {v}, {s} was founded."),
                         ("In which year was {N} founded?", "When was {N} founded?")),
        "river": (("{S} sits on the river {v}.", "The river {v} runs through {s}.", "{P} river is the {v}."),
                  ("On which river is {N}?", "Which river runs through {N}?")),
        "mayor": (("{S} is governed by the mayor {v}.", "{P} mayor is {v}.", "{v} serves as mayor of {s}."),
                  ("Who is the mayor of {N}?", "Who governs {N} as mayor?")),
    },
    "organisation": {
        "founded_year": (("{S} was established in {v}.", "{P} founding was in {v}.", "In {v}, {s} was established."),
                         ("In which year was {N} established?", "When was {N} established?")),
        "headquarters": (("{S} has its headquarters in {v}.", "{P} main office is in {v}.",
                          "{S} is based in {v}."),
                         ("Where is {N} headquartered?", "In which city is {N} based?")),
        "founder": (("{S} was founded by {v}.", "{v} founded {s}.", "{P} founder was {v}."),
                    ("Who founded {N}?", "Who was the founder of {N}?")),
        "industry": (("{S} works in {v}.", "{P} business is {v}.", "{S} is known for {v}."),
                     ("What industry is {N} in?", "What is the business of {N}?")),
    },
}


@dataclasses.dataclass(frozen=True)
class Doc:
  title: str
  pieces: tuple[tuple[str, bool], ...]  # (text, is an answer value): the text is their concatenation

  @property
  def text(self) -> str:
    return "".join(text for text, _ in self.pieces)


@dataclasses.dataclass(frozen=True)
class QA:
  title: str     # the entity (document title) it asks about
  question: str
  answer: str


@dataclasses.dataclass(frozen=True)
class Corpus:
  """What the schedules draw from; `old_*` is the base phase (empty for real data, whose model is pretrained)."""
  train_docs: tuple[Doc, ...]
  train_qa: tuple[QA, ...]
  test_docs: tuple[Doc, ...]
  test_qa: tuple[QA, ...]
  old_docs: tuple[Doc, ...] = ()
  old_qa: tuple[QA, ...] = ()

  def texts(self) -> list[str]:
    """Every text of the corpus (what a world tokenizer is trained on)."""
    docs = [*self.old_docs, *self.train_docs, *self.test_docs]
    qas = [*self.old_qa, *self.train_qa, *self.test_qa]
    return [d.text for d in docs] + [qa_prompt(q) + q.answer for q in qas]


def _word(rng: np.random.Generator, low: int, high: int) -> str:
  return "".join(rng.choice(_SYLLABLES, size=int(rng.integers(low, high + 1)))).capitalize()


class _Pools:
  """The answer values: drawn once per world, so that a value (a city, a year) recurs across entities."""

  def __init__(self, rng: np.random.Generator):
    self.rng = rng
    self.cities = self._unique(lambda: _word(rng, 1, 2) + str(rng.choice(_TOWN_ENDS)), 40)
    self.countries = self._unique(lambda: _word(rng, 2, 2) + str(rng.choice(("ia", "land", "ora"))), 16)
    self.rivers = self._unique(lambda: _word(rng, 2, 2), 20)
    self.organisations = self._unique(lambda: f"{_word(rng, 2, 2)} {rng.choice(_ORG_ENDS)}", 30)
    self.people = self._unique(self.person_name, 40)

  def _unique(self, make, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
      value = make()
      if value not in out:
        out.append(value)
    return out

  def person_name(self) -> str:
    return f"{_word(self.rng, 2, 2)} {_word(self.rng, 2, 3)}"

  def year(self) -> str:
    return str(int(self.rng.integers(1800, 2000)))

  def pick(self, values: Sequence[str]) -> str:
    return str(values[int(self.rng.integers(len(values)))])


def _entity(kind: str, pools: _Pools, taken: set[str]) -> tuple[str, dict[str, str], str]:
  """(name, {attribute: value}, pronoun key) of one new entity of `kind`."""
  rng = pools.rng
  while True:
    if kind == "person":
      name = pools.person_name()
    elif kind == "film":
      name = f"The {rng.choice(_TITLE_ADJ)} {rng.choice(_TITLE_NOUN)} of {_word(rng, 2, 2)}"
    elif kind == "town":
      name = _word(rng, 2, 2) + str(rng.choice(_TOWN_ENDS))
    else:
      name = f"{_word(rng, 2, 3)} {rng.choice(_ORG_ENDS)}"
    if name not in taken:
      taken.add(name)
      break
  if kind == "person":
    facts = dict(birth_year=pools.year(), birth_city=pools.pick(pools.cities), occupation=pools.pick(_OCCUPATIONS),
                 employer=pools.pick(pools.organisations))
    return name, facts, str(rng.choice(("she", "he")))
  if kind == "film":
    return name, dict(release_year=pools.year(), director=pools.pick(pools.people), genre=pools.pick(_GENRES),
                      studio=pools.pick(pools.organisations)), "film"
  if kind == "town":
    return name, dict(country=pools.pick(pools.countries), founded_year=pools.year(),
                      river=pools.pick(pools.rivers), mayor=pools.pick(pools.people)), "town"
  return name, dict(founded_year=pools.year(), headquarters=pools.pick(pools.cities),
                    founder=pools.pick(pools.people), industry=pools.pick(_INDUSTRIES)), "organisation"


_PRONOUNS = {"she": ("She", "she", "Her", "her"), "he": ("He", "he", "His", "his"),
             "film": ("The film", "the film", "Its", "its"), "town": ("The town", "the town", "Its", "its"),
             "organisation": ("The organisation", "the organisation", "Its", "its")}


def _document(kind: str, name: str, facts: dict[str, str], pronoun: str, rng: np.random.Generator,
              name_rate: float) -> Doc:
  """The facts in random order, each from a random paraphrase; the first mention is the name, a later one the
  name with probability `name_rate`, else a pronoun; 1-2 distractor sentences after the first."""
  sentences: list[list[tuple[str, bool]]] = []
  for i, attribute in enumerate(rng.permutation(list(facts))):
    templates = _ATTRIBUTES[kind][attribute][0]
    template = str(templates[int(rng.integers(len(templates)))])
    use_name = i == 0 or rng.random() < name_rate
    forms = (name, name, f"{name}'s", f"{name}'s") if use_name else _PRONOUNS[pronoun]
    text = template.format(S=forms[0], s=forms[1], P=forms[2], p=forms[3], v="\0")
    before, _, after = text.partition("\0")
    sentences.append([(before, False), (facts[attribute], True), (after, False)])
  for distractor in rng.choice(_DISTRACTORS, size=int(rng.integers(1, 3)), replace=False):
    sentences.insert(int(rng.integers(1, len(sentences) + 1)), [(str(distractor), False)])
  pieces: list[tuple[str, bool]] = []
  for k, sentence in enumerate(sentences):
    pieces += ([(" ", False)] if k else []) + [p for p in sentence if p[0]]
  return Doc(name, tuple(pieces))


def _questions(kind: str, name: str, facts: dict[str, str], rng: np.random.Generator) -> list[QA]:
  out = []
  for attribute, value in facts.items():
    templates = _ATTRIBUTES[kind][attribute][1]
    out.append(QA(name, str(templates[int(rng.integers(len(templates)))]).format(N=name), value))
  return out


def generate_world(*, seed: int, setting: str = "in_domain", old_per_kind: int = 40, train_entities: int = 160,
                   test_entities: int = 80, docs_per_entity: int = 2, name_rate: float = 1.0) -> Corpus:
  """The generated corpus of `setting`, a pure function of its arguments. In-domain: `train_entities` people;
  cross-domain: as many films, towns and organisations (a third each). Test: `test_entities` people."""
  if setting not in SETTINGS:
    raise ConfigError(f"config key 'data.setting': must be one of {SETTINGS}, got '{setting}'")
  rng = np.random.default_rng(seed)
  pools, taken = _Pools(rng), set()
  taken.update(pools.people)

  def make(kind: str, n: int, docs_per: int) -> tuple[list[Doc], list[QA]]:
    docs, qas = [], []
    for _ in range(n):
      name, facts, pronoun = _entity(kind, pools, taken)
      docs += [_document(kind, name, facts, pronoun, rng, name_rate) for _ in range(docs_per)]
      qas += _questions(kind, name, facts, rng)
    return docs, qas

  old = [make(kind, old_per_kind, 1) for kind in KINDS]
  test_docs, test_qa = make(TEST_KIND, test_entities, docs_per_entity)
  if setting == "in_domain":
    train = [make(TEST_KIND, train_entities, docs_per_entity)]
  else:
    others = [k for k in KINDS if k != TEST_KIND]
    train = [make(kind, -(-train_entities // len(others)), docs_per_entity) for kind in others]
  flat = lambda parts, i: tuple(x for part in parts for x in part[i])
  return Corpus(train_docs=flat(train, 0), train_qa=flat(train, 1), test_docs=tuple(test_docs), test_qa=tuple(test_qa),
                old_docs=flat(old, 0), old_qa=flat(old, 1))


def _split_of(title: str) -> str:
  return "test" if zlib.crc32(title.encode("utf-8")) % 4 == 0 else "train"


def read_wiki2023(docs_path: str, qa_path: str) -> Corpus:
  """The paper's layout as jsonl: documents `{"title", "text", "split"?}` ('train' or 'test'; default: a stable
  hash of the title puts a quarter in test) and QA pairs `{"title", "question", "answer"}` of those documents.
  A bad line is a ConfigError naming the key, the file and the line."""
  def error(key):
    return lambda message: ConfigError(f"config key '{key}': {message}")

  docs, splits = [], {}
  for line, row in jsonl_objects(docs_path, error("data.docs_path")):
    title, text, split = row.get("title"), row.get("text"), row.get("split")
    if not (isinstance(title, str) and isinstance(text, str) and title and text):
      raise ConfigError(f"config key 'data.docs_path': {os.path.expanduser(docs_path)}:{line}: needs string "
                        "'title' and 'text'")
    if split not in (None, "train", "test"):
      raise ConfigError(f"config key 'data.docs_path': {os.path.expanduser(docs_path)}:{line}: 'split' must be "
                        f"'train' or 'test', got {split!r}")
    splits[title] = split or _split_of(title)
    docs.append(Doc(title, ((text, False),)))
  qas = []
  for line, row in jsonl_objects(qa_path, error("data.qa_path")):
    title, question, answer = row.get("title"), row.get("question"), row.get("answer")
    where = f"{os.path.expanduser(qa_path)}:{line}"
    if not all(isinstance(x, str) and x for x in (title, question, answer)):
      raise ConfigError(f"config key 'data.qa_path': {where}: needs string 'title', 'question' and 'answer'")
    if title not in splits:
      raise ConfigError(f"config key 'data.qa_path': {where}: title {title!r} has no document in data.docs_path")
    qas.append(QA(title, question, answer))
  corpus = Corpus(train_docs=tuple(d for d in docs if splits[d.title] == "train"),
                  train_qa=tuple(q for q in qas if splits[q.title] == "train"),
                  test_docs=tuple(d for d in docs if splits[d.title] == "test"),
                  test_qa=tuple(q for q in qas if splits[q.title] == "test"))
  for key, part in (("train_docs", corpus.train_docs), ("train_qa", corpus.train_qa),
                    ("test_docs", corpus.test_docs), ("test_qa", corpus.test_qa)):
    if not part:
      raise ConfigError(f"config key 'data.docs_path': the data has no {key.replace('_', ' ')}")
  return corpus


def corpus_for(data_cfg) -> Corpus:
  """The corpus a config names: the Wiki2023 files when given, else the generated world."""
  if bool(data_cfg.docs_path) != bool(data_cfg.qa_path):
    key = "data.qa_path" if data_cfg.docs_path else "data.docs_path"
    raise ConfigError(f"config key '{key}': real data needs both data.docs_path and data.qa_path")
  if data_cfg.docs_path:
    if data_cfg.setting != "in_domain":
      raise ConfigError("config key 'data.setting': the Wiki2023 files give the in-domain setting only")
    return read_wiki2023(data_cfg.docs_path, data_cfg.qa_path)
  return generate_world(seed=int(data_cfg.world_seed), setting=data_cfg.setting,
                        old_per_kind=int(data_cfg.old_per_kind), train_entities=int(data_cfg.train_entities),
                        test_entities=int(data_cfg.test_entities), docs_per_entity=int(data_cfg.docs_per_entity),
                        name_rate=float(data_cfg.name_rate))


# ---- examples: (ids, per-token loss weight) with the weight of token t the weight of predicting it ----

def qa_prompt(qa: QA, doc: Doc | None = None) -> str:
  """The question as the model sees it; open-book puts the document first."""
  return (doc.text + "\n" if doc is not None else "") + f"Question: {qa.question}\nAnswer: "


def encode_doc(doc: Doc, tokenizer: Tokenizer, *, answer_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """All tokens trained (weight 1, or `answer_weight` on the tokens of an answer value), then EOS; the pieces
  are encoded one by one, so that an answer's tokens are exactly its own."""
  ids: list[int] = []
  weights: list[float] = []
  for text, is_answer in doc.pieces:
    piece = tokenizer.encode(text)
    ids += piece
    weights += [answer_weight if is_answer else 1.0] * len(piece)
  return np.asarray(ids + [tokenizer.eos_id], np.int32), np.asarray(weights + [1.0], np.float32)


def encode_qa(qa: QA, tokenizer: Tokenizer, doc: Doc | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The prompt untrained (weight 0), the answer and EOS trained."""
  prompt = tokenizer.encode(qa_prompt(qa, doc))
  answer = tokenizer.encode(qa.answer, eos=True)
  return np.asarray(prompt + answer, np.int32), np.asarray([0.0] * len(prompt) + [1.0] * len(answer), np.float32)


def encode_qa_then_doc(qas: Sequence[QA], doc: Doc, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """One sequence: the document's QA pairs (answers trained), then the document (all tokens trained)."""
  parts = [encode_qa(q, tokenizer) for q in qas] + [encode_doc(doc, tokenizer)]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ---- the schedule of a variant ----

def example_sets(corpus: Corpus, tokenizer: Tokenizer, *, answer_weight: float) -> dict[str, list]:
  """The named example sets the variants mix. `base`: the old entities' documents, their QA pairs and one
  open-book QA pair each (a document in context), standing for what a pretrained model can already do."""
  qa_of: dict[str, list[QA]] = {}
  for qa in corpus.train_qa:
    qa_of.setdefault(qa.title, []).append(qa)
  old_doc = {}
  for doc in corpus.old_docs:
    old_doc.setdefault(doc.title, doc)
  train_doc = {}
  for doc in corpus.train_docs:
    train_doc.setdefault(doc.title, doc)
  open_book = {}
  for qa in corpus.old_qa:
    open_book.setdefault(qa.title, qa)  # the first question of each old entity
  return {
      "base": [encode_doc(d, tokenizer) for d in corpus.old_docs] + [encode_qa(q, tokenizer) for q in corpus.old_qa]
              + [encode_qa(q, tokenizer, old_doc[t]) for t, q in open_book.items() if t in old_doc],
      "train_docs": [encode_doc(d, tokenizer) for d in corpus.train_docs],
      "test_docs": [encode_doc(d, tokenizer) for d in corpus.test_docs],
      "train_docs_weighted": [encode_doc(d, tokenizer, answer_weight=answer_weight) for d in corpus.train_docs],
      "test_docs_weighted": [encode_doc(d, tokenizer, answer_weight=answer_weight) for d in corpus.test_docs],
      "train_qa": [encode_qa(q, tokenizer) for q in corpus.train_qa],
      "train_qa_then_docs": [encode_qa_then_doc(qa_of.get(d.title, []), d, tokenizer) for d in corpus.train_docs],
      "train_qa_open": [encode_qa(q, tokenizer, train_doc[q.title]) for q in corpus.train_qa if q.title in train_doc],
  }


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
  name: str             # e.g. 'train_docs+test_docs'
  sets: tuple[str, ...]  # example sets mixed in the phase
  epochs: float         # passes over the phase's rows


def phase_specs(variant: str, data_cfg) -> list[PhaseSpec]:
  """The variant's phases, the base phase first (when the corpus has old entities: `with_base`)."""
  if variant not in VARIANTS:
    raise ConfigError(f"config key 'data.variant': unknown variant '{variant}' (valid: {', '.join(VARIANTS)})")
  epochs = {"docs": float(data_cfg.doc_epochs), "qa": float(data_cfg.qa_epochs)}
  specs = [PhaseSpec("base", ("base",), float(data_cfg.base_epochs))]
  return specs + [PhaseSpec("+".join(sets), sets, epochs[kind]) for sets, kind in VARIANTS[variant]]
