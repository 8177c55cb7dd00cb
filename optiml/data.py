"""OPT-IML Bench in miniature (Iyer et al. 2022, sec. 3): instruction tasks with a category, a source benchmark,
instruction templates and a metric; the three levels of held-out evaluation; the leakage filter; prompts with
and without demonstrations; the training mixture.

Tasks come from a generated suite (`generated_suite`: 65 tasks in 13 categories, offline, a pure function of
a seed), Super-NaturalInstructions task files (`read_niv2_task`) or PromptSource/FLAN-style jsonl
(`read_prompt_jsonl`). The paper's three generalisation levels (sec. 3.2) are made by `split_suite`:
  fully held-out categories  every task of `heldout_categories` is evaluation-only;
  held-out tasks             `heldout_tasks_per_category` tasks of each other category are evaluation-only;
  held-out instances         `eval_instances` instances of each training task are kept out of training.
Evaluation instances that share too many word n-grams with training text are dropped (`leakage_filter`),
as the paper removes near-duplicates of evaluation data from its training tasks.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import string
import zlib
from typing import Callable, Sequence

import numpy as np

from common.config import ConfigError
from common.data.jsonl import jsonl_objects

BENCHMARKS = ("crossfit", "exmix", "flan", "niv2", "promptsource", "t5", "unifiedskg")
COMPONENTS = ("reasoning", "dialogue")  # optional mixture components, training-only (sec. 4.5)
METRICS = ("exact_match", "rouge_l", "accuracy")
LEVELS = ("heldout_category", "heldout_task", "heldout_instance")


@dataclasses.dataclass(frozen=True)
class Instance:
  input: str
  output: str                  # the reference a model is trained on
  references: tuple[str, ...]  # every accepted output (the first is `output`)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  category: str
  benchmark: str
  templates: tuple[str, ...]   # instructions; the prompt is an instruction, demonstrations, then the input
  metric: str                  # 'exact_match' | 'rouge_l' | 'accuracy' (rank classification over `options`)
  instances: tuple[Instance, ...]
  options: tuple[str, ...] = ()
  demos: tuple[Instance, ...] = ()  # the task's own worked examples (NIv2 'Positive Examples'), if it has any


def instance(input_text: str, output) -> Instance:
  refs = tuple(output) if isinstance(output, (list, tuple)) else (output,)
  return Instance(input_text, refs[0], refs)


# --- the generated suite ---------------------------------------------------------------------------------

WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "maple", "ocean", "falcon", "violet",
         "copper", "garden", "silver", "rocket", "meadow", "candle", "forest", "basket", "window", "pepper",
         "saddle", "winter", "bridge", "marble", "planet", "button", "castle", "ladder", "orange", "pencil",
         "rabbit", "spider", "tunnel", "wagon", "zebra", "anchor", "blossom", "cactus", "dragon")
ANIMALS = ("tiger", "zebra", "rabbit", "spider", "falcon", "horse", "camel", "otter", "eagle", "mouse", "llama",
           "panda", "whale", "goose")
FRUITS = ("apple", "lemon", "mango", "peach", "grape", "melon", "cherry", "banana", "plum", "papaya", "kiwi",
          "guava", "lime", "pear")
COLORS = ("red", "blue", "green", "yellow", "purple", "black", "white", "brown", "pink", "gray")
NAMES = ("Alice", "Bruno", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kira", "Luca",
         "Maya", "Nils", "Olga", "Pablo")
CITIES = ("Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Berlin", "Dublin", "Vienna", "Lisbon", "Prague", "Quito",
          "Seoul")
POSITIVE = ("happy", "great", "lovely", "bright", "kind", "brave", "calm", "joyful", "superb", "gentle")
NEGATIVE = ("sad", "awful", "gloomy", "cruel", "angry", "nasty", "bitter", "dreary", "rude", "grim")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOWELS = set("aeiou")


def _pick(rng, pool):
  return str(pool[int(rng.integers(len(pool)))])


def _numbers(rng, lo=0, hi=100, size=None):
  size = int(rng.integers(3, 6)) if size is None else size
  return [int(x) for x in rng.integers(lo, hi, size=size)]


def _words(rng, size=None):
  size = int(rng.integers(2, 5)) if size is None else size
  return [str(w) for w in rng.choice(WORDS, size=size, replace=False)]


def _join(xs) -> str:
  return " ".join(str(x) for x in xs)


def _shift(word: str, k: int) -> str:
  return "".join(chr((ord(c) - 97 + k) % 26 + 97) if c in string.ascii_lowercase else c for c in word)


def _codebook(seed: int) -> dict[str, str]:
  """A made-up language: each word of WORDS has a fixed code word (consonant-vowel syllables)."""
  rng = np.random.default_rng(seed)
  cons, vows = "bdfgklmnprstvz", "aeiou"
  out = {}
  for w in WORDS:
    while True:
      code = "".join(cons[int(rng.integers(len(cons)))] + vows[int(rng.integers(len(vows)))] for _ in range(3))
      if code not in out.values():
        out[w] = code
        break
  return out


def _sequence(rng):
  start, step = int(rng.integers(0, 40)), int(rng.integers(2, 10))
  return [start + step * i for i in range(4)], start + step * 4


def _pattern(rng):
  a, b = (str(w) for w in rng.choice(COLORS, size=2, replace=False))
  length = int(rng.integers(3, 6))
  seq = [(a, b)[i % 2] for i in range(length)]
  return _join(seq), (a, b)[length % 2]


def _dedupe(xs):
  return list(dict.fromkeys(xs))


def _generators(seed: int) -> dict[str, list[tuple[str, str, Callable, tuple[str, ...]]]]:
  """{category: [(task name, instruction, rng -> (input, output), options)]}."""
  code = _codebook(seed + 1)
  decode = {v: k for k, v in code.items()}
  tf = ("true", "false")
  yn = ("yes", "no")

  def words_then(f):
    def gen(rng):
      ws = _words(rng)
      return _join(ws), f(ws)
    return gen

  def word_then(f, pool=WORDS):
    def gen(rng):
      w = _pick(rng, pool)
      return w, f(w)
    return gen

  def numbers_then(f, **kw):
    def gen(rng):
      xs = _numbers(rng, **kw)
      return _join(xs), f(xs)
    return gen

  def two(f, lo=0, hi=100):
    def gen(rng):
      a, b = (int(x) for x in rng.integers(lo, hi, size=2))
      return f"{a} {b}", f(a, b)
    return gen

  def sentence(pool, frame):
    def gen(rng):
      x = _pick(rng, pool)
      return frame(rng, x), x
    return gen

  def bools(word, op):
    def gen(rng):
      values = [bool(v) for v in rng.integers(0, 2, size=int(rng.integers(2, 5)))]
      return f" {word} ".join(str(v).lower() for v in values), str(op(values)).lower()
    return gen

  def negations(rng):
    value, count = _pick(rng, tf), int(rng.integers(1, 5))
    return "not " * count + value, value if count % 2 == 0 else tf[1 - tf.index(value)]

  def common_item(rng):
    shared = _pick(rng, WORDS)
    rest = [w for w in WORDS if w != shared]
    a, b = (list(rng.choice(rest, size=2, replace=False)) for _ in range(2))
    a = [str(w) for w in a if w not in b] + [shared]
    rng.shuffle(a)
    b = [str(w) for w in b] + [shared]
    rng.shuffle(b)
    return f"{_join(a)} | {_join(b)}", shared

  def missing_number(rng):
    start = int(rng.integers(0, 50))
    xs = list(range(start, start + 5))
    gone = xs.pop(int(rng.integers(1, 4)))
    return _join(xs), str(gone)

  def first_repeated(rng):
    ws = _words(rng, 4)
    dup = ws[int(rng.integers(0, 3))]
    at = int(rng.integers(ws.index(dup) + 1, 5))
    ws.insert(at, dup)
    return _join(ws), dup

  def distinct_count(rng):
    ws = [str(w) for w in rng.choice(WORDS[:6], size=int(rng.integers(3, 7)))]
    return _join(ws), str(len(set(ws)))

  def count_item(rng):
    xs = [str(w) for w in rng.choice(COLORS[:4], size=int(rng.integers(3, 7)))]
    target = xs[int(rng.integers(len(xs)))]
    return f"{target}: {_join(xs)}", str(xs.count(target))

  return {
      "string_edit": [
          ("reverse_word", "Write the word backwards.", word_then(lambda w: w[::-1]), ()),
          ("uppercase_word", "Write the word in capital letters.", word_then(str.upper), ()),
          ("first_letter", "Give the first letter of the word.", word_then(lambda w: w[0]), ()),
          ("last_letter", "Give the last letter of the word.", word_then(lambda w: w[-1]), ()),
          ("remove_vowels", "Delete every vowel from the word.",
           word_then(lambda w: "".join(c for c in w if c not in VOWELS)), ()),
      ],
      "list_ops": [
          ("sort_numbers", "Sort the numbers from smallest to largest.", numbers_then(lambda x: _join(sorted(x))), ()),
          ("reverse_list", "List the items in reverse order.", words_then(lambda x: _join(x[::-1])), ()),
          ("first_item", "Give the first item of the list.", words_then(lambda x: x[0]), ()),
          ("last_item", "Give the last item of the list.", words_then(lambda x: x[-1]), ()),
          ("max_number", "Give the largest number.", numbers_then(lambda x: str(max(x))), ()),
          ("min_number", "Give the smallest number.", numbers_then(lambda x: str(min(x))), ()),
      ],
      "arithmetic": [
          ("add", "Add the two numbers.", two(lambda a, b: str(a + b)), ()),
          ("subtract", "Subtract the smaller number from the larger.", two(lambda a, b: str(abs(a - b))), ()),
          ("multiply", "Multiply the two numbers.", two(lambda a, b: str(a * b), 0, 13), ()),
          ("double", "Double the number.", numbers_then(lambda x: str(2 * x[0]), size=1, hi=500), ()),
          ("successor", "Give the next whole number.", numbers_then(lambda x: str(x[0] + 1), size=1, hi=1000), ()),
      ],
      "classification": [
          ("even_odd", "Is the number even or odd?",
           numbers_then(lambda x: ("even", "odd")[x[0] % 2], size=1, hi=1000), ("even", "odd")),
          ("sentiment", "Is the word positive or negative?",
           word_then(lambda w: "positive" if w in POSITIVE else "negative", POSITIVE + NEGATIVE),
           ("positive", "negative")),
          ("animal_or_fruit", "Is it an animal or a fruit?",
           word_then(lambda w: "animal" if w in ANIMALS else "fruit", ANIMALS + FRUITS), ("animal", "fruit")),
          ("big_or_small", "Is the number big (50 or more) or small?",
           numbers_then(lambda x: "big" if x[0] >= 50 else "small", size=1), ("big", "small")),
          ("starts_with_vowel", "Does the word start with a vowel?",
           word_then(lambda w: "yes" if w[0] in VOWELS else "no"), yn),
      ],
      "extraction": [
          ("extract_number", "Which number is in the sentence?",
           sentence([str(i) for i in range(100)], lambda r, x: f"the box holds {x} {_pick(r, FRUITS)}s"), ()),
          ("extract_color", "Which colour is mentioned?",
           sentence(COLORS, lambda r, x: f"{_pick(r, NAMES)} painted the {_pick(r, WORDS)} {x}"), ()),
          ("extract_name", "Who is the person in the sentence?",
           sentence(NAMES, lambda r, x: f"yesterday {x} found a {_pick(r, WORDS)}"), ()),
          ("extract_city", "Which city is named?",
           sentence(CITIES, lambda r, x: f"{_pick(r, NAMES)} flew to {x} in {_pick(r, COLORS)} shoes"), ()),
          ("extract_animal", "Which animal is mentioned?",
           sentence(ANIMALS, lambda r, x: f"a {_pick(r, COLORS)} {x} sat near the {_pick(r, WORDS)}"), ()),
      ],
      "translation": [
          ("shift_encode", "Shift every letter one step forward in the alphabet.",
           word_then(lambda w: _shift(w, 1)), ()),
          ("shift_decode", "Shift every letter one step back in the alphabet.",
           lambda r: (lambda w: (_shift(w, 1), w))(_pick(r, WORDS)), ()),
          ("digits_to_words", "Spell out each digit.",
           numbers_then(lambda x: _join(DIGITS[d] for d in x), hi=10), ()),
          ("words_to_digits", "Write each spelled digit as a numeral.",
           lambda r: (lambda x: (_join(DIGITS[d] for d in x), _join(x)))(_numbers(r, hi=10)), ()),
          ("to_code", "Translate the words into the code language.",
           words_then(lambda x: _join(code[w] for w in x)), ()),
          ("from_code", "Translate the code words into English.",
           lambda r: (lambda x: (_join(code[w] for w in x), _join(x)))(_words(r)), ()),
      ],
      "counting": [
          ("count_words", "How many words are there?", words_then(lambda x: str(len(x))), ()),
          ("word_length", "How many letters does the word have?", word_then(lambda w: str(len(w))), ()),
          ("count_vowels", "How many vowels does the word have?",
           word_then(lambda w: str(sum(c in VOWELS for c in w))), ()),
          ("count_numbers", "How many numbers are listed?", numbers_then(lambda x: str(len(x))), ()),
          ("count_item", "How many times does the first colour appear in the list?", count_item, ()),
      ],
      "comparison": [
          ("larger_number", "Which number is larger?", two(lambda a, b: str(max(a, b))), ()),
          ("smaller_number", "Which number is smaller?", two(lambda a, b: str(min(a, b))), ()),
          ("longer_word", "Which word is longer?",
           lambda r: (lambda a, b: (f"{a} {b}", a if len(a) >= len(b) else b))(*_words(r, 2)), ()),
          ("alphabetical_first", "Which word comes first in the alphabet?",
           lambda r: (lambda ws: (_join(ws), min(ws)))(_words(r, 2)), ()),
          ("same_or_different", "Are the two numbers the same or different?",
           lambda r: (lambda a, b: (f"{a} {b}", "same" if a == b else "different"))(
               *(lambda a: (a, a if r.integers(2) else int(r.integers(0, 20))))(int(r.integers(0, 20)))),
           ("same", "different")),
      ],
      "sequence": [
          ("next_number", "Continue the sequence with the next number.",
           lambda r: (lambda s: (_join(s[0]), str(s[1])))(_sequence(r)), ()),
          ("next_letter", "Give the letter that follows in the alphabet.",
           lambda r: (lambda i: (string.ascii_lowercase[i], string.ascii_lowercase[i + 1]))(int(r.integers(25))), ()),
          ("previous_letter", "Give the letter that comes before in the alphabet.",
           lambda r: (lambda i: (string.ascii_lowercase[i], string.ascii_lowercase[i - 1]))(int(r.integers(1, 26))),
           ()),
          ("continue_pattern", "Continue the pattern with the next colour.", _pattern, ()),
          ("count_by_ten", "Add ten to the number.", numbers_then(lambda x: str(x[0] + 10), size=1, hi=1000), ()),
      ],
      "formatting": [
          ("join_dashes", "Join the words with dashes.", words_then(lambda x: "-".join(x)), ()),
          ("snake_case", "Join the words with underscores.", words_then(lambda x: "_".join(x)), ()),
          ("capitalize_words", "Capitalise every word.", words_then(lambda x: _join(w.capitalize() for w in x)), ()),
          ("comma_list", "Separate the words with commas.", words_then(lambda x: ", ".join(x)), ()),
          ("bracket_words", "Put each word in brackets.", words_then(lambda x: _join(f"[{w}]" for w in x)), ()),
      ],
      "set_ops": [
          ("dedupe", "Remove repeated words, keeping the first of each.",
           lambda r: (lambda ws: (_join(ws), _join(_dedupe(ws))))([str(w) for w in r.choice(WORDS[:5], size=5)]),
           ()),
          ("common_item", "Which word is in both lists?", common_item, ()),
          ("missing_number", "Which number is missing from the run?", missing_number, ()),
          ("first_repeated", "Which word appears twice?", first_repeated, ()),
          ("distinct_count", "How many different words are there?", distinct_count, ()),
      ],
      "logic": [
          ("and_gate", "Evaluate the logical expression.", bools("and", all), tf),
          ("or_gate", "Evaluate the logical expression.", bools("or", any), tf),
          ("xor_gate", "Evaluate the logical expression.", bools("xor", lambda v: sum(v) % 2 == 1), tf),
          ("not_gate", "Evaluate the negations.", negations, tf),
          ("nand_gate", "Is it true that not all of the values are true?", bools(",", lambda v: not all(v)), tf),
      ],
      "composition": [
          ("concat_words", "Join the two words without a space.", lambda r: (lambda ws: (_join(ws), "".join(ws)))(
              _words(r, 2)), ()),
          ("repeat_word", "Write the word twice.", word_then(lambda w: f"{w} {w}"), ()),
          ("swap_words", "Swap the two words.", lambda r: (lambda ws: (_join(ws), _join(ws[::-1])))(_words(r, 2)), ()),
          ("middle_word", "Give the middle word.", lambda r: (lambda ws: (_join(ws), ws[1]))(_words(r, 3)), ()),
          ("last_two_letters", "Give the last two letters of the word.", word_then(lambda w: w[-2:]), ()),
      ],
      # Optional mixture components (training only): chain-of-thought arithmetic and short dialogues.
      "reasoning": [
          ("sum_three_cot", "Add the three numbers. Think step by step.",
           lambda r: (lambda a, b, c: (f"{a} {b} {c}", f"{a} + {b} = {a + b}, {a + b} + {c} = {a + b + c}. "
                                       f"The answer is {a + b + c}"))(*_numbers(r, size=3, hi=50)), ()),
          ("double_then_add_cot", "Double the first number, then add the second. Think step by step.",
           lambda r: (lambda a, b: (f"{a} {b}", f"2 * {a} = {2 * a}, {2 * a} + {b} = {2 * a + b}. "
                                    f"The answer is {2 * a + b}"))(*_numbers(r, size=2, hi=50)), ()),
      ],
      "dialogue": [
          ("chat_reply", "Reply to the user as a helpful assistant.",
           lambda r: (lambda n, w: (f"User: hi, I am {n}. can you spell {w} backwards?",
                                    f"Hello {n}! {w} backwards is {w[::-1]}."))(_pick(r, NAMES), _pick(r, WORDS)), ()),
          ("chat_colour", "Reply to the user as a helpful assistant.",
           lambda r: (lambda n, c: (f"User: my name is {n} and I like {c}. what colour do I like?",
                                    f"You like {c}, {n}."))(_pick(r, NAMES), _pick(r, COLORS)), ()),
      ],
  }


SUITE_SIZES = (24, 48, 96, 192, 384)  # instances per generated task, cycled: the cap has something to cut


def metric_for(options: Sequence[str], references: Sequence[str]) -> str:
  """Rank classification where a task has options, ROUGE-L where answers run to several words, else EM."""
  if options:
    return "accuracy"
  return "rouge_l" if any(" " in r for r in references) else "exact_match"


@functools.lru_cache(maxsize=4)
def generated_suite(seed: int = 0, sizes: tuple[int, ...] = SUITE_SIZES) -> tuple[TaskSpec, ...]:
  """Every generated task, a pure function of `seed` (built once per process); benchmarks assigned in turn
  over BENCHMARKS (reasoning and dialogue tasks are their own components). Instances are distinct within a
  task."""
  tasks = []
  index = 0
  for category, entries in _generators(seed).items():
    for name, instruction, gen, options in entries:
      rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
      want = int(sizes[index % len(sizes)])
      seen, instances = set(), []
      for _ in range(want * 20):
        x, y = gen(rng)
        if x not in seen:
          seen.add(x)
          instances.append(instance(x, y))
          if len(instances) == want:
            break
      benchmark = category if category in COMPONENTS else BENCHMARKS[index % len(BENCHMARKS)]
      templates = (instruction, f"{instruction} Answer briefly.")
      tasks.append(TaskSpec(name, category, benchmark, templates,
                            metric_for(options, [i.output for i in instances]), tuple(instances), tuple(options)))
      index += 1
  return tuple(tasks)


# --- importers ---------------------------------------------------------------------------------------------


def _text(value, where: str) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
    return "\n".join(value)
  raise ConfigError(f"{where}: expected a string or a list of strings")


def _outputs(value, where: str) -> tuple[str, ...]:
  if isinstance(value, str):
    return (value,)
  if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
    return tuple(value)
  raise ConfigError(f"{where}: expected a string or a non-empty list of strings")


def _examples(items, where: str, required: bool) -> tuple[Instance, ...]:
  if items is None and not required:
    return ()
  if not isinstance(items, list):
    raise ConfigError(f"{where}: expected a list")
  out = []
  for i, item in enumerate(items):
    if not isinstance(item, dict) or "input" not in item or "output" not in item:
      raise ConfigError(f"{where}[{i}]: expected an object with 'input' and 'output'")
    refs = _outputs(item["output"], f"{where}[{i}].output")
    out.append(Instance(_text(item["input"], f"{where}[{i}].input"), refs[0], refs))
  if required and not out:
    raise ConfigError(f"{where}: no instances")
  return tuple(out)


def read_niv2_task(path: str, category: str = "", benchmark: str = "niv2") -> TaskSpec:
  """A Super-NaturalInstructions task file: `Definition` (a string, or a list of strings in the newer
  release), `Positive Examples` (the task's demonstrations), `Negative Examples` (read, not trained on),
  `Instances` (`output` a string or a list of accepted strings), `Categories` (its first entry is the
  category unless `category` is given). Errors name the file and the field. Metric: ROUGE-L, as the
  benchmark reports it."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise ConfigError(f"{path}: no such file")
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: not a JSON task file ({e})") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: expected a JSON object")
  for field in ("Definition", "Instances"):
    if field not in raw:
      raise ConfigError(f"{path}: missing field '{field}'")
  definition = _text(raw["Definition"], f"{path}: field 'Definition'")
  demos = _examples(raw.get("Positive Examples"), f"{path}: field 'Positive Examples'", False)
  _examples(raw.get("Negative Examples"), f"{path}: field 'Negative Examples'", False)
  instances = _examples(raw["Instances"], f"{path}: field 'Instances'", True)
  if not category:
    cats = raw.get("Categories")
    if not (isinstance(cats, list) and cats and isinstance(cats[0], str)):
      raise ConfigError(f"{path}: field 'Categories' must be a non-empty list of strings (or give a category)")
    category = cats[0]
  name = os.path.splitext(os.path.basename(path))[0]
  return TaskSpec(name, _slug(category), benchmark, (definition,), "rouge_l", instances, (), demos)


