"""A tiny real sweep end to end: 2 budgets x 3 sizes of the dense LM on the embedded byte corpus (a few dozen
to a few hundred steps each), trained in-process on one CPU device. It writes the results table and the
plots; rerunning it trains nothing; a killed run resumes from its checkpoint; the notebook runs top to bottom
on its output. The tests share one sweep and run in file order."""
import glob
import json
import math
import os
import shutil

import jax
import pytest

from common.scaling import budget, families, report, results, sweep

BUDGETS, SIZES = [5e9, 1e10], [32, 48, 64]
KILLED = "dense_lm_C1e10_s32"  # 130 steps, checkpoints every 50 (keep 2): 100 and 130 on disk


def run(plan, out):
  return sweep.run_sweep(plan, out, devices=jax.devices()[:1], log=lambda line: None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("scaling")
  overrides = [("data.cache_dir", str(root / "cache")), ("data.max_train_bytes", "200000"),
               ("data.max_eval_bytes", "20000"), ("eval.batches", "2"), ("log.progress", "lines")]
  plan = budget.plan_sweep(families.dense_lm, BUDGETS, SIZES, family="dense_lm", overrides=overrides)
  out = str(root / "sweep")
  first = run(plan, out)
  written = report.write_report(out, n_boot=20, chinchilla_boot=3)
  return dict(plan=plan, out=out, first=first, written=written)


def test_tiny_sweep_trains_every_planned_run(tiny):
  assert len(tiny["plan"].runs) == 6 and not tiny["plan"].dropped
  assert sorted(tiny["first"].trained) == sorted(r.name for r in tiny["plan"].runs)
  assert tiny["first"].exit_code == 0


def test_results_table_has_one_finished_row_per_run(tiny):
  out = tiny["out"]
  assert os.path.join(out, "results.csv") in tiny["written"]
  for rows in (results.read_table(os.path.join(out, "results.csv")),
               results.read_table(os.path.join(out, "results.json"))):
    assert len(rows) == 6
    assert set(results.COLUMNS) <= set(rows[0])
    for r in rows:
      assert r["finished"] and r["family"] == "dense_lm"
      assert abs(r["flops"] - r["budget"]) / r["budget"] <= 0.01
      assert r["params_total"] > r["params_non_embedding"] > 0
      assert r["tokens"] == r["steps"] * 8 * 64
      for key in ("train_loss", "eval_loss", "wall_time", "mfu"):
        assert math.isfinite(r[key]) and r[key] > 0, key
      assert r["eval_loss"] < math.log(384)  # learned something beyond a uniform guess


def test_report_writes_fits_and_plots(tiny):
  """Loss-vs-FLOPs and IsoFLOP PNGs always; the N_opt(C) frontier PNG exactly when two budgets gave a convex
  IsoFLOP parabola (a few-step sweep of undertrained models need not), otherwise fits.json says why."""
  out = tiny["out"]
  with open(os.path.join(out, "fits.json")) as f:
    fits = json.load(f)["dense_lm"]
  assert set(fits) == {"isoflop", "chinchilla", "loss_vs_compute"}
  assert "E" in fits["chinchilla"] and "ci" in fits["chinchilla"]
  expected = ["isoflop_dense_lm.png", "loss_vs_flops.png"]
  if "error" in fits["isoflop"]:
    assert "minima" in fits["isoflop"]["error"]
  else:
    expected.insert(0, "frontier_dense_lm.png")
  pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "plots", "*.png")))
  assert pngs == expected
  assert all(os.path.getsize(os.path.join(out, "plots", p)) > 5000 for p in pngs)


def _mtimes(out):
  return {p: os.path.getmtime(p) for p in glob.glob(os.path.join(out, "runs", "*", "metrics.jsonl"))}


def test_rerunning_the_sweep_does_no_training(tiny):
  before = _mtimes(tiny["out"])
  again = run(tiny["plan"], tiny["out"])
  assert again.trained == [] and len(again.skipped) == 6
  assert _mtimes(tiny["out"]) == before


def test_notebook_runs_top_to_bottom_on_the_sweep(tiny, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("SCALING_SWEEP_DIR", tiny["out"])
  path = os.path.join(os.path.dirname(__file__), "..", "..", "notebooks", "scaling_laws.ipynb")
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "6 of 6 runs finished" in text and "L(N, D) = " in text
  images = sum(o.output_type == "display_data" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert images == len(glob.glob(os.path.join(tiny["out"], "plots", "*.png")))  # the report's plots


def _read(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def test_a_killed_run_resumes_from_its_checkpoint(tiny):
  """Simulate a kill at step 120 of 130: the final checkpoint never written, metrics logged past the last
  checkpoint (100). The rerun trains only that run, from step 100 (earlier metric lines untouched), and
  ends where the uninterrupted run ended."""
  workdir = os.path.join(tiny["out"], "runs", KILLED)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  full = _read(metrics_path)
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [100, 130]
  shutil.rmtree(os.path.join(workdir, "checkpoints", "130"))
  with open(metrics_path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in full if r["step"] <= 120)
  assert not sweep.is_finished(workdir, 130)

  again = run(tiny["plan"], tiny["out"])
  assert again.trained == [KILLED] and len(again.skipped) == 5
  resumed = _read(metrics_path)
  assert [r for r in resumed if r["step"] <= 100] == [r for r in full if r["step"] <= 100]
  final_before = [r for r in full if r["step"] == 130]
  final_after = [r for r in resumed if r["step"] == 130]
  assert final_after[0]["loss"] == pytest.approx(final_before[0]["loss"], rel=1e-4)
  assert final_after[-1]["eval/loss"] == pytest.approx(final_before[-1]["eval/loss"], rel=1e-4)
