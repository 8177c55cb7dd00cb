"""`python -m mot.train`: tiny Chameleon (with a VQ tokenizer trained here for two steps) and Transfusion runs
through the trainer's command line, per-modality eval losses and eval captions in the workdir, exact resume,
config checks naming the key, and bad input -> one line on stderr and exit status 2."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from common.config import ConfigError
from common.train.__main__ import main
from mot import train as mot_train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "mot", "configs", "tiny.py")


def _small(cache_dir, steps: int, *extra: str) -> list[str]:
  """Flags of a run of a few steps on a few generated documents."""
  return [f"--config.train.steps={steps}", "--config.train.warmup_steps=1", "--config.eval.every_steps=2",
          "--config.checkpoint.every_steps=2", "--config.log.every_steps=1", "--config.eval.batches=1",
          "--config.data.n_train_docs=48", "--config.data.n_eval_docs=12", "--config.data.seq_len=160",
          "--config.model.n_layers=1", "--config.model.d_model=32", "--config.model.d_ff=64",
          "--config.eval.sample_images=0", f"--config.data.cache_dir={cache_dir}", "--config.log.progress=lines",
          *extra]


def _train(args: list[str]) -> int:
  return main(args, mot_train.make_task, mot_train.validate, mot_train.resolve)


def _rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
  """A VQ tokenizer run of two steps (its codes are poor, but any tokenizer makes valid documents)."""
  workdir = str(tmp_path_factory.mktemp("vq"))
  from common.tasks.vq import validate_vq_task_config, vq_task
  args = [f"--config={ROOT}/mot/configs/image_tokenizer.py", f"--workdir={workdir}", "--config.train.steps=2",
          "--config.train.batch_size=8", "--config.model.channels=8", "--config.data.n_train_images=16",
          "--config.data.n_eval_images=8", "--config.checkpoint.every_steps=2", "--config.eval.every_steps=2",
          "--config.log.progress=lines"]
  assert main(args, vq_task, validate_vq_task_config) == 0
  return workdir


def test_chameleon_reports_each_modality_and_captions(tmp_path, vq_run):
  workdir = tmp_path / "run"
  args = [f"--config={TINY}", f"--workdir={workdir}",
          *_small(tmp_path / "cache", 2, f"--config.data.image_tokenizer={vq_run}", "--config.eval.sample_images=1")]
  assert _train(args) == 0
  final = [r for r in _rows(workdir) if "eval/loss" in r][-1]
  assert final["step"] == 2
  for m in ("text", "image"):
    assert 0 < final[f"eval/loss_{m}"] < 20
  train_row = [r for r in _rows(workdir) if "loss" in r][-1]
  assert train_row["tokens_per_sec"] > 0 and train_row["mfu"] > 0
  samples = (workdir / "samples.txt").read_text()
  assert "=== step 2" in samples and "[image: a " in samples


def test_transfusion_resumes_exactly(tmp_path):
  """Four steps straight, then the same run cut back to its step-2 checkpoint and rerun: the same numbers
  (caption dropout on: its draws, too, come from the step's training key)."""
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  args = [f"--config={TINY}:setting=transfusion", *_small(tmp_path / "cache", 4),
          "--config.model.diffusion.caption_dropout=0.5"]
  assert _train(args + [f"--workdir={straight}"]) == 0
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  assert _train(args + [f"--workdir={resumed}"]) == 0
  keys = ("loss", "eval/loss", "eval/loss_text", "eval/loss_image")
  at_4 = [{k: v for r in _rows(d) if r["step"] == 4 for k, v in r.items() if k in keys} for d in (straight, resumed)]
  assert set(at_4[0]) == set(keys)
  for k in keys:
    np.testing.assert_allclose(at_4[1][k], at_4[0][k], rtol=1e-5, err_msg=k)


def test_resolve_derives_the_model_keys_from_the_data_and_validate_names_the_key():
  from common.config import load
  cfg = mot_train.resolve(load(f"{TINY}:setting=transfusion,model=dense"))
  assert (cfg.model.setting, cfg.model.patch_dim, cfg.model.patches_per_image) == ("transfusion", 48, 64)
  assert cfg.model.vocab_size == 384 and not cfg.model.untied  # 263 text and marker ids + 1 placeholder
  mot_train.validate(cfg)
  cfg.model.name = "dense_lm"
  with pytest.raises(ConfigError, match="model.name"):
    mot_train.validate(cfg)
  cfg = mot_train.resolve(load(f"{TINY}:modalities=text+image+audio"))
  assert cfg.model.n_modalities == 3
  cfg.model.d_model = 30
  with pytest.raises(ConfigError, match="model.d_model"):
    mot_train.validate(cfg)
  with pytest.raises(ConfigError, match="transfusion setting is text\\+image only"):
    load(f"{TINY}:setting=transfusion,modalities=text+image+audio")


def test_the_paper_configs_use_post_norms_for_both_models_and_the_placement_is_checked():
  """MoT's Algorithm 1 normalises sublayer outputs (Chameleon sec. 2.3); the dense baseline (Chameleon) too,
  so it is MoT with one weight group; `norm=pre` keeps the layout of older runs (the common dense LM)."""
  from common.config import load
  for setting in ("chameleon", "transfusion"):
    for model, untied in (("mot", True), ("dense", False)):
      m = mot_train.resolve(load(f"{ROOT}/mot/configs/reproduce.py:setting={setting},model={model}")).model
      assert (m.name, m.untied, m.norm_placement) == ("mot", untied, "post")
  cfg = mot_train.resolve(load(f"{TINY}:model=dense,norm=pre"))
  assert (cfg.model.name, cfg.model.norm_placement) == ("dense_lm", "pre")
  mot_train.validate(cfg)
  cfg.model.norm_placement = "post"
  with pytest.raises(ConfigError, match="model.norm_placement"):
    mot_train.validate(cfg)
  cfg = mot_train.resolve(load(TINY))
  cfg.model.norm_placement = "sandwich"
  with pytest.raises(ConfigError, match="model.norm_placement"):
    mot_train.validate(cfg)
  del cfg.model["norm_placement"]  # a config written before the key: pre-norms
  from mot.model import norm_placement
  assert norm_placement(cfg.model) == "pre"


def test_transfusion_eval_summary_is_the_objective_over_the_eval_set():
  sums = {"nll/text": 30.0, "weight/text": 10.0, "mse/image": 8.0, "weight/image": 40.0}
  out = mot_train.transfusion_summary(sums, loss_weight=5.0)
  assert out["loss_text"] == 3.0 and out["loss_image"] == 0.2 and out["loss"] == 3.0 + 5.0 * 0.2
  assert mot_train.transfusion_summary({"nll/text": 3.0, "weight/text": 2.0}, 5.0)["loss"] == 1.5


def test_cli_bad_key_exits_2(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "mot.train", f"--config={TINY}", f"--workdir={tmp_path / 'w'}",
                         "--config.model.no_such_key=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith("error: unknown config key 'model.no_such_key'")
  assert not (tmp_path / "w").exists()