def read_niv2_dir(folder: str) -> list[TaskSpec]:
  """Every `*.json` task file of a Super-NaturalInstructions `tasks/` folder, sorted by name."""
  folder = os.path.expanduser(folder)
  if not os.path.isdir(folder):
    raise ConfigError(f"config key 'data.niv2_dir': {folder}: no such folder")
  names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
  if not names:
    raise ConfigError(f"config key 'data.niv2_dir': {folder} holds no .json task files")
  return [read_niv2_task(os.path.join(folder, n)) for n in names]


def read_prompt_jsonl(path: str, category: str = "", benchmark: str = "promptsource") -> TaskSpec:
  """A PromptSource/FLAN-style task: one example a line, `{"inputs", "targets"}` or `{"prompt", "completion"}`
  (a target may be a list of accepted strings); the instruction is already inside the input. The task's name
  is the file's stem and, unless given, so is its category. Errors name the file, the line and the field."""
  error = lambda message: ConfigError(message)
  out = []
  for line_no, row in jsonl_objects(path, error):
    where = f"{os.path.expanduser(path)}:{line_no}"
    if "inputs" in row or "targets" in row:
      keys = ("inputs", "targets")
    elif "prompt" in row or "completion" in row:
      keys = ("prompt", "completion")
    else:
      raise ConfigError(f"{where}: needs 'inputs' and 'targets' (or 'prompt' and 'completion')")
    for key in keys:
      if key not in row:
        raise ConfigError(f"{where}: missing field '{key}'")
    x = _text(row[keys[0]], f"{where}: field '{keys[0]}'")
    refs = _outputs(row[keys[1]], f"{where}: field '{keys[1]}'")
    out.append(Instance(x, refs[0], refs))
  if not out:
    raise ConfigError(f"{os.path.expanduser(path)}: no examples")
  name = os.path.splitext(os.path.basename(path))[0]
  return TaskSpec(name, _slug(category or name), benchmark, ("",), metric_for((), [i.output for i in out]),
                  tuple(out))


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "uncategorised"


