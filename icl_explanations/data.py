"""Tasks with explanations for in-context learning (Ye et al. 2023, sec. 3): generated episodes, explanation
perturbations, prompts, answer extraction, and jsonl readers for real data.

Every generated task has a per-episode latent rule that only the exemplars reveal, so a model meta-trained on
k-shot prompts has to read them (the controlled setting in which exemplar choice can matter):
- `arith`: grade-school arithmetic in which three glyphs stand for plus, minus and times, permuted per
  episode ("3 # 4 @ 2" is (3 + 4) x 2 in one episode, (3 - 4) + 2 in another); forms `add` and `mul` (one
  operator, two operands) and `mixed` (plus and times, three operands, left to right). An add-only exemplar
  reveals one glyph, a multiply-only one the other: a mixed query needs both, the complementarity of sec. 5.
- `letter`: last-letter concatenation where the letter taken (first, second or last) is the episode's rule.
- `coin`: coin flips where two nonce verbs mean "flips" and "does not flip", swapped per episode.

An explanation is natural language (the rule, e.g. "# means plus, @ means times.") and a computation trace
(e.g. "3+4=7. 7x2=14."). The trace is a list of segments tagged `op` (the rule applied) or `value` (an
intermediate state), which is what the perturbations of sec. 4 act on; the final value is never perturbed.
Splits: a problem's identity is its content without the episode's rule (operands and operators, words,
flip sequence); a stable hash puts each identity in train or test, and evaluation queries and their pools come
from test identities only.
"""
from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Sequence

import numpy as np

from common.config import ConfigError
from common.data.jsonl import jsonl_objects
from common.eval.math_data import load_gsm8k

FAMILIES = ("arith", "letter", "coin")
QUERY_FORMS = {"arith": ("add", "mul", "mixed"), "letter": ("concat",), "coin": ("flips",)}
PERTURBATIONS = ("none", "mask_ops", "mask_values", "incorrect_values", "borrowed", "no_nl", "no_trace",
                 "no_explanation")
READERS = ("gsm8k", "esnli", "ecqa", "plain")
TEST_SHARE = 0.25  # of problem identities held out for evaluation
MASK = "_"

OPS = ("plus", "minus", "times")
SYMBOL = {"plus": "+", "minus": "-", "times": "x"}
GLYPHS = ("#", "@", "&", "%", "$")
OPERANDS = range(1, 6)
WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "maple", "ocean", "falcon", "violet",
         "copper", "garden", "silver", "rocket", "meadow", "candle", "pepper", "window", "forest", "bridge",
         "orange", "planet", "marble")
POSITIONS = ("first", "second", "last")
VERBS = ("zips", "pats", "lobs", "taps", "nods", "wags")


@dataclasses.dataclass(frozen=True)
class Segment:
  text: str
  kind: str = ""     # '' fixed text | 'op' the rule applied | 'value' an intermediate state
  wrong: str = ""    # what `incorrect_values` writes instead of a value


@dataclasses.dataclass(frozen=True)
class Exemplar:
  question: str
  nl: str                        # the rule in words ('' for real data without a trace)
  trace: tuple[Segment, ...]     # the computation trace; real data: one fixed segment, the whole explanation
  answer: str
  form: str = ""                 # add | mul | mixed | minus | ... (arith), concat, flips, or the reader's name
  identity: str = ""             # the problem without the episode's rule: what the splits are made by


@dataclasses.dataclass(frozen=True)
class Episode:
  """One latent rule, a pool of exemplars and queries that share it."""
  family: str
  pool: tuple[Exemplar, ...]
  queries: tuple[Exemplar, ...]


def is_test_identity(identity: str) -> bool:
  return zlib.crc32(identity.encode("utf-8")) / 2**32 < TEST_SHARE


def _wrong_int(value: int, rng: np.random.Generator) -> str:
  return str(value + int(rng.choice([-3, -2, -1, 1, 2, 3])))


# ---------------------------------------------------------------------------------------------------------------
# Generators: each takes the episode's rule and one problem, and returns its exemplar.

