"""Planning IsoFLOP sweeps (no training): FLOPs of every planned run within 1% of its budget, counted by
common.flops; families named as module:function; the emitted trainer commands reproduce the planned configs."""
import json
import os
import shlex

import pytest

from common.config import ConfigError, parse_argv
from common.flops import training_flops_per_token
from common.scaling import budget, families, sweep

BUDGETS = [1e9, 3e9, 1e10, 3e10, 1e11, 3e11, 1e12]
SIZES = list(families.dense_lm.default_sizes)


def test_every_planned_run_is_within_1_percent_of_its_budget():
  plan = budget.plan_sweep(families.dense_lm, BUDGETS, SIZES, family="dense_lm")
  assert len(plan.runs) + len(plan.dropped) == len(BUDGETS) * len(SIZES)
  planned = {(r.budget, r.size) for r in plan.runs}
  for size in SIZES:  # from 50 steps on, rounding to a whole step can never miss by more than 1%
    per_step = budget.flops_per_step(families.dense_lm(size))
    assert all((c, size) in planned for c in BUDGETS if c / per_step >= 50)
  for run in plan.runs:
    assert abs(run.flops - run.budget) / run.budget <= 0.01, run.name
    assert run.config.train.steps == run.steps


def test_planned_flops_come_from_common_flops_not_6nd():
  run = budget.plan_sweep(families.dense_lm, [1e11], [64], family="dense_lm").runs[0]
  seq = run.config.data.seq_len
  assert run.flops == pytest.approx(run.tokens * training_flops_per_token(run.config.model, seq), rel=1e-12)
  assert run.flops != pytest.approx(6 * run.params_non_embedding * run.tokens, rel=0.05)


def test_budgets_too_small_for_one_step_granularity_are_dropped_and_named():
  plan = budget.plan_sweep(families.dense_lm, [1e9, 1e11], [32, 128], family="dense_lm")
  names = [r.name for r in plan.runs]
  assert "dense_lm_C1e11_s128" in names and "dense_lm_C1e9_s128" not in names
  assert any("size 128 at C=1e+09" in line for line in plan.dropped)


def test_config_overrides_change_the_plan():
  """A larger batch is applied before planning: fewer, bigger steps for the same budget."""
  small = budget.plan_sweep(families.dense_lm, [1e11], [32], family="dense_lm").runs[0]
  big = budget.plan_sweep(families.dense_lm, [1e11], [32], family="dense_lm",
                          overrides=[("train.batch_size", "32")]).runs[0]
  assert big.config.train.batch_size == 32
  assert big.steps == pytest.approx(small.steps / 4, abs=1)


@pytest.mark.parametrize("spec, fragment", [
    ("dense_lm", "module:function"),
    ("no_such_module_xyz:fn", "cannot import"),
    ("common.scaling.families:nope", "no function 'nope'"),
])
def test_bad_family_strings_are_config_errors_naming_the_flag(spec, fragment):
  with pytest.raises(ConfigError, match="--family") as e:
    families.resolve_family(spec)
  assert fragment in str(e.value)


def test_sweep_cli_rejects_unknown_flags_and_bad_budgets():
  with pytest.raises(ConfigError, match="--budgets"):
    sweep.main(["--family=common.scaling.families:dense_lm", "--budgets=1e10,abc", "--out=x"])
  with pytest.raises(ConfigError, match="unknown flag '--bogus'"):
    sweep.main(["--bogus=1"])


def test_emitted_commands_reproduce_the_planned_configs(tmp_path, capsys):
  """One `python -m common.train` line per run; parsing it as the trainer would gives the planned config."""
  out = tmp_path / "sweep"
  code = sweep.main(["--family=common.scaling.families:dense_lm", "--budgets=1e10,2e10", "--sizes=32,64",
                     f"--out={out}", "--emit_commands", "--config.data.max_train_bytes=123456"])
  assert code == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if l and not l.startswith("#")]
  plan = budget.plan_sweep(families.dense_lm, [1e10, 2e10], [32, 64], family="dense_lm",
                           overrides=[("data.max_train_bytes", "123456")])
  assert len(lines) == len(plan.runs) == 4
  for line, run in zip(lines, plan.runs):
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "common.train"]
    cfg, flags = parse_argv(argv[3:])
    assert flags["workdir"] == os.path.join(str(out), "runs", run.name)
    assert cfg.to_dict() == run.config.to_dict()
    with open(os.path.join(flags["workdir"], "scaling.json")) as f:
      assert json.load(f)["steps"] == run.steps  # prepared for `report` after the cluster runs