# --- splits and the leakage filter ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
  train: tuple[TaskSpec, ...]                # training tasks, their held-out instances removed
  evals: dict                                # level -> tuple of (task, eval instances, demo pool)
  components: tuple[TaskSpec, ...] = ()      # reasoning / dialogue tasks (training-only)
  dropped: int = 0                           # evaluation instances the leakage filter removed


def _stable_order(task: TaskSpec, seed: int) -> list[int]:
  return list(np.random.default_rng([seed, zlib.crc32(task.name.encode())]).permutation(len(task.instances)))


def split_suite(tasks: Sequence[TaskSpec], *, heldout_categories: Sequence[str], heldout_tasks_per_category: int,
                eval_instances: int, seed: int = 0, num_train_tasks: int = 0, leakage_ngram: int = 6,
                leakage_threshold: float = 0.5) -> Split:
  """The three levels (module docstring). Held-out tasks of a seen category are its last
  `heldout_tasks_per_category` in suite order; `num_train_tasks` > 0 keeps that many training tasks (a stable
  shuffle, the task-count ablation; the evaluation sets change only by what the leakage filter drops). An
  evaluation task holds out `eval_instances` instances (a stable shuffle by task name; at most half of a
  training task's); its demonstration pool is its own demonstrations (NIv2 'Positive Examples') or else the
  rest of its instances. Unknown held-out categories are a ConfigError naming the key."""
  categories = list(dict.fromkeys(t.category for t in tasks if t.category not in COMPONENTS))
  for c in heldout_categories:
    if c not in categories:
      raise ConfigError(f"config key 'data.heldout_categories': unknown category '{c}' "
                        f"(known: {', '.join(categories)})")
  seen_categories = [c for c in categories if c not in heldout_categories]
  if not seen_categories:
    raise ConfigError("config key 'data.heldout_categories': every category is held out; nothing to train on")
  components = tuple(t for t in tasks if t.category in COMPONENTS)
  levels = {level: [] for level in LEVELS}
  train = []
  for c in categories:
    members = [t for t in tasks if t.category == c]
    k = len(members) if c in heldout_categories else min(heldout_tasks_per_category, len(members) - 1)
    held = members[len(members) - k:] if k > 0 else []
    for t in members:
      order = _stable_order(t, seed)
      if t in held:  # all may be evaluated when the task brings its own demonstrations, else one stays for them
        n = min(eval_instances, len(order) - (0 if t.demos else 1))
      else:
        n = min(eval_instances, len(order) // 2)
      evaluated = [t.instances[i] for i in order[:n]]
      rest = tuple(t.instances[i] for i in order[n:])
      if t in held:
        level = "heldout_category" if c in heldout_categories else "heldout_task"
        levels[level].append((t, evaluated, t.demos or rest))
      else:
        kept = dataclasses.replace(t, instances=rest)
        train.append(kept)
        levels["heldout_instance"].append((kept, evaluated, t.demos or rest))
  if num_train_tasks > 0:
    picks = sorted(np.random.default_rng(seed).permutation(len(train))[:num_train_tasks])
    train = [train[i] for i in picks]
  texts = [f"{i.input} {i.output}" for t in [*train, *components] for i in t.instances]
  grams = training_ngrams(texts, leakage_ngram)
  dropped = 0
  evals = {}
  for level, entries in levels.items():
    kept_entries = []
    for t, evaluated, pool in entries:
      clean = [i for i in evaluated if leakage(f"{i.input} {i.output}", grams, leakage_ngram) < leakage_threshold]
      dropped += len(evaluated) - len(clean)
      if clean:
        kept_entries.append((t, tuple(clean), tuple(pool)))
    evals[level] = tuple(kept_entries)
  return Split(tuple(train), evals, components, dropped)


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
  """Word n-grams of the lowercased text (punctuation split off); a text of fewer than n words is one gram."""
  words = re.findall(r"\w+|[^\w\s]", text.lower())
  if len(words) < n:
    return [tuple(words)] if words else []
  return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def training_ngrams(texts: Sequence[str], n: int) -> set:
  return {g for text in texts for g in _ngrams(text, n)}


def leakage(text: str, train_grams: set, n: int) -> float:
  """The share of the text's word n-grams that occur in training text (0 when it has none)."""
  grams = _ngrams(text, n)
  return sum(g in train_grams for g in grams) / len(grams) if grams else 0.0


# --- prompts -------------------------------------------------------------------------------------------------


def render_prompt(task: TaskSpec, item: Instance, demos: Sequence[Instance] = (), template: int = 0) -> str:
  """The instruction, then each demonstration as 'Input: ... Output: ...', then the input; the answer follows
  'Output:' after a space. Options are listed when the task has them."""
  parts = [task.templates[template % len(task.templates)]] if task.templates[template % len(task.templates)] else []
  options = f"\nOptions: {', '.join(task.options)}" if task.options else ""
  parts += [f"Input: {d.input}{options}\nOutput: {d.output}" for d in demos]
  parts.append(f"Input: {item.input}{options}\nOutput:")
  return "\n\n".join(parts)


def pick_demos(pool: Sequence[Instance], item: Instance, k: int, rng: np.random.Generator) -> list[Instance]:
  """k demonstrations drawn from the task's pool, never the instance itself (nor a copy of its input)."""
  candidates = [d for d in pool if d.input != item.input]
  if k <= 0 or not candidates:
    return []
  return [candidates[i] for i in rng.choice(len(candidates), size=min(k, len(candidates)), replace=False)]


def register_seqio(tasks: Sequence[TaskSpec], rates: Sequence[float], prefix: str) -> str:
  """Registers each task as a seqio Task `<prefix>_<name>` ({'inputs': prompt, 'targets': output}, byte
  vocabulary, the task's metric as its metric_fn) and a seqio Mixture `<prefix>` with the given rates; returns
  the mixture's name. For users of the seqio registry; the trainer packs the same examples itself."""
  from common.data._tf import import_seqio  # pylint: disable=g-import-not-at-top
  from common.eval.text_metrics import exact_match, rouge_l  # pylint: disable=g-import-not-at-top
  seqio = import_seqio()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (configured by import_seqio)
  vocabulary = seqio.ByteVocabulary()
  scorer = {"exact_match": exact_match, "rouge_l": rouge_l, "accuracy": exact_match}
  names = []
  for task, rate in zip(tasks, rates):
    name = f"{prefix}_{task.name}"
    names.append((name, float(rate)))
    if name in seqio.TaskRegistry.names():
      continue
    rows = {"inputs": [render_prompt(task, i) for i in task.instances], "targets": [i.output for i in task.instances]}

    def dataset_fn(split, shuffle_files, seed=None, rows=rows):
      del split, shuffle_files, seed
      return tf.data.Dataset.from_tensor_slices(rows)

    def metric(targets, predictions, score=scorer[task.metric], metric_name=task.metric):
      return {metric_name: 100 * float(np.mean([score(p, t) for p, t in zip(predictions, targets)]))}

    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=("train",)),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features={k: seqio.Feature(vocabulary, add_eos=k == "targets") for k in ("inputs", "targets")},
        metric_fns=[metric])
  if prefix not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(prefix, names)
  return prefix


