"""The evaluation tasks as data: what a document is, where the documents come from, how a prompt is written,
which answers are read out of a model's output and how they are scored. Nothing here touches a model;
`python -m common.evaluate` runs the tasks.

Three kinds of request, as in the EleutherAI evaluation harness (Gao et al., 2021-2024) and GPT-3's evaluation
(Brown et al., 2020, Sec. 2.4):
- `generate_until`: the model continues the prompt greedily until a stop string; answer filters read the
  answer out of the text (GSM8K's `#### N`, the last number, MATH's last `\\boxed{}`) and a metric compares it
  with the reference (exact match, or math equivalence through `common.eval.math_answers`).
- `multiple_choice`: the log-likelihood of each choice after the prompt; `acc` takes the most likely choice,
  `acc_norm` the most likely per character of the choice.
- `loglikelihood_rolling`: the log-likelihood of a whole document in windows of the model's context, reported
  as word and byte perplexity and bits per byte over the task.

Every task runs offline: without `--data_path` it evaluates a small generated (or embedded) set, never a
download. A task's few-shot examples come from its `pool`: the generated training split for the defaults,
`--fewshot_path` when given, else the other documents of the evaluated file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from typing import Callable

from common.config import ConfigError
from common.data.corpus import embedded_files, hash_score
from common.data.jsonl import jsonl_objects
from common.eval import math_data

OUTPUT_TYPES = ("generate_until", "multiple_choice", "loglikelihood_rolling")
METRICS = ("exact_match", "math_equal")  # how a generate_until answer is compared with the reference


@dataclasses.dataclass(frozen=True)
class Doc:
  """One evaluated example; each output type reads its own fields."""
  id: str
  question: str = ""
  answer: str = ""                 # generate_until: the reference final answer
  solution: str = ""               # generate_until: the worked solution a few-shot example shows
  choices: tuple[str, ...] = ()    # multiple_choice
  gold: int = -1                   # multiple_choice: index of the right choice
  text: str = ""                   # loglikelihood_rolling: the document

  def fields(self) -> dict[str, str]:
    """What a template may name: the fields, and `gold_choice`, the text of the right choice."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    out["gold_choice"] = self.choices[self.gold] if 0 <= self.gold < len(self.choices) else ""
    return out


@dataclasses.dataclass(frozen=True)
class Task:
  """A task as data. `template` writes a document's prompt, `target_template` the answer a few-shot example
  shows after `target_delimiter`; examples are joined by `fewshot_delimiter`, after `description`."""
  name: str
  output_type: str
  load: Callable[[str], list[Doc]]          # a jsonl path -> documents; '' -> the offline default
  default_pool: Callable[[], list[Doc]] | None = None  # few-shot pool of the offline default (None: none)
  template: str = "{question}"
  target_template: str = "{answer}"
  target_delimiter: str = " "
  fewshot_delimiter: str = "\n\n"
  description: str = ""
  until: tuple[str, ...] = ()               # generate_until: stop strings (cut from the output)
  filters: tuple[str, ...] = ()             # generate_until: names in common.eval.filters.FILTERS
  metric: str = "exact_match"               # generate_until: one of METRICS
  needs_path: bool = False                  # no offline default: --data_path is required

  def prompt(self, doc: Doc) -> str:
    return self.template.format(**doc.fields())

  def target(self, doc: Doc) -> str:
    return self.target_template.format(**doc.fields())


def _path_error(task: str, path: str, error: ConfigError) -> ConfigError:
  return ConfigError(f"--data_path {task}={path}: {error}")


# --- offline defaults: generated problems in the formats of GSM8K and MATH, arithmetic choices, stdlib text ---

_NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivo", "Jun")
_ITEMS = ("pencils", "stamps", "marbles", "apples", "cards", "shells")


def _rng(split: str, seed: int) -> random.Random:
  return random.Random(f"{split}/{seed}")


def generated_word_problems(split: str, count: int = 64) -> list[Doc]:
  """GSM8K-format problems (a solution ending in `#### N`, answer N) from one sentence pattern; `train` has 2-5
  boxes and `test` 6-9, so the splits share no question."""
  rng, docs, seen = _rng(f"word/{split}", 0), [], set()
  fewest = 2 if split == "train" else 6
  while len(docs) < count:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    boxes, per_box = rng.randint(fewest, fewest + 3), rng.randint(3, 12)
    given = rng.randint(1, boxes * per_box - 1)
    question = (f"{name} has {boxes} boxes with {per_box} {item} in each box and gives away {given} {item}. "
                f"How many {item} does {name} have left?")
    if question in seen:
      continue
    seen.add(question)
    total = boxes * per_box
    solution = (f"{name} has {boxes} * {per_box} = {total} {item}. After giving away {given}, {total} - {given} = "
                f"{total - given} are left.")
    docs.append(Doc(f"{split}-{len(docs)}", question=question, answer=str(total - given), solution=solution))
  return docs


