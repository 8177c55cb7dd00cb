"""common.reproduce, the harness of every `python -m <paper>.reproduce`, against hand-computed cases: the seed
interval, the table with the paper's column, skip / resume / train of a run (the trainer replaced by a fake that
writes what a run leaves in its workdir), --emit_commands, the files main writes, and --help of every study."""
import importlib
import json
import math
import os

import pytest

from common import reproduce
from common.scaling.runs import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "common", "configs", "dense_tiny.py")


def fake_train(calls):
  """A stand-in for common.train.loop.train: continues metrics.jsonl from its last step to train.steps, with
  an eval at the end, and records (workdir, first step trained)."""
  def train(cfg, workdir, task):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(cfg.to_dict(), f)
    path = os.path.join(workdir, "metrics.jsonl")
    done = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
    start = max((r["step"] for r in done), default=0) + 1
    steps = int(cfg.train.steps)
    with open(path, "a") as f:
      for step in range(start, steps + 1):
        f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
      f.write(json.dumps({"step": steps, "eval/loss": 2.0 + task}) + "\n")
    calls.append((os.path.basename(workdir), start))
    return 0
  return train


class Toy(reproduce.Study):
  """Two arms of the dense tiny config, 4 steps; the 'task' is a number the fake trainer logs as eval loss."""
  prog = "toy.reproduce"
  out = "runs/toy"

  def arms(self):
    return [reproduce.Arm("a", "arm A", CONFIG, "common.train", "1.5 (fig. 2)", dict(kind="a")),
            reproduce.Arm("b", "arm B", CONFIG, "common.train", "", dict(kind="b"))]

  def config(self, arm, seed):
    cfg = super().config(arm, seed)
    cfg.train.steps = 4
    return cfg

  def make_task(self, cfg):
    return 0.5 * cfg.train.seed

  def score(self, arm, cfg, task, workdir):
    self.scored = getattr(self, "scored", 0) + 1
    loss = [m["eval/loss"] for m in read_metrics(workdir) if "eval/loss" in m][-1]
    return dict(loss=loss, curves=dict(loss=dict(flops=[4e9], values=[loss])))

  def report(self, records):
    rows = [dict(label=label, paper=records[0]["paper"] if label == "arm A" else "",
                 loss=reproduce.interval([r["loss"] for r in records if r["label"] == label]))
            for label in dict.fromkeys(r["label"] for r in records)]
    lines = reproduce.table(["model", "loss"], [([r["label"], f"{r['loss'][0]:.2f}"], r["paper"]) for r in rows])
    return "\n".join(lines) + "\n", dict(summary=rows)

  def plot(self, records, path):
    return reproduce.plot_curves({"toy": {"A": (records, "loss")}}, path, "loss")


@pytest.fixture
def calls(monkeypatch):
  out = []
  monkeypatch.setattr(reproduce, "train", fake_train(out))
  return out


def study(tmp_path, *flags):
  return Toy(reproduce.parser(Toy, "toy").parse_args([f"--out={tmp_path}", *flags]))


def test_interval_is_the_mean_and_t_half_width_of_the_finite_values():
  # 1, 2, 3: mean 2, s = 1, t_{0.975, 2} = 4.302653 (t table) -> half-width 4.302653 / sqrt(3) = 2.48414
  mean, half, n = reproduce.interval([1.0, 2.0, math.nan, 3.0])
  assert (mean, n) == (2.0, 3) and half == pytest.approx(2.484138, rel=1e-6)
  mean, half, n = reproduce.interval([0.5])
  assert (mean, n) == (0.5, 1) and math.isnan(half)
  assert all(math.isnan(x) for x in reproduce.interval([math.nan])[:2]) and reproduce.interval([math.nan])[2] == 0


def test_table_prints_the_paper_figure_in_the_last_column():
  lines = reproduce.table(["model", "loss"], [(["MoMa", 1.25], "3.7x"), (["dense", 1.5], "")], paper="paper (1T)")
  assert lines == ["| model | loss | paper (1T) |", "|---|---|---|", "| MoMa | 1.25 | 3.7x |", "| dense | 1.5 | - |"]


class Grouped(Toy):
  arm_groups = dict(default=("a", "b"), only_b=("b",))

  @classmethod
  def add_flags(cls, p):
    cls.add_arms_flag(p)


@pytest.mark.parametrize("arms,names,error", [
    (None, ["a", "b"], ""), ("only_b", ["b"], ""), ("b, a", ["b", "a"], ""),
    ("a,c", ["a", "c"], "--arms: unknown arm 'c' (known: a, b)"), (",", [], "--arms: unknown arm ',' (known: a, b)")])
def test_arms_flag_picks_a_group_by_name_or_a_comma_list_and_names_an_unknown_arm(arms, names, error):
  s = Grouped(reproduce.parser(Grouped, "grouped").parse_args([f"--arms={arms}"] if arms else []))
  assert (s.arm_names(), s.unknown_arm()) == (names, error)


def test_a_new_run_trains_and_a_scored_one_is_read_back_without_training(tmp_path, calls):
  s = study(tmp_path)
  arm = s.arms()[0]
  record = reproduce.run_one(s, arm, seed=1)
  assert calls == [("a_s1", 1)] and s.scored == 1
  assert record["label"] == "arm A" and record["kind"] == "a" and record["seed"] == 1
  assert record["loss"] == 2.5 and record["paper"] == "1.5 (fig. 2)"
  assert reproduce.run_one(s, arm, seed=1) == record
  assert calls == [("a_s1", 1)] and s.scored == 1