# --- the training mixture --------------------------------------------------------------------------------

# Benchmark proportions of the final OPT-IML mixture (Iyer et al. 2022, sec. 4.7), approximate: the shares
# below were set from the paper's description (the large benchmarks about equal, reasoning and dialogue small)
# and not checked against its table; configs may give their own.
PAPER_PROPORTIONS = dict(flan=0.20, niv2=0.20, promptsource=0.20, exmix=0.12, t5=0.10, crossfit=0.08,
                         unifiedskg=0.05, reasoning=0.04, dialogue=0.01)
SAMPLINGS = ("proportional", "temperature", "uniform")
PROPORTIONS = ("examples", "paper", "uniform")


def mixture_tasks(split: Split, components: Sequence[str]) -> list[TaskSpec]:
  """The training tasks plus the optional components (reasoning, dialogue) the config names."""
  return [*split.train, *(t for t in split.components if t.category in components)]


def mixture_rates(tasks: Sequence[TaskSpec], data_cfg) -> np.ndarray:
  """Each task's share of the stream: `data.sampling` within benchmarks (examples-proportional with the cap
  `data.task_cap`, temperature `data.temperature` over capped sizes, or uniform), then `data.proportions`
  over benchmarks: 'examples' keeps the within-rates as they are, 'paper' uses PAPER_PROPORTIONS, 'uniform'
  gives each benchmark the same share; optional components take `data.component_share` each outside 'paper'."""
  from common.data import mixtures  # pylint: disable=g-import-not-at-top
  sizes = [len(t.instances) for t in tasks]
  cap = int(data_cfg.task_cap)
  if data_cfg.sampling == "temperature":
    within = mixtures.temperature_rates(sizes, float(data_cfg.temperature), cap)
  elif data_cfg.sampling == "uniform":
    within = np.full(len(tasks), 1.0 / len(tasks))
  else:
    within = mixtures.examples_proportional(sizes, cap)
  groups = [t.benchmark for t in tasks]
  if data_cfg.proportions == "paper":
    return mixtures.group_proportions(groups, PAPER_PROPORTIONS, within)
  parts = [g for g in dict.fromkeys(groups) if g in COMPONENTS]
  share = float(data_cfg.component_share)
  rest = max(1.0 - share * len(parts), 0.0)
  benchmarks = [g for g in dict.fromkeys(groups) if g not in COMPONENTS]
  if data_cfg.proportions == "uniform":
    weights = {g: rest / len(benchmarks) for g in benchmarks}
  else:
    mass = sum(w for w, g in zip(within, groups) if g not in COMPONENTS)
    weights = {g: rest * sum(w for w, h in zip(within, groups) if h == g) / mass for g in benchmarks}
  return mixtures.group_proportions(groups, {**weights, **{g: share for g in parts}}, within)


