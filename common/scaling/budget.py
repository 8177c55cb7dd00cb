"""Compute budgets to training lengths: the runs on each IsoFLOP curve.

For a budget C (training FLOPs) and a model size N, the IsoFLOP approach (Hoffmann et al. 2022, sec. 3.2)
trains N on the D tokens that make FLOPs(N, D) = C. We count FLOPs with `common.flops` (matmul FLOPs of the
actual shape, attention included) rather than the 6ND rule of Kaplan et al. 2020 (sec. 2.1), which ignores
attention and the logits and is far off for the small, wide-vocabulary models a CPU sweep trains.

Training is in whole steps of `batch_size x seq_len` tokens, so a run's FLOPs are
steps x flops_per_step; steps = round(C / flops_per_step). A (C, size) pair whose rounding misses C by more
than `tolerance` (one step is too coarse a unit for that budget) is dropped, with the reason, rather than
silently trained off-budget.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import ml_collections

from common.config import ConfigError, override
from common.flops import param_count, training_flops_per_token


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  """One run of a sweep: its config (train.steps set), FLOPs and tokens, and where it trains."""
  family: str
  size: int
  budget: float
  steps: int
  flops: float               # steps x flops_per_step, the FLOPs the run will actually spend
  tokens: int                # training tokens (or bytes, for a byte vocabulary) D
  params_total: int
  params_non_embedding: int
  config: ml_collections.ConfigDict
  overrides: tuple[tuple[str, str], ...]  # the keys set on top of the family config, as --config.K=V text

  @property
  def name(self) -> str:
    return f"{self.family}_C{budget_label(self.budget)}_s{self.size}"


@dataclasses.dataclass(frozen=True)
class Plan:
  runs: list[PlannedRun]
  dropped: list[str]  # one line per (budget, size) left out, saying why


def budget_label(budget: float) -> str:
  """2e10 -> '2e10', 3.5e13 -> '3.5e13': short, and safe in a folder name."""
  mantissa, exponent = f"{budget:.3e}".split("e")
  return f"{float(mantissa):g}e{int(exponent)}"


def parse_budgets(text: str) -> list[float]:
  try:
    budgets = [float(b) for b in text.split(",") if b.strip()]
  except ValueError:
    raise ConfigError(f"--budgets: expected comma-separated numbers of FLOPs (1e13,3e13), got '{text}'") from None
  if not budgets or any(not math.isfinite(b) or b <= 0 for b in budgets):
    raise ConfigError(f"--budgets: expected positive numbers of FLOPs, got '{text}'")
  return sorted(budgets)


def flops_per_step(cfg) -> float:
  """Training FLOPs of one optimizer step: per-token FLOPs of the model at this context x tokens per step."""
  seq_len = int(cfg.data.seq_len)
  return training_flops_per_token(cfg.model, seq_len) * int(cfg.train.batch_size) * seq_len


def plan_sweep(family_fn, budgets: Sequence[float], sizes: Sequence[int], *, family: str,
               overrides: Sequence[tuple[str, str]] = (), tolerance: float = 0.01) -> Plan:
  """Every (budget, size) whose whole number of steps lands within `tolerance` of the budget.

  `overrides` ((key, text) pairs, as `--config.key=text`) are applied to each family config before
  planning, so that a larger batch or context changes the plan as it changes the runs."""
  runs, dropped = [], []
  for size in sizes:
    base = family_fn(size)
    for key, text in overrides:
      override(base, key, text)
    if int(base.model.get("vocab_size", 0)) <= 0:
      raise ConfigError(f"--family: {family}({size}) leaves model.vocab_size 0; the planner needs the "
                        "padded vocabulary size to count the logits' FLOPs")
    per_step = flops_per_step(base)
    params = param_count(base.model)
    for budget in budgets:
      steps = round(budget / per_step)
      error = abs(steps * per_step - budget) / budget
      if steps < 1 or error > tolerance:
        dropped.append(f"{family} size {size} at C={budget:.3g}: one step is {per_step:.3g} FLOPs, so "
                       f"{max(steps, 1)} step(s) miss the budget by {100 * error if steps else 100:.1f}% "
                       f"(> {100 * tolerance:g}%)")
        continue
      cfg = base.copy_and_resolve_references()
      warmup = min(int(base.train.warmup_steps), max(1, steps // 10))
      cfg.train.steps, cfg.train.warmup_steps = steps, warmup
      runs.append(PlannedRun(
          family=family, size=int(size), budget=float(budget), steps=steps, flops=steps * per_step,
          tokens=steps * int(cfg.train.batch_size) * int(cfg.data.seq_len),
          params_total=params["total"], params_non_embedding=params["non_embedding"], config=cfg,
          overrides=(*tuple(overrides), ("train.steps", str(steps)), ("train.warmup_steps", str(warmup)))))
  runs.sort(key=lambda r: (r.budget, r.size))
  return Plan(runs, dropped)
