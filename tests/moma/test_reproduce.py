"""`python -m moma.reproduce --quick`: a handful of steps of the dense model and MoMa + MoD, aux routers on
the latter, then the table (FLOPs savings teacher-forced and causal, causal gap under the default rule) and the
plot; a second call reuses the finished runs."""
import json
import os

from moma import reproduce


def test_quick_reproduce_writes_the_tables_and_the_plot(tmp_path):
  out = str(tmp_path / "out")
  argv = ["--quick", f"--out={out}", "--variants=dense,moma_mod", "--steps=3", "--aux_steps=3",
          "--aux_eval_batches=1"]
  assert reproduce.main(argv) == 0
  table = open(os.path.join(out, "results.md")).read()
  assert "| dense |" in table and "| MoMa + MoD |" in table
  assert "Causal inference with auxiliary routers" in table
  assert "teacher-forced eval loss" in table and "causal eval loss" in table and "p > 0.5" in table
  assert os.path.getsize(os.path.join(out, "loss_vs_flops.png")) > 0
  with open(os.path.join(out, "results.json")) as f:
    results = json.load(f)
  mod = next(r for r in results["summary"] if r["variant"] == "moma_mod")
  for part in ("overall", "text", "image"):
    assert mod[f"savings_{part}"][0] > 0  # a factor (mean, NaN half-width with one seed)
    assert mod[f"causal_savings_{part}"][0] > 0
    tf, causal = mod[f"teacher_forced_{part}"][0], mod[f"causal_{part}"][0]
    assert abs(mod[f"gap_{part}"][0] - (causal - tf)) < 1e-9
  with open(os.path.join(out, "runs", "moma_mod_s0", "aux_routers", "result.json")) as f:
    aux = json.load(f)
  assert aux["rule"] == "threshold" and aux["causal"] == aux["threshold"] and "top1_gap_overall" in aux
  # MoD lowers the FLOPs per token at the same shape.
  dense = next(r for r in results["summary"] if r["variant"] == "dense")
  assert mod["flops_per_token"] < dense["flops_per_token"]
  # Finished runs are not trained again.
  before = os.path.getmtime(os.path.join(out, "runs", "dense_s0", "metrics.jsonl"))
  assert reproduce.main(argv) == 0
  assert os.path.getmtime(os.path.join(out, "runs", "dense_s0", "metrics.jsonl")) == before
