"""Compute-at-equal-loss arithmetic on hand-made curves, and eval curves read from a metrics.jsonl."""
import json
import math

import pytest

from common.scaling import matching, runs


def test_x_to_reach_interpolates_in_log_x():
  # Loss falls from 3 at x=10 to 1 at x=1000: the target 2 lies half way, i.e. at x=100 in log space.
  assert matching.x_to_reach([10, 1000], [3.0, 1.0], 2.0) == pytest.approx(100.0)
  assert matching.x_to_reach([10, 1000], [3.0, 1.0], 1.0) == pytest.approx(1000.0)
  assert matching.x_to_reach([10, 1000], [3.0, 1.0], 3.5) == 10.0  # already below at the first point
  assert math.isnan(matching.x_to_reach([10, 1000], [3.0, 1.0], 0.5))


def test_x_to_reach_takes_the_first_crossing():
  # Noisy curve: dips below 2 at x=2, back up, below again later; the first crossing counts.
  x = [1, 2, 3, 4]
  assert matching.x_to_reach(x, [2.5, 1.9, 2.1, 1.5], 2.0) == pytest.approx(math.exp(math.log(2) * 5 / 6))


def test_fraction_and_factor():
  dense_x, dense = [1, 2, 4, 8], [4.0, 3.0, 2.0, 1.0]
  # The other model reaches 1.0 (the dense final loss) at x=4: half the dense compute, factor 2.
  other_x, other = [1, 2, 4, 8], [3.0, 2.0, 1.0, 0.5]
  assert matching.fraction_to_reach(dense_x, dense, other_x, other) == pytest.approx(0.5)
  assert matching.compute_factor(dense_x, dense, other_x, other) == pytest.approx(2.0)
  # A worse model ends at 2.0, which dense reached at x=4 of the other's 8: factor 0.5.
  worse = [4.0, 3.5, 3.0, 2.0]
  assert math.isnan(matching.fraction_to_reach(dense_x, dense, other_x, worse))
  assert matching.compute_factor(dense_x, dense, other_x, worse) == pytest.approx(0.5)


def test_eval_curve_counts_training_seconds_and_flops(tmp_path):
  rows = [dict(step=10, loss=3.0, step_time=0.5), dict(step=20, loss=2.5, step_time=1.0),
          {"step": 20, "eval/loss": 2.4}, dict(step=30, loss=2.0, step_time=0.5), {"step": 30, "eval/loss": 2.1}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  curve = runs.eval_curve(str(tmp_path), "eval/loss", flops_per_step=1e9)
  assert curve.steps == [20, 30]
  assert curve.flops == [2e10, 3e10]
  assert curve.seconds == pytest.approx([10 * 0.5 + 10 * 1.0, 15.0 + 10 * 0.5])
  assert curve.values == [2.4, 2.1]
  assert not runs.finished(str(tmp_path))  # no config.json
  (tmp_path / "config.json").write_text(json.dumps({"train": {"steps": 30}}))
  assert runs.finished(str(tmp_path))


def test_format_pm():
  assert runs.format_pm(1.2345, math.nan, ".2f") == "1.23"
  assert runs.format_pm(1.2345, 0.1, ".2f") == "1.23 ± 0.10"
