"""Running evaluation tasks: documents to requests, requests to the model in length-sorted batches, per-sample
lines to `OUTPUT/samples_<task>.jsonl`, aggregates to `OUTPUT/results.json`.

`prepare` does everything that can fail on bad input (task names, data files, few-shot pools) before a model
is loaded or a file is written. `run` is resumable: a line already in a task's samples file, matched by
`common.eval.tasks.doc_key` (task, document id, digest of the request), is reused, so a rerun computes only
the documents it lacks (a larger `--limit`, a run killed half way). Lines are appended after each batch; a
line cut by a kill is dropped on the next start. results.json is written whole or not at all (a temporary
file renamed into place).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable

from common.config import ConfigError
from common.eval import fewshot, lm_metrics
from common.eval.filters import FILTERS
from common.eval.tasks import Doc, Task, doc_key, load_docs, load_pool
from common.evaluate.language_model import LanguageModel
from common.train.workdir import run_path, write_atomic

RESULTS_FILE = "results.json"


@dataclasses.dataclass(frozen=True)
class Request:
  doc: Doc
  prompt: str            # the whole context (few-shot examples included); the document for rolling
  spec: dict[str, Any]   # what the model is asked besides the prompt (stop strings, continuations)


@dataclasses.dataclass(frozen=True)
class PreparedTask:
  task: Task
  num_fewshot: int
  requests: list[Request]


def _request_spec(task: Task, doc: Doc, max_new_tokens: int) -> dict[str, Any]:
  if task.output_type == "generate_until":
    return {"until": list(task.until), "max_new_tokens": max_new_tokens}
  if task.output_type == "multiple_choice":
    return {"continuations": [task.target_delimiter + choice for choice in doc.choices]}
  return {}


def prepare(tasks: list[Task], *, num_fewshot: int = 0, limit: int = 0, seed: int = 0,
            data_paths: dict[str, str] | None = None, fewshot_paths: dict[str, str] | None = None,
            max_new_tokens: int = 256) -> list[PreparedTask]:
  """Each task's requests (its first `limit` documents, all for 0), with `num_fewshot` examples in every
  prompt (none for rolling log-likelihood, which scores documents alone)."""
  data_paths, fewshot_paths = data_paths or {}, fewshot_paths or {}
  names = {t.name for t in tasks}
  for flag, paths in (("--data_path", data_paths), ("--fewshot_path", fewshot_paths)):
    for name in paths:
      if name not in names:
        raise ConfigError(f"{flag} {name}=...: '{name}' is not one of --tasks ({', '.join(sorted(names))})")
  if limit < 0:
    raise ConfigError(f"--limit={limit}: must be >= 0 (0: every document)")
  if max_new_tokens < 1:
    raise ConfigError(f"--max_new_tokens={max_new_tokens}: must be >= 1")
  prepared = []
  for task in tasks:
    data_path = data_paths.get(task.name, "")
    docs = load_docs(task, data_path)
    docs = docs[:limit] if limit else docs
    shots_per_doc = 0 if task.output_type == "loglikelihood_rolling" else num_fewshot
    pool = load_pool(task, data_path, fewshot_paths.get(task.name, ""), docs) if shots_per_doc else []
    fewshot.check_pool(task, pool, docs, shots_per_doc)
    requests = []
    for doc in docs:
      if task.output_type == "loglikelihood_rolling":
        prompt = doc.text
      else:
        shots = fewshot.sample_fewshot(pool, doc, shots_per_doc, seed=seed, task=task.name)
        prompt = fewshot.build_context(task, doc, shots)
      requests.append(Request(doc, prompt, _request_spec(task, doc, max_new_tokens)))
    prepared.append(PreparedTask(task, shots_per_doc, requests))
  return prepared


# --- per-sample lines -------------------------------------------------------------------------------------

def _read_samples(path: str) -> dict[str, dict]:
  """key -> line of a samples file; a line cut short by a kill is dropped, and the file rewritten without it."""
  if not os.path.exists(path):
    return {}
  lines, broken = {}, False
  with open(path, encoding="utf-8") as f:
    for text in f:
      try:
        line = json.loads(text)
        lines[line["key"]] = line
      except (json.JSONDecodeError, KeyError, TypeError):
        broken = True
  if broken:
    write_atomic(run_path(path), "".join(json.dumps(line) + "\n" for line in lines.values()))
  return lines


def _generation_line(task: Task, request: Request, output: str) -> dict:
  filtered = {name: FILTERS[name](output) for name in task.filters}
  return {"output": output, "filtered": filtered,
          "metrics": {f"{task.metric},{name}": lm_metrics.answer_score(task.metric, answer, request.doc.answer)
                      for name, answer in filtered.items()}}


def _compute(lm: LanguageModel, prepared: PreparedTask, batch: list[Request]) -> list[dict]:
  """The lines of a batch of requests: the model's outputs, the filtered answers and per-document metrics."""
  task = prepared.task
  if task.output_type == "generate_until":
    outputs = lm.generate_until([r.prompt for r in batch], task.until, batch[0].spec["max_new_tokens"])
    return [{"target": r.doc.answer, **_generation_line(task, r, out)} for r, out in zip(batch, outputs)]
  if task.output_type == "multiple_choice":
    pairs = [(r.prompt, c) for r in batch for c in r.spec["continuations"]]
    scored = iter(lm.loglikelihood(pairs))
    lines = []
    for r in batch:
      results = [next(scored) for _ in r.spec["continuations"]]
      logliks = [loglik for loglik, _ in results]
      lines.append({"target": r.doc.gold, "choices": list(r.doc.choices), "logliks": logliks,
                    "is_greedy": [greedy for _, greedy in results],
                    "metrics": lm_metrics.choice_metrics(logliks, r.doc.choices, r.doc.gold)})
    return lines
  logliks = lm.rolling_loglikelihood([r.prompt for r in batch])
  return [{"target": None, "loglik": loglik, "words": lm_metrics.word_count(r.prompt),
           "bytes": len(r.prompt.encode("utf-8"))} for r, loglik in zip(batch, logliks)]