def training_examples(split: Split, data_cfg, seed: int) -> list[dict[str, str]]:
  """`data.train_examples` prompt/response pairs drawn by the mixture's rates (`common.data.mixtures.
  sample_counts`: the counts follow the rates exactly), each task's instances in a seeded order (repeated
  when its count exceeds them); a share `data.train_demo_fraction` carries 1..`data.train_shots`
  demonstrations from the task's own examples (never the instance itself); the template is drawn per example."""
  from common.data import mixtures  # pylint: disable=g-import-not-at-top
  tasks = mixture_tasks(split, tuple(data_cfg.components))
  counts = mixtures.sample_counts(mixture_rates(tasks, data_cfg), int(data_cfg.train_examples))
  rng = np.random.default_rng([seed, 11])
  out = []
  for task, count in zip(tasks, counts):
    order = rng.permutation(len(task.instances))
    for j in range(int(count)):
      item = task.instances[order[j % len(order)]]
      shots = int(rng.integers(1, int(data_cfg.train_shots) + 1)) \
          if rng.random() < float(data_cfg.train_demo_fraction) else 0
      demos = pick_demos(task.demos or task.instances, item, shots, rng)
      prompt = render_prompt(task, item, demos, template=int(rng.integers(len(task.templates))))
      out.append({"prompt": prompt, "response": " " + item.output})
  return [out[i] for i in rng.permutation(len(out))]


def pretraining_texts(split: Split) -> list[str]:
  """Unlabelled text of the training tasks for the base model: each instance's input alone, as a line (no
  instruction, no output): the domain's words and numbers without the task format."""
  return [i.input for t in split.train for i in t.instances]
