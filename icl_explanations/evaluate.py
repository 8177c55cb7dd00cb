"""In-context evaluation with explanations (Ye et al. 2023, sec. 3-5): for each query, exemplars chosen from
its pool (random, nearest neighbours or MMR under one of four similarities, or a fixed composition), shown
with their explanations (perturbed or not), a greedy generation (common.generate) of the explanation and
'The answer is X.', and the accuracy of the extracted answers. For generated arithmetic, `rule_accuracy` also
counts whether the generated explanation states the operators of the query correctly (what the exemplars
have to reveal).

`python -m icl_explanations.evaluate (--workdir=RUN | --model=HUB_NAME) [--data=FILE.jsonl --reader=gsm8k]
[--family=arith --query_form=mixed] [--selection=mmr] [--similarity=bm25] [--lam=0.5] [--shots=4]
[--perturbation=none]` prints the result as JSON.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Sequence

import numpy as np
from flax import nnx

from common.cli import ArgumentParser
from common.config import ConfigError, run_main
from common.generate import generate
from common.models import build_model
from common.models import checkpoint_library as hub
from common.tokenizers import Tokenizer
from common.train.restore import load_run_model, read_run_config
from icl_explanations import data as icl_data
from icl_explanations import selection as icl_selection
from icl_explanations import similarity as icl_similarity
from icl_explanations import train as icl_train

MAX_NEW_TOKENS = 96
COMPOSITIONS = ("add_only", "mul_only", "add_and_mul")


@dataclasses.dataclass(frozen=True)
class Setting:
  """One evaluation arm: how exemplars are chosen and shown."""
  selection: str = "random"
  similarity: str = "bm25"
  lam: float = 0.5
  shots: int = 4
  perturbation: str = "none"
  composition: str = ""   # a fixed composition of the complementarity pools (COMPOSITIONS), else ''

  def check(self) -> None:
    if self.selection not in icl_selection.SELECTIONS:
      raise ConfigError(f"--selection: unknown selection '{self.selection}' "
                        f"(valid: {', '.join(icl_selection.SELECTIONS)})")
    if self.similarity not in icl_similarity.SIMILARITIES:
      raise ConfigError(f"--similarity: unknown similarity '{self.similarity}' "
                        f"(valid: {', '.join(icl_similarity.SIMILARITIES)})")
    if self.perturbation not in icl_data.PERTURBATIONS:
      raise ConfigError(f"--perturbation: unknown perturbation '{self.perturbation}' "
                        f"(valid: {', '.join(icl_data.PERTURBATIONS)})")
    if self.composition and self.composition not in COMPOSITIONS:
      raise ConfigError(f"--composition: unknown composition '{self.composition}' (valid: {', '.join(COMPOSITIONS)})")
    if not 0.0 <= self.lam <= 1.0:
      raise ConfigError(f"--lam: must be in [0, 1], got {self.lam}")
    if self.shots < 1:
      raise ConfigError(f"--shots: must be >= 1, got {self.shots}")


def composed(pool: Sequence[icl_data.Exemplar], composition: str, shots: int) -> list[int]:
  """Pool indices of a fixed composition: `shots` add-only, multiply-only, or add and multiply in turn."""
  adds = [i for i, e in enumerate(pool) if e.form == "add"]
  muls = [i for i, e in enumerate(pool) if e.form == "mul"]
  if composition == "add_only":
    chosen = adds[:shots]
  elif composition == "mul_only":
    chosen = muls[:shots]
  else:
    chosen = [x for pair in zip(adds, muls) for x in pair][:shots]
  if len(chosen) < shots:
    raise ConfigError(f"composition '{composition}': the pool has too few add / mul exemplars for {shots} shots")
  return chosen


def choose(setting: Setting, episode: icl_data.Episode, rng: np.random.Generator, model: nnx.Module | None,
           tokenizer: Tokenizer | None) -> list[list[int]]:
  """The chosen pool indices for each of the episode's queries."""
  pool = episode.pool
  if setting.composition:
    return [composed(pool, setting.composition, setting.shots) for _ in episode.queries]
  if setting.selection == "random":
    return [icl_selection.select("random", np.zeros(len(pool)), None, setting.shots, rng=rng) for _ in episode.queries]
  questions = [e.question for e in pool]
  relevance = icl_similarity.similarity(setting.similarity, [q.question for q in episode.queries], questions,
                                        model=model, tokenizer=tokenizer)
  pool_similarity = None
  if setting.selection == "mmr":
    pool_similarity = icl_similarity.similarity(setting.similarity, questions, questions, model=model,
                                                tokenizer=tokenizer)
  return [icl_selection.select(setting.selection, relevance[i], pool_similarity, setting.shots, lam=setting.lam)
          for i in range(len(episode.queries))]


def rule_correct(generation: str, query: icl_data.Exemplar) -> bool:
  """Whether the generation states the query's rule as its gold explanation does (its first sentence)."""
  return bool(query.nl) and generation.strip().startswith(query.nl)