def _aggregate(prepared: PreparedTask, lines: list[dict]) -> dict[str, Any]:
  if prepared.task.output_type == "loglikelihood_rolling":
    values = lm_metrics.rolling_metrics([line["loglik"] for line in lines], [line["prompt"] for line in lines])
    metrics = {name: {"value": value, "stderr": None} for name, value in values.items()}
  else:
    metrics = {}
    for name in lines[0]["metrics"]:
      mean, stderr = lm_metrics.mean_stderr([line["metrics"][name] for line in lines])
      metrics[name] = {"value": mean, "stderr": stderr}
  return {"output_type": prepared.task.output_type, "num_fewshot": prepared.num_fewshot,
          "num_docs": len(lines), "metrics": metrics}


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _key(lm: LanguageModel, task: Task, request: Request) -> str:
  """The request's log key; the model's window is part of it, as it decides what a long prompt keeps."""
  window = {"max_length": lm.max_length}
  if task.output_type == "loglikelihood_rolling":
    window["stride"] = lm.rolling_stride
  return doc_key(task, request.doc, {"prompt": request.prompt, **request.spec, **window})


def run(lm: LanguageModel, prepared_tasks: list[PreparedTask], output_dir: str, *,
        config: dict[str, Any] | None = None, log: Callable[[str], None] = _log) -> dict[str, Any]:
  """Evaluates the prepared tasks, reusing the lines already in `output_dir`; returns what results.json holds:
  per task each metric's value (a mean over documents with its standard error; a perplexity over the task,
  without one), and `config`."""
  os.makedirs(output_dir, exist_ok=True)
  results = {}
  for prepared in prepared_tasks:
    task = prepared.task
    path = os.path.join(output_dir, f"samples_{task.name}.jsonl")
    done = _read_samples(path)
    keyed = [(_key(lm, task, r), r) for r in prepared.requests]
    todo = sorted(((key, r) for key, r in keyed if key not in done), key=lambda item: -len(item[1].prompt))
    log(f"[{task.name}] {len(keyed)} documents, {len(keyed) - len(todo)} already logged")
    with open(path, "a", encoding="utf-8") as f:
      for start in range(0, len(todo), lm.batch_size):
        batch = todo[start:start + lm.batch_size]
        for (key, request), line in zip(batch, _compute(lm, prepared, [r for _, r in batch])):
          line = {"task": task.name, "doc_id": request.doc.id, "key": key, "prompt": request.prompt, **line}
          done[key] = line
          f.write(json.dumps(line) + "\n")
        f.flush()
        log(f"[{task.name}] {task.output_type}: {min(start + lm.batch_size, len(todo))}/{len(todo)}")
    results[task.name] = _aggregate(prepared, [done[key] for key, _ in keyed])
  summary = {"results": results, "config": config or {}}
  write_atomic(run_path(os.path.join(output_dir, RESULTS_FILE)), json.dumps(summary, indent=2) + "\n")
  return summary