def arith_rule(rng: np.random.Generator) -> dict[str, str]:
  """Operator name -> glyph, three distinct glyphs out of five."""
  return dict(zip(OPS, (str(g) for g in rng.choice(GLYPHS, size=3, replace=False))))


def arith_exemplar(rule: dict[str, str], ops: Sequence[str], operands: Sequence[int],
                   rng: np.random.Generator) -> Exemplar:
  """(a op1 b) op2 c ... left to right; the trace writes each step with the operator's symbol."""
  question = " ".join([str(operands[0])] + [f"{rule[o]} {x}" for o, x in zip(ops, operands[1:])])
  names = list(dict.fromkeys(ops))
  nl = ", ".join(f"{rule[o]} means {o}" for o in names) + "."
  trace: list[Segment] = []
  value = Segment(str(operands[0]))
  for i, (op, x) in enumerate(zip(ops, operands[1:])):
    number = int(value.text)
    result = number + x if op == "plus" else number - x if op == "minus" else number * x
    last = i == len(ops) - 1
    carried = Segment(str(result)) if last else Segment(str(result), "value", _wrong_int(result, rng))
    trace += [Segment(" " if i else ""), value, Segment(SYMBOL[op], "op"), Segment(f"{x}="), carried, Segment(".")]
    value = carried  # an intermediate is written twice, the same way under every perturbation
  form = ("add" if ops[0] == "plus" else "mul" if ops[0] == "times" else ops[0]) if len(ops) == 1 else (
      "mixed" if set(ops) == {"plus", "times"} else "-".join(ops))
  return Exemplar(question, nl, tuple(trace), value.text, form,
                  "arith:" + " ".join([str(operands[0])] + [f"{o} {x}" for o, x in zip(ops, operands[1:])]))


def letter_exemplar(position: str, words: Sequence[str], rng: np.random.Generator) -> Exemplar:
  index = {"first": 0, "second": 1, "last": -1}[position]
  letters = [w[index] for w in words]
  trace: list[Segment] = []
  for i, (w, ch) in enumerate(zip(words, letters)):
    other = str(rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != ch]))
    trace += [Segment(" " if i else ""), Segment(w), Segment(":"), Segment(ch, "value", other), Segment(".")]
  trace += [Segment(" "), Segment("".join(letters)), Segment(".")]
  return Exemplar(" ".join(words), f"take the {position} letter.", tuple(trace), "".join(letters), "concat",
                  "letter:" + " ".join(words))


def coin_exemplar(rule: dict[str, str], start: str, moves: Sequence[bool], rng: np.random.Generator) -> Exemplar:
  """`rule`: 'flip' and 'keep' -> verb; moves: whether each move flips the coin."""
  del rng  # a coin state's wrong value is its opposite
  flip = {"heads": "tails", "tails": "heads"}
  question = f"{start}. " + " ".join(f"{rule['flip' if flips else 'keep']}." for flips in moves)
  nl = f"{rule['flip']} flips, {rule['keep']} keeps."
  state, trace = start, [Segment(start), Segment(".")]
  for i, flips in enumerate(moves):
    state = flip[state] if flips else state
    last = i == len(moves) - 1
    trace += [Segment(" "), Segment(rule["flip" if flips else "keep"], "op"), Segment(" "),
              Segment(state, "" if last else "value", flip[state]), Segment(".")]
  return Exemplar(question, nl, tuple(trace), state, "flips",
                  f"coin:{start} " + "".join("f" if f else "k" for f in moves))


def _arith_problem(form: str, rng: np.random.Generator) -> tuple[list[str], list[int]]:
  if form in ("add", "mul", "minus"):
    ops = [{"add": "plus", "mul": "times"}.get(form, form)]
  elif form == "mixed":
    ops = [str(o) for o in rng.permutation(["plus", "times"])]
  else:  # any two distinct operators: the other mixed forms of meta-training and of the pools
    ops = [str(o) for o in rng.choice(OPS, size=2, replace=False)]
  return ops, [int(x) for x in rng.choice(OPERANDS, size=len(ops) + 1)]


POOL_FORMS = {"arith": ("add", "mul", "minus", "pair"), "letter": ("concat",), "coin": ("flips",)}


