"""A sweep's results as one tidy table: one row per run, one column per quantity (CSV and JSON).

Rows are built from what every trainer writes (ARCHITECTURE.md): `config.json`, `metrics.jsonl`, plus the
planner's `scaling.json`; so runs trained on a cluster from emitted commands are read like local ones.
Columns: family, size, budget, params_total, params_non_embedding, flops, tokens, steps, train_loss (mean of
the last few logged train losses, which smooths batch noise), eval_loss (the final eval), wall_time (seconds
of training steps, the sum of logged step times, without compile and eval), mfu (median of the logged
values), finished.
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import statistics

COLUMNS = ("family", "size", "budget", "params_total", "params_non_embedding", "flops", "tokens", "steps",
           "train_loss", "eval_loss", "wall_time", "mfu", "finished", "name")
LAST_TRAIN_LOSSES = 3


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _number(v) -> float:
  try:
    return float(v)
  except (TypeError, ValueError):
    return math.nan


def run_row(workdir: str) -> dict:
  """The table row of one run folder (NaN where it has not logged a quantity yet)."""
  with open(os.path.join(workdir, "scaling.json")) as f:
    info = json.load(f)
  metrics = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  train = [m for m in metrics if "loss" in m]
  evals = [m for m in metrics if "eval/loss" in m]
  last_step = max((m["step"] for m in train), default=0)
  wall, prev = 0.0, 0
  for m in sorted(train, key=lambda m: m["step"]):
    wall += _number(m.get("step_time")) * (m["step"] - prev)
    prev = m["step"]
  mfus = [_number(m["mfu"]) for m in train if "mfu" in m]
  row = {k: info[k] for k in ("family", "size", "budget", "params_total", "params_non_embedding", "flops",
                              "tokens", "steps", "name")}
  row.update(
      train_loss=statistics.fmean(_number(m["loss"]) for m in train[-LAST_TRAIN_LOSSES:]) if train else math.nan,
      eval_loss=_number(evals[-1]["eval/loss"]) if evals else math.nan,
      wall_time=wall if train else math.nan,
      mfu=statistics.median(mfus) if mfus else math.nan,
      finished=bool(train) and last_step >= info["steps"])
  return row


def collect(sweep_dir: str) -> list[dict]:
  """Rows of every run under `sweep_dir/runs/`, sorted by family, budget, size."""
  rows = [run_row(os.path.dirname(p)) for p in glob.glob(os.path.join(sweep_dir, "runs", "*", "scaling.json"))]
  return sorted(rows, key=lambda r: (r["family"], r["budget"], r["size"]))


def write_table(rows: list[dict], out_dir: str, stem: str = "results") -> tuple[str, str]:
  """`out_dir/results.csv` and `out_dir/results.json` (a list of row objects; NaN as null)."""
  os.makedirs(out_dir, exist_ok=True)
  csv_path, json_path = os.path.join(out_dir, f"{stem}.csv"), os.path.join(out_dir, f"{stem}.json")
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({k: r.get(k) for k in COLUMNS} for r in rows)
  clean = [{k: (None if isinstance(r.get(k), float) and math.isnan(r[k]) else r.get(k)) for k in COLUMNS}
           for r in rows]
  with open(json_path, "w") as f:
    json.dump(clean, f, indent=1)
  return csv_path, json_path


def read_table(path: str) -> list[dict]:
  """Rows of a results.json or results.csv (numbers as numbers, missing as NaN)."""
  if path.endswith(".json"):
    with open(path) as f:
      rows = json.load(f)
    return [{k: (math.nan if v is None else v) for k, v in r.items()} for r in rows]
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  text_cols = {"family", "name"}
  out = []
  for r in rows:
    row = {}
    for k, v in r.items():
      if k in text_cols:
        row[k] = v
      elif k == "finished":
        row[k] = v == "True"
      else:
        x = _number(v)
        row[k] = int(x) if k in ("size", "steps", "tokens", "params_total", "params_non_embedding") else x
    out.append(row)
  return out