def test_a_partial_run_resumes_and_a_finished_unscored_one_is_only_scored(tmp_path, calls):
  s = study(tmp_path)
  arm = s.arms()[0]
  workdir = os.path.join(tmp_path, "runs", "a_s0")
  reproduce.run_one(s, arm, seed=0)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:  # killed after step 2: no final eval
    f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= 2)
  reproduce.run_one(s, arm, seed=0)
  assert calls == [("a_s0", 1), ("a_s0", 3)] and s.scored == 2  # the rerun continued from step 3
  os.remove(os.path.join(workdir, reproduce.RECORD))
  reproduce.run_one(s, arm, seed=0)
  assert len(calls) == 2 and s.scored == 3


def test_a_run_made_under_another_config_is_refused_naming_the_key_and_more_steps_extend_it(tmp_path, calls):
  reproduce.run_one(study(tmp_path), study(tmp_path).arms()[0], seed=0)
  workdir = os.path.join(tmp_path, "runs", "a_s0")
  before = {name: open(os.path.join(workdir, name)).read() for name in os.listdir(workdir)}
  changed = study(tmp_path, "--set=model.d_model=48")
  with pytest.raises(reproduce.ConfigError, match=r"a_s0' holds a run with model.d_model=.*48.*another --out"):
    reproduce.run_one(changed, changed.arms()[0], seed=0)
  assert {name: open(os.path.join(workdir, name)).read() for name in os.listdir(workdir)} == before
  assert len(calls) == 1
  longer = Longer(reproduce.parser(Longer, "toy").parse_args([f"--out={tmp_path}"]))
  reproduce.run_one(longer, longer.arms()[0], seed=0)  # more steps extend the run (the trainer records it)
  assert calls[-1] == ("a_s0", 5) and reproduce.run_one(longer, longer.arms()[0], seed=0)["seed"] == 0
  assert len(calls) == 2  # read back, not trained again
  with pytest.raises(reproduce.ConfigError, match="train.steps=6"):  # fewer steps than the run has: refused
    reproduce.run_one(study(tmp_path), study(tmp_path).arms()[0], seed=0)


class Longer(Toy):
  def config(self, arm, seed):
    cfg = super().config(arm, seed)
    cfg.train.steps = 6
    return cfg


def test_emit_commands_prints_one_trainer_command_per_run_and_trains_nothing(tmp_path, calls, capsys):
  out = tmp_path / "out"
  argv = [f"--out={out}", "--emit_commands", "--seeds=2", "--set=model.d_model=48"]
  assert reproduce.main(Toy, "toy", argv) == 0
  lines = capsys.readouterr().out.splitlines()
  config = os.path.relpath(CONFIG)
  flags = "--config.log.progress=lines --config.model.d_model=48 {}--config.train.steps=4"
  seed0, seed1 = flags.format(""), flags.format("--config.train.seed=1 ")
  assert lines == [f"python -m common.train --config={config} --workdir={out}/runs/a_s0 {seed0}",
                   f"python -m common.train --config={config} --workdir={out}/runs/b_s0 {seed0}",
                   f"python -m common.train --config={config} --workdir={out}/runs/a_s1 {seed1}",
                   f"python -m common.train --config={config} --workdir={out}/runs/b_s1 {seed1}"]
  assert calls == []


def test_main_writes_the_table_json_and_plot_over_three_seeds_by_default(tmp_path, calls):
  assert reproduce.main(Toy, "toy", [f"--out={tmp_path}"]) == 0
  assert len(calls) == 6
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["command"] == f"python -m toy.reproduce --out={tmp_path}" and results["args"]["seeds"] == 3
  assert [(r["name"], r["seed"]) for r in results["runs"]] == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2),
                                                               ("b", 2)]
  # losses 2.0, 2.5, 3.0 over seeds: mean 2.5, half-width 4.302653 * 0.5 / sqrt(3)
  assert results["summary"][0]["loss"] == pytest.approx([2.5, 4.302653 * 0.5 / math.sqrt(3), 3], rel=1e-6)
  assert (tmp_path / "results.md").read_text() == results["table"]
  assert "| arm A | 2.50 | 1.5 (fig. 2) |" in results["table"] and "| arm B | 2.50 | - |" in results["table"]
  assert (tmp_path / "loss_vs_flops.png").stat().st_size > 0
  assert reproduce.main(Toy, "toy", [f"--out={tmp_path}", "--quick"]) == 0  # one seed: all read back
  assert len(calls) == 6


@pytest.mark.parametrize("paper", ["blt", "mot", "moma", "moe_scaling"])
def test_help_lists_the_shared_and_the_paper_flags(paper, capsys):
  module = importlib.import_module(f"{paper}.reproduce")
  with pytest.raises(SystemExit) as exit_info:
    module.main(["--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  for flag in ("--out", "--seeds", "--quick", "--emit_commands", "--cache_dir", "--set"):
    assert flag in text
  assert f"python -m {paper}.reproduce" in text


def test_paced_scales_warmup_evals_checkpoints_and_logs_to_the_steps():
  cfg = reproduce.load(CONFIG)
  cfg.train.update(steps=45, warmup_steps=30)
  reproduce.paced(cfg, 4)
  assert (cfg.train.warmup_steps, cfg.eval.every_steps, cfg.checkpoint.every_steps, cfg.log.every_steps) == (4, 12, 23, 10)