def _draw(family: str, form: str, rule, rng: np.random.Generator) -> Exemplar:
  if family == "arith":
    return arith_exemplar(rule, *_arith_problem(form, rng), rng)
  if family == "letter":
    return letter_exemplar(rule, [str(w) for w in rng.choice(WORDS, size=2, replace=False)], rng)
  moves = [bool(f) for f in rng.integers(2, size=int(rng.integers(2, 4)))]
  return coin_exemplar(rule, str(rng.choice(["heads", "tails"])), moves, rng)


def _rule(family: str, rng: np.random.Generator):
  if family == "arith":
    return arith_rule(rng)
  if family == "letter":
    return str(rng.choice(POSITIONS))
  verbs = [str(v) for v in rng.choice(VERBS, size=2, replace=False)]
  return dict(flip=verbs[0], keep=verbs[1])


def make_episode(family: str, rng: np.random.Generator, *, split: str, pool_size: int, queries: int,
                 query_form: str = "", pool_forms: Sequence[str] = (), max_tries: int = 200) -> Episode:
  """An episode of `family` whose pool and queries all come from `split` ('train' or 'test') identities, the
  queries of `query_form` (default: any query form of the family; in training any pool form), pool slot i
  of `pool_forms[i]` when given (default: any pool form), pool and queries never the same problem."""
  if family not in FAMILIES:
    raise ConfigError(f"unknown task family '{family}' (valid: {', '.join(FAMILIES)})")
  forms = set(QUERY_FORMS[family]) | set(POOL_FORMS[family])
  bad = [f for f in (query_form, *pool_forms) if f and f not in forms]
  if bad:
    raise ConfigError(f"task family '{family}': unknown form '{bad[0]}' (valid: {', '.join(sorted(forms))})")
  rule = _rule(family, rng)
  want_test = split == "test"
  seen: set[str] = set()

  def draw(forms: Sequence[str]) -> Exemplar:
    for _ in range(max_tries):
      ex = _draw(family, str(rng.choice(forms)), rule, rng)
      if is_test_identity(ex.identity) == want_test and ex.identity not in seen:
        seen.add(ex.identity)
        return ex
    raise ConfigError(f"task family '{family}': no new {split} problem of forms {list(forms)} in {max_tries} draws")

  # meta-training queries come in every form, so that no operator of a query can be guessed by elimination
  query_forms = (query_form,) if query_form else POOL_FORMS[family] if split == "train" else QUERY_FORMS[family]
  qs = tuple(draw(query_forms) for _ in range(queries))
  pool = tuple(draw((pool_forms[i],) if pool_forms else POOL_FORMS[family]) for i in range(pool_size))
  return Episode(family, pool, qs)


# ---------------------------------------------------------------------------------------------------------------
# Explanations and their perturbations (sec. 4).

def _trace_text(trace: Sequence[Segment], replace: dict[str, str | None]) -> str:
  """The trace with segments of each kind in `replace` written as MASK (value None: as their wrong value)."""
  out = []
  for seg in trace:
    if seg.kind in replace:
      out.append(seg.wrong if replace[seg.kind] is None else replace[seg.kind])
    else:
      out.append(seg.text)
  return "".join(out)


def explanation(ex: Exemplar, perturbation: str = "none", borrowed_from: Exemplar | None = None) -> str:
  """The exemplar's explanation under `perturbation` (PERTURBATIONS); `borrowed` takes `borrowed_from`'s."""
  if perturbation not in PERTURBATIONS:
    raise ConfigError(f"unknown perturbation '{perturbation}' (valid: {', '.join(PERTURBATIONS)})")
  if perturbation == "borrowed":
    if borrowed_from is None:
      raise ValueError("the 'borrowed' perturbation needs another exemplar's explanation")
    return explanation(borrowed_from)
  replace = {"mask_ops": {"op": MASK}, "mask_values": {"value": MASK},
             "incorrect_values": {"value": None}}.get(perturbation, {})
  trace = _trace_text(ex.trace, replace)
  parts = {"no_nl": [trace], "no_trace": [ex.nl], "no_explanation": []}.get(perturbation, [ex.nl, trace])
  return " ".join(p for p in parts if p)


