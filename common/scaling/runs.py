"""Reading finished trainer runs for the reproduce commands: metrics.jsonl rows, whether a run is complete,
and its eval curve against training FLOPs and training wall-clock (the axes of the papers' comparisons)."""
from __future__ import annotations

import json
import math
import os
from typing import NamedTuple


def read_metrics(workdir: str) -> list[dict]:
  """The rows of DIR/metrics.jsonl (empty when the run has not logged yet)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def finished(workdir: str, steps: int | None = None) -> bool:
  """Whether a trainer run in `workdir` reached its last step (or `steps`, when a rerun asks for more) and
  evaluated there (ARCHITECTURE.md files)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return False
  if steps is None:
    with open(path) as f:
      steps = int(json.load(f)["train"]["steps"])
  return any(m.get("step") == steps and any(k.startswith("eval/") for k in m) for m in read_metrics(workdir))


class Curve(NamedTuple):
  """One eval metric of a run at each eval step, with the training FLOPs and training seconds spent by then."""
  steps: list[int]
  flops: list[float]
  seconds: list[float]
  values: list[float]


def eval_curve(workdir: str, key: str, flops_per_step: float) -> Curve:
  """`key` (e.g. 'eval/loss_image') at every eval row. Seconds are training time only: the sum of the logged
  `step_time` over the steps each train row covers (the loop excludes eval time from it)."""
  rows = read_metrics(workdir)
  seconds_at, elapsed, last_step = {}, 0.0, 0
  for row in rows:
    if "step_time" in row:
      elapsed += float(row["step_time"]) * (int(row["step"]) - last_step)
      last_step = int(row["step"])
      seconds_at[last_step] = elapsed
  curve = Curve([], [], [], [])
  for row in rows:
    if key in row and not math.isnan(float(row[key])):
      step = int(row["step"])
      curve.steps.append(step)
      curve.flops.append(step * flops_per_step)
      curve.seconds.append(seconds_at.get(step, math.nan))
      curve.values.append(float(row[key]))
  return curve


def format_pm(value: float, half: float, fmt: str) -> str:
  """'value ± half' in `fmt`, or just the value when the half-width is NaN (one seed)."""
  return format(value, fmt) + ("" if math.isnan(half) else f" ± {format(half, fmt)}")
