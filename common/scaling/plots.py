"""The PNGs of a scaling study: loss vs FLOPs, IsoFLOP curves with their minima, the N_opt(C)/D_opt(C)
frontier, compute equivalence of two families, and the fixed-inference-cost view.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`, rendered by Agg), never
pyplot: no global backend is switched, so the same functions work headless in a sweep and in a notebook.
Each function saves `path` and returns it.
"""
from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from common.scaling.frontier import LossVsCompute, fit_loss_vs_compute, frontier
from common.scaling.isoflop import IsoFlopFit, IsoFlopMinimum, loss_of


def _save(fig: Figure, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def _colors(n: int):
  from matplotlib import colormaps
  cmap = colormaps["viridis"]
  return [cmap(i / max(n - 1, 1)) for i in range(n)]


def loss_vs_flops(rows: list[dict], path: str, *, loss_key: str = "eval_loss", fit: LossVsCompute | None = None) -> str:
  """Every run's loss against its FLOPs, one colour per size, one panel per family; the frontier fit dashed."""
  fams = sorted({r["family"] for r in rows})
  fig = Figure(figsize=(5.5 * len(fams), 4))
  for j, fam in enumerate(fams):
    ax = fig.add_subplot(1, len(fams), j + 1)
    group = [r for r in rows if r["family"] == fam]
    sizes = sorted({r["size"] for r in group})
    for size, color in zip(sizes, _colors(len(sizes))):
      pts = sorted((r["flops"], loss_of(r, loss_key)) for r in group if r["size"] == size)
      ax.plot(*zip(*pts), "o-", color=color, label=f"size {size}")
    c, loss = frontier(group, loss_key=loss_key)
    law = fit if fit is not None else (fit_loss_vs_compute(c, loss) if len(c) >= 2 else None)
    if law is not None:
      grid = np.geomspace(c.min() / 1.5, c.max() * 1.5, 50)
      ax.plot(grid, law.loss(grid), "k--", lw=1,
              label=f"L = {law.E:.2f} + {law.K:.3g} C^-{law.gamma:.3f}")
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel=loss_key, title=fam)
    ax.legend(fontsize=7)
  return _save(fig, path)


def isoflop_curves(rows: list[dict], minima: list[IsoFlopMinimum], path: str, *, loss_key: str = "eval_loss",
                   param_key: str = "params_total") -> str:
  """Loss against N at each budget, with the parabola and minimum of each budget that has one
  (`isoflop.isoflop_minima`; Chinchilla fig. 3, left)."""
  fig = Figure(figsize=(6, 4.2))
  ax = fig.add_subplot()
  budgets = sorted({r["budget"] for r in rows})
  minima = {m.budget: m for m in minima}
  for budget, color in zip(budgets, _colors(len(budgets))):
    pts = sorted((r[param_key], loss_of(r, loss_key)) for r in rows if r["budget"] == budget)
    ax.plot(*zip(*pts), "o", color=color, label=f"C = {budget:.3g}")
    if budget in minima:
      m = minima[budget]
      x_opt = math.log10(m.n_opt)
      x = np.linspace(min(math.log10(pts[0][0]), x_opt) - 0.1, max(math.log10(pts[-1][0]), x_opt) + 0.1, 60)
      ax.plot(10 ** x, np.polyval(m.parabola, x), "-", color=color, lw=1)
      ax.plot([m.n_opt], [m.loss_opt], "*", color=color, ms=13, mec="k")
  ax.set(xscale="log", xlabel=f"parameters N ({param_key})", ylabel=loss_key, title="IsoFLOP curves")
  ax.legend(fontsize=7)
  return _save(fig, path)


def optimal_frontier(fit: IsoFlopFit, path: str, *, ci: dict | None = None) -> str:
  """N_opt(C) and D_opt(C) with their power laws (Chinchilla fig. 3, centre and right); `ci` from
  bootstrap(isoflop.exponents) is printed in the legend."""
  fig = Figure(figsize=(10, 4))
  budgets = np.array([m.budget for m in fit.minima])
  grid = np.geomspace(budgets.min() / 2, budgets.max() * 2, 50)
  for k, (name, law, values) in enumerate((("N_opt", fit.n_opt, [m.n_opt for m in fit.minima]),
                                           ("D_opt", fit.d_opt, [m.d_opt for m in fit.minima]))):
    ax = fig.add_subplot(1, 2, k + 1)
    key = f"{name.lower()}_exponent"
    band = f" [{ci[key]['low']:.2f}, {ci[key]['high']:.2f}]" if ci and key in ci else ""
    ax.plot(budgets, values, "o", label="IsoFLOP minima")
    ax.plot(grid, law(grid), "--", label=f"{name} ∝ C^{law.exponent:.2f}{band}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=name)
    ax.legend(fontsize=8)
  return _save(fig, path)


def compute_equivalence(rows_a: list[dict], rows_b: list[dict], path: str, *, label_a: str, label_b: str,
                        loss_key: str = "eval_loss") -> str:
  """Both families' frontiers and laws; each of A's points is joined to the compute B needs for its loss."""
  from common.scaling.frontier import compute_equivalence as equivalence
  fig = Figure(figsize=(6, 4.2))
  ax = fig.add_subplot()
  for rows, label, color in ((rows_a, label_a, "C0"), (rows_b, label_b, "C1")):
    c, loss = frontier(rows, loss_key=loss_key)
    law = fit_loss_vs_compute(c, loss)
    grid = np.geomspace(c.min() / 3, c.max() * 3, 50)
    ax.plot(c, loss, "o", color=color, label=label)
    ax.plot(grid, law.loss(grid), "--", color=color, lw=1)
  for e in equivalence(rows_a, rows_b, loss_key=loss_key):
    if math.isfinite(e["compute_b"]):
      ax.annotate("", xy=(e["compute_b"], e["loss"]), xytext=(e["compute"], e["loss"]),
                  arrowprops=dict(arrowstyle="->", color="gray"))
      ax.text(e["compute"], e["loss"], f" {e['factor']:.2g}x", fontsize=7, va="bottom")
  ax.set(xscale="log", xlabel="training FLOPs C", ylabel=loss_key,
         title=f"compute {label_b} needs to match {label_a}")
  ax.legend(fontsize=8)
  return _save(fig, path)


def fixed_inference(rows: list[dict], budgets, path: str, *, loss_key: str = "loss") -> str:
  """BLT view: loss against patch size at fixed inference FLOPs per byte (one line per budget)."""
  from common.scaling.frontier import fixed_inference_cost
  fig = Figure(figsize=(6, 4.2))
  ax = fig.add_subplot()
  for budget, color in zip(budgets, _colors(len(budgets))):
    pts = sorted((r["patch_size"], r["loss"]) for r in fixed_inference_cost(rows, budget, loss_key=loss_key)
                 if math.isfinite(r["loss"]))
    if pts:
      ax.plot(*zip(*pts), "o-", color=color, label=f"{budget:.3g} FLOPs/byte")
  ax.set(xlabel="patch size (bytes)", ylabel=loss_key, title="fixed inference cost")
  ax.legend(fontsize=8)
  return _save(fig, path)