def answer_text(ex: Exemplar, perturbation: str = "none", borrowed_from: Exemplar | None = None) -> str:
  """What follows 'A:' for an exemplar: its explanation and 'The answer is X.'"""
  text = explanation(ex, perturbation, borrowed_from)
  return (text + " " if text else "") + f"The answer is {ex.answer}."


def prompt(exemplars: Sequence[Exemplar], query: Exemplar, perturbation: str = "none") -> str:
  """`Q: ... A: <explanation> The answer is X.` per exemplar (blank line between), then the query's `Q: ... A:`;
  `borrowed` gives each exemplar the explanation of the next one (cyclically)."""
  blocks = []
  for i, ex in enumerate(exemplars):
    donor = exemplars[(i + 1) % len(exemplars)] if len(exemplars) > 1 else None
    if perturbation == "borrowed" and donor is None:
      raise ConfigError("perturbation 'borrowed' needs at least two exemplars (shots >= 2)")
    blocks.append(f"Q: {ex.question}\nA: {answer_text(ex, perturbation, donor)}")
  blocks.append(f"Q: {query.question}\nA:")
  return "\n\n".join(blocks)


_ANSWER = re.compile(r"The answer is\s+(.+?)\s*(?:\.\s*$|\.\s|\n|$)")


def extract_answer(text: str) -> str | None:
  """The X of the first 'The answer is X.' in a generation (thousands commas and a '$' dropped); None when
  there is none."""
  found = _ANSWER.search(text)
  if not found:
    return None
  answer = found.group(1).strip().rstrip(".").strip()
  if re.fullmatch(r"-?\$?[\d,]+(\.\d+)?", answer):
    answer = answer.replace(",", "").replace("$", "")
  return answer or None


# ---------------------------------------------------------------------------------------------------------------
# Real data: one jsonl file of exemplars (the pool is its train split, the queries its test split).

def _field(row: dict, key: str, where: str) -> str:
  value = row.get(key)
  if not isinstance(value, (str, int, float)) or isinstance(value, bool) or str(value).strip() == "":
    raise ConfigError(f"{where}: missing or empty field '{key}'")
  return str(value).strip()


def _plain(explained: str) -> tuple[Segment, ...]:
  return (Segment(explained),) if explained else ()


def read_exemplars(path: str, reader: str = "plain") -> list[Exemplar]:
  """Exemplars of a jsonl file. `gsm8k`: {question, answer '... #### N'} (common.eval.math_data; the worked
  solution is the explanation); `esnli`: {premise, hypothesis, label, explanation}; `ecqa`: {question,
  choices [..], answer, explanation}; `plain`: {question, explanation, answer}. A bad line names the file and
  line; the split of each line is the hash of its question, as for generated problems."""
  if reader not in READERS:
    raise ConfigError(f"unknown reader '{reader}' (valid: {', '.join(READERS)})")
  if reader == "gsm8k":
    return [Exemplar(p.problem, "", _plain(p.solution), p.answer, "gsm8k", p.problem) for p in load_gsm8k(path)]
  out = []
  for line_no, row in jsonl_objects(path, ConfigError):
    where = f"{path}:{line_no}"
    if reader == "esnli":
      question = f"Premise: {_field(row, 'premise', where)} Hypothesis: {_field(row, 'hypothesis', where)}"
    elif reader == "ecqa":
      choices = row.get("choices")
      if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}: field 'choices' must be a non-empty list")
      question = f"{_field(row, 'question', where)} Options: {', '.join(map(str, choices))}"
    else:
      question = _field(row, "question", where)
    answer = _field(row, "label" if reader == "esnli" else "answer", where)
    out.append(Exemplar(question, "", _plain(_field(row, "explanation", where)), answer, reader, question))
  if not out:
    raise ConfigError(f"{path}: no exemplars in the file")
  return out


def split_exemplars(exemplars: Sequence[Exemplar]) -> tuple[list[Exemplar], list[Exemplar]]:
  """(pool, queries) of real data by the identity hash: no query is ever its own exemplar."""
  pool = [e for e in exemplars if not is_test_identity(e.identity)]
  queries = [e for e in exemplars if is_test_identity(e.identity)]
  return pool, queries
