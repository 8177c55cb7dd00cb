"""`python -m common.scaling.report --sweep=DIR [--compare=DIR2] [--bootstrap=200]`

Reads a sweep (finished locally or on a cluster), writes DIR/results.{csv,json} (results.py),
DIR/fits.json (IsoFLOP minima and N_opt/D_opt power laws with bootstrap CIs, the Chinchilla parametric fit
with bootstrap CIs, each family's loss-vs-compute law) and DIR/plots/*.png. With --compare, the other sweep
is family A and this one family B of the compute-equivalence plot (k = compute B needs / compute A spends).
Only finished runs enter the fits; a fit that the data cannot support (too few sizes or budgets) is recorded
in fits.json with the reason instead of failing the report.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Sequence

from common.cli import ArgumentParser
from common.config import ConfigError, run_main
from common.scaling import bootstrap as bootstrap_lib
from common.scaling import chinchilla, frontier, isoflop, plots, results


def _try(fn):
  try:
    return fn(), None
  except ValueError as e:
    return None, str(e)


def family_fits(rows: list[dict], *, n_boot: int, chinchilla_boot: int, loss_key: str) -> dict:
  """(fits.json entry of one family's finished runs, the IsoFLOP fit or None)."""
  out = {}
  iso, err = _try(lambda: isoflop.fit_isoflop(rows, loss_key=loss_key))
  if iso is not None:
    ci = bootstrap_lib.bootstrap(rows, lambda rs: isoflop.exponents(rs, loss_key=loss_key), n=n_boot,
                                 group="budget")
    out["isoflop"] = dict(dataclasses.asdict(iso), ci=ci)
  else:
    out["isoflop"] = {"error": err}
  fit, err = _try(lambda: chinchilla.fit_rows(rows, loss_key=loss_key))
  if fit is not None:
    ci = bootstrap_lib.bootstrap(
        rows, lambda rs: chinchilla.fit_rows(rs, loss_key=loss_key, n_starts=2).as_dict(), n=chinchilla_boot)
    out["chinchilla"] = dict(fit.as_dict(), ci={k: v for k, v in ci.items() if k not in ("n_runs", "objective")})
  else:
    out["chinchilla"] = {"error": err}
  law, err = _try(lambda: frontier.fit_loss_vs_compute(*frontier.frontier(rows, loss_key=loss_key)))
  out["loss_vs_compute"] = dataclasses.asdict(law) if law is not None else {"error": err}
  return out, iso


def _json_safe(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


def write_report(sweep_dir: str, *, compare: str | None = None, n_boot: int = 200, chinchilla_boot: int = 20,
                 loss_key: str = "eval_loss") -> list[str]:
  """Writes the table, fits and plots of `sweep_dir`; returns the paths written."""
  rows = results.collect(sweep_dir)
  if not rows:
    raise ConfigError(f"--sweep: no runs under '{os.path.join(sweep_dir, 'runs')}'")
  written = list(results.write_table(rows, sweep_dir))
  done = [r for r in rows if r["finished"]]
  plot_dir = os.path.join(sweep_dir, "plots")
  os.makedirs(plot_dir, exist_ok=True)
  fits = {}
  if done:
    written.append(plots.loss_vs_flops(done, os.path.join(plot_dir, "loss_vs_flops.png"), loss_key=loss_key))
  for fam in sorted({r["family"] for r in done}):
    fam_rows = [r for r in done if r["family"] == fam]
    fits[fam], iso = family_fits(fam_rows, n_boot=n_boot, chinchilla_boot=chinchilla_boot, loss_key=loss_key)
    minima, _ = isoflop.isoflop_minima(fam_rows, loss_key=loss_key)
    written.append(plots.isoflop_curves(fam_rows, minima, os.path.join(plot_dir, f"isoflop_{fam}.png"),
                                        loss_key=loss_key))
    if iso is not None:
      written.append(plots.optimal_frontier(iso, os.path.join(plot_dir, f"frontier_{fam}.png"),
                                            ci=fits[fam]["isoflop"]["ci"]))
  if compare:
    other = [r for r in results.collect(compare) if r["finished"]]
    if not other:
      raise ConfigError(f"--compare: no finished runs under '{compare}'")
    label_a, label_b = "/".join(sorted({r["family"] for r in other})), "/".join(sorted({r["family"] for r in done}))
    if label_a == label_b:
      label_a, label_b = f"{label_a} ({os.path.basename(os.path.normpath(compare))})", \
          f"{label_b} ({os.path.basename(os.path.normpath(sweep_dir))})"
    fits["compute_equivalence"] = dict(a=label_a, b=label_b,
                                       points=frontier.compute_equivalence(other, done, loss_key=loss_key))
    written.append(plots.compute_equivalence(other, done, os.path.join(plot_dir, "compute_equivalence.png"),
                                             label_a=label_a, label_b=label_b, loss_key=loss_key))
  path = os.path.join(sweep_dir, "fits.json")
  with open(path, "w") as f:
    json.dump(_json_safe(fits), f, indent=1)
  return written + [path]


def main(argv: Sequence[str]) -> int:
  doc = __doc__.split("\n\n", 1)
  p = ArgumentParser(prog="python -m common.scaling.report", description=doc[1].strip())
  p.add_argument("--sweep", required=True, help="the sweep folder (common.scaling.sweep --out)")
  p.add_argument("--compare", help="a second sweep: family A of the compute-equivalence plot")
  p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of each fit")
  p.add_argument("--loss", default="eval_loss", choices=("eval_loss", "train_loss"), help="the loss that is fitted")
  args = p.parse_args(argv)
  for path in write_report(args.sweep, compare=args.compare, n_boot=args.bootstrap, loss_key=args.loss):
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  run_main(lambda: main(sys.argv[1:]))
