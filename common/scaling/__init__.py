"""Scaling studies: FLOP-controlled sweeps (IsoFLOP grids), their results tables, scaling-law fits and plots.

  families.py        a family is a function `size -> ConfigDict`; `dense_lm` and `resolve_family('mod:fn')`
  budget.py          compute budgets x sizes -> planned runs whose FLOPs (common.flops) match the budget
  sweep.py           `python -m common.scaling.sweep`: run the plan (resumable) or print one command per run
  results.py         each run's config.json + metrics.jsonl -> one tidy table (CSV and JSON)
  chinchilla.py      L(N, D) = E + A/N^alpha + B/D^beta, Huber on log loss (Hoffmann et al. 2022, approach 3)
  isoflop.py         IsoFLOP parabola minima and N_opt(C), D_opt(C) power laws (Hoffmann et al. 2022, approach 2)
  frontier.py        loss-vs-compute frontiers, compute equivalence of two families, fixed-inference-cost view
  bootstrap.py       percentile confidence intervals by resampling runs
  intervals.py       mean and Student-t interval of a figure repeated over seeds
  plots.py           matplotlib PNGs
  report.py          `python -m common.scaling.report --sweep=DIR`: table + fits + plots of a sweep

Nothing here imports JAX at module import time, so notebooks that only read tables start fast.
"""