def evaluate_episodes(model: nnx.Module, tokenizer: Tokenizer, episodes: Sequence[icl_data.Episode],
                      setting: Setting, *, seed: int = 0, examples: int = 4) -> dict:
  """Accuracy (x100) of greedy answers to every query of `episodes` under `setting`, the share with no
  extractable answer, the rule accuracy (generated tasks) and a few prompts with their generations."""
  setting.check()
  rng = np.random.default_rng(seed)
  prompts, queries = [], []
  for episode in episodes:
    for query, chosen in zip(episode.queries, choose(setting, episode, rng, model, tokenizer)):
      prompts.append(icl_data.prompt([episode.pool[i] for i in chosen], query, setting.perturbation))
      queries.append(query)
  bos = tokenizer.bos_id is not None
  rows = generate(model, [tokenizer.encode(p, bos=bos) for p in prompts], max_new_tokens=MAX_NEW_TOKENS,
                  stop_ids=tokenizer.stop_ids, stop_strings=("\n",), tokenizer=tokenizer)
  generations = [tokenizer.decode(r) for r in rows]
  answers = [icl_data.extract_answer(g) for g in generations]
  n = len(queries)
  out = dict(n=n, accuracy=100 * sum(a == q.answer for a, q in zip(answers, queries)) / n,
             no_answer=100 * sum(a is None for a in answers) / n,
             examples=[dict(prompt=p, generation=g, answer=q.answer) for p, g, q in
                       zip(prompts[:examples], generations[:examples], queries[:examples])])
  if all(q.nl for q in queries):
    out["rule_accuracy"] = 100 * sum(rule_correct(g, q) for g, q in zip(generations, queries)) / n
  return out


def generated_episodes(family: str, query_form: str, *, episodes: int, pool_size: int, queries: int, seed: int,
                       pool_forms: Sequence[str] = ()) -> list[icl_data.Episode]:
  """Test episodes (test identities only) of a generated family, a pure function of `seed`."""
  rng = np.random.default_rng((seed, 7))
  return [icl_data.make_episode(family, rng, split="test", pool_size=pool_size, queries=queries,
                                query_form=query_form, pool_forms=pool_forms) for _ in range(episodes)]


def file_episodes(path: str, reader: str, *, pool_size: int, max_queries: int, seed: int) -> list[icl_data.Episode]:
  """One episode per test query of a jsonl file, its pool `pool_size` exemplars drawn from the train split."""
  pool, queries = icl_data.split_exemplars(icl_data.read_exemplars(path, reader))
  if not pool or not queries:
    raise ConfigError(f"{path}: need exemplars in both splits (pool {len(pool)}, queries {len(queries)})")
  rng = np.random.default_rng(seed)
  queries = queries[:max_queries] if max_queries > 0 else queries
  size = min(pool_size, len(pool))
  return [icl_data.Episode(reader, tuple(pool[i] for i in rng.choice(len(pool), size=size, replace=False)), (q,))
          for q in queries]


def load_model(workdir: str, model_name: str) -> tuple[nnx.Module, Tokenizer]:
  """A trained run's model and tokenizer, or a hub entry's (which must carry its tokenizer)."""
  if bool(workdir) == bool(model_name):
    raise ConfigError("give exactly one of --workdir (a training run) and --model (a hub checkpoint)")
  if model_name:
    _, model, tokenizer, _ = hub.load(model_name)
    if tokenizer is None:
      raise ConfigError(f"--model: hub checkpoint '{model_name}' stores no tokenizer")
    return model, tokenizer
  cfg = read_run_config(workdir, "--workdir")
  model = load_run_model(workdir, cfg, lambda: build_model(cfg.model, seed=0), key="--workdir")[0]
  return model, icl_train.tokenizer_for(cfg.data)


def main(argv=None) -> int:
  parser = ArgumentParser(prog="python -m icl_explanations.evaluate", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="", help="an icl_explanations.train run")
  parser.add_argument("--model", default="", help="a hub checkpoint name (python -m common.hub list)")
  parser.add_argument("--data", default="", help="a jsonl file of exemplars ('' = generated episodes)")
  parser.add_argument("--reader", default="gsm8k", help=f"the file's layout: {', '.join(icl_data.READERS)}")
  parser.add_argument("--family", default="arith", help=f"generated family: {', '.join(icl_data.FAMILIES)}")
  parser.add_argument("--query_form", default="", help="generated query form (e.g. mixed; '' = any)")
  parser.add_argument("--selection", default="mmr", help=f"{', '.join(icl_selection.SELECTIONS)}")
  parser.add_argument("--similarity", default="bm25", help=f"{', '.join(icl_similarity.SIMILARITIES)}")
  parser.add_argument("--lam", type=float, default=0.5, help="MMR's lambda")
  parser.add_argument("--shots", type=int, default=4)
  parser.add_argument("--perturbation", default="none", help=f"{', '.join(icl_data.PERTURBATIONS)}")
  parser.add_argument("--pool_size", type=int, default=16, help="candidates per query")
  parser.add_argument("--episodes", type=int, default=16, help="generated episodes")
  parser.add_argument("--queries", type=int, default=4, help="queries per generated episode")
  parser.add_argument("--max_queries", type=int, default=0, help="file queries scored (0: all)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  setting = Setting(args.selection, args.similarity, args.lam, args.shots, args.perturbation)
  setting.check()
  if args.data:
    episodes = file_episodes(args.data, args.reader, pool_size=args.pool_size, max_queries=args.max_queries,
                             seed=args.seed)
  else:
    if args.family not in icl_data.FAMILIES:
      raise ConfigError(f"--family: unknown family '{args.family}' (valid: {', '.join(icl_data.FAMILIES)})")
    episodes = generated_episodes(args.family, args.query_form, episodes=args.episodes, pool_size=args.pool_size,
                                  queries=args.queries, seed=args.seed)
  model, tokenizer = load_model(args.workdir, args.model)
  json.dump(evaluate_episodes(model, tokenizer, episodes, setting, seed=args.seed), sys.stdout, indent=1)
  print()
  return 0


if __name__ == "__main__":
  run_main(main)