def generated_math_problems(split: str, count: int = 64) -> list[Doc]:
  """MATH-format problems (LaTeX question, a solution ending in `\\boxed{}`): a product plus a fraction."""
  rng, docs = _rng(f"math/{split}", 0), []
  offset = 0 if split == "train" else 100  # the splits use disjoint denominators
  while len(docs) < count:
    a, b, c = rng.randint(2, 19), rng.randint(2, 19), rng.randint(1, 9)
    d = rng.randint(2, 9) + offset
    question = f"Compute $a b + \\frac{{c}}{{d}}$ for $a = {a}$, $b = {b}$, $c = {c}$ and $d = {d}$."
    numerator = a * b * d + c
    answer = f"\\frac{{{numerator}}}{{{d}}}" if numerator % d else str(numerator // d)
    solution = (f"We have $a b = {a * b}$, so the sum is $\\frac{{{a * b * d}}}{{{d}}} + \\frac{{{c}}}{{{d}}}$, "
                f"which is $\\boxed{{{answer}}}$.")
    docs.append(Doc(f"{split}-{len(docs)}", question=question, answer=answer, solution=solution))
  return docs


def generated_choice_problems(split: str, count: int = 64) -> list[Doc]:
  """Four-way choices of the sum of two numbers; the right choice sits at a random place."""
  rng, docs = _rng(f"choice/{split}", 0), []
  smallest = 10 if split == "train" else 55  # the splits share no question
  while len(docs) < count:
    a, b = rng.randint(smallest, smallest + 44), rng.randint(10, 99)
    wrong = rng.sample([n for n in range(a + b - 20, a + b + 21) if n != a + b], 3)
    gold = rng.randrange(4)
    choices = wrong[:gold] + [a + b] + wrong[gold:]
    docs.append(Doc(f"{split}-{len(docs)}", question=f"What is {a} plus {b}?", choices=tuple(map(str, choices)),
                    gold=gold))
  return docs


def embedded_text(count: int = 16, max_chars: int = 2000) -> list[Doc]:
  """Held-out documents of the embedded corpus (the Python standard library's text files): the files with the
  highest stable hash, first `max_chars` characters each."""
  root, rels = embedded_files()
  chosen = sorted(rels, key=hash_score)[-count:]
  docs = []
  for rel in sorted(chosen):
    with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
      docs.append(Doc(rel, text=f.read(max_chars)))
  return docs


# --- loaders of user files --------------------------------------------------------------------------------

def _math_docs(problems: list[math_data.MathProblem]) -> list[Doc]:
  return [Doc(p.id, question=p.problem, answer=p.answer, solution=p.solution) for p in problems]


def _math_loader(layout: str, default: Callable[[], list[Doc]] | None, task: str) -> Callable[[str], list[Doc]]:
  def load(path: str) -> list[Doc]:
    if not path:
      return default()
    try:
      return _math_docs(math_data.load_math_problems(path, layout))
    except ConfigError as e:
      raise _path_error(task, path, e) from None
  return load


def _unique_ids(docs: list[Doc], path: str) -> list[Doc]:
  ids = [d.id for d in docs]
  if len(set(ids)) != len(ids):
    repeated = next(i for i in ids if ids.count(i) > 1)
    raise ConfigError(f"{path}: document id '{repeated}' appears twice (ids key the per-sample logs)")
  return docs


def load_choice_jsonl(path: str) -> list[Doc]:
  """Rows `{"question": str, "choices": [str, ...], "gold": int}` (`id` optional: the line number)."""
  docs = []
  for line_no, row in jsonl_objects(path, ConfigError):
    choices, gold = row.get("choices"), row.get("gold")
    if not isinstance(row.get("question"), str) or not isinstance(choices, list) or not choices \
        or not all(isinstance(c, str) for c in choices) or not isinstance(gold, int) \
        or not 0 <= gold < len(choices):
      raise ConfigError(f"{path}:{line_no}: expected 'question' (str), 'choices' (non-empty list of str) and "
                        f"'gold' (an index into choices); the row has {sorted(row)}")
    docs.append(Doc(str(row.get("id", line_no)), question=row["question"], choices=tuple(choices), gold=gold))
  return _unique_ids(docs, path)


def load_text_jsonl(path: str) -> list[Doc]:
  """Rows `{"text": str}` (`id` optional: the line number)."""
  docs = []
  for line_no, row in jsonl_objects(path, ConfigError):
    if not isinstance(row.get("text"), str) or not row["text"]:
      raise ConfigError(f"{path}:{line_no}: expected a non-empty 'text' string; the row has {sorted(row)}")
    docs.append(Doc(str(row.get("id", line_no)), text=row["text"]))
  return _unique_ids(docs, path)


def _file_loader(read: Callable[[str], list[Doc]], default: Callable[[], list[Doc]], task: str):
  def load(path: str) -> list[Doc]:
    if not path:
      return default()
    try:
      return read(path)
    except ConfigError as e:
      raise _path_error(task, path, e) from None
  return load


# --- the registry -----------------------------------------------------------------------------------------

_GSM8K_TARGET = "{solution}\n#### {answer}"
_MATH_TEMPLATE = "Problem:\n{question}\n\nSolution:"


def _math_task(name: str, layout: str, default: Callable[[], list[Doc]] | None,
               pool: Callable[[], list[Doc]] | None) -> Task:
  """MATH-style generation, as in Minerva's few-shot prompt (Lewkowycz et al., 2022, App. D.2): the worked
  solution ends in `\\boxed{}`, graded by math equivalence of the last box."""
  return Task(name, "generate_until", _math_loader(layout, default, name), pool, template=_MATH_TEMPLATE,
              target_template="{solution}", until=("Problem:",), filters=("boxed",), metric="math_equal",
              needs_path=default is None)


TASKS: dict[str, Task] = {task.name: task for task in (
    # GSM8K (Cobbe et al., 2021): strict `#### N` (the trained format) and the last number of the output.
    Task("gsm8k", "generate_until", _math_loader("gsm8k", lambda: generated_word_problems("test"), "gsm8k"),
         lambda: generated_word_problems("train"), template="Question: {question}\nAnswer:",
         target_template=_GSM8K_TARGET, until=("Question:", "\n\n"), filters=("strict-match", "flexible-extract")),
    _math_task("math500", "math", lambda: generated_math_problems("test"), lambda: generated_math_problems("train")),
    _math_task("aime", "aime", None, None),
    _math_task("amc", "amc", None, None),
    _math_task("minerva_math", "minerva", None, None),
    _math_task("olympiadbench", "olympiadbench", None, None),
    Task("arith_choice", "multiple_choice",
         _file_loader(load_choice_jsonl, lambda: generated_choice_problems("test"), "arith_choice"),
         lambda: generated_choice_problems("train"), template="Question: {question}\nAnswer:",
         target_template="{gold_choice}"),
    Task("stdlib_text", "loglikelihood_rolling", _file_loader(load_text_jsonl, embedded_text, "stdlib_text")),
)}


def get_tasks(names: str | list[str]) -> list[Task]:
  """The tasks named (a comma-separated string or a list), in order; an unknown name is a ConfigError."""
  names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
  names = [n for n in names if n]
  if not names:
    raise ConfigError(f"--tasks: no task named (known: {', '.join(sorted(TASKS))})")
  unknown = [n for n in names if n not in TASKS]
  if unknown:
    raise ConfigError(f"--tasks: unknown task '{unknown[0]}' (known: {', '.join(sorted(TASKS))})")
  return [TASKS[n] for n in dict.fromkeys(names)]


def load_docs(task: Task, path: str = "") -> list[Doc]:
  """The documents to evaluate: the file at `path`, or the task's offline default."""
  if not path and task.needs_path:
    raise ConfigError(f"task '{task.name}' has no offline default: pass --data_path {task.name}=FILE.jsonl")
  docs = task.load(path)
  if not docs:
    raise ConfigError(f"task '{task.name}': no documents in '{path}'")
  return docs


def load_pool(task: Task, data_path: str, fewshot_path: str, docs: list[Doc]) -> list[Doc]:
  """The few-shot pool: `fewshot_path`'s documents, the offline default's training split, or (a user file
  without a few-shot file) the evaluated documents themselves, of which the sampler never picks the one
  being evaluated."""
  if fewshot_path:
    try:
      return task.load(fewshot_path)
    except ConfigError as e:
      raise ConfigError(str(e).replace("--data_path", "--fewshot_path", 1)) from None
  if not data_path and task.default_pool is not None:
    return task.default_pool()
  return docs


def doc_key(task: Task, doc: Doc, request: object) -> str:
  """What a per-sample log line is reused by: task, document id and a digest of the request (prompt, stop
  strings, token budget...), so that a changed prompt is recomputed, never served from an old line."""
  digest = hashlib.sha1(json.dumps(request, sort_keys=True).encode("utf-8")).hexdigest()[:16]
  return f"{task.name}/{doc.id}/{digest}"
