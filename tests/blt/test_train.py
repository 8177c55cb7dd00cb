"""blt.train: the vocabulary map, patch-slot bounds, config errors, and a short in-process training run."""
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blt import train as blt_train
from blt.patcher import patch
from common.config import ConfigError
from common.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny(arg=None):
  path = os.path.join(ROOT, "blt", "configs", "tiny.py")
  spec = importlib.util.spec_from_file_location("_blt_tiny", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_seqio_to_blt_map():
  # a row: [BOS]'h' 'i' EOS | [BOS] 'a' | pad pad   (seqio ids: byte + 3, pad 0, eos 1)
  inputs = np.array([[0, 107, 108, 1, 0, 100, 0, 0]])
  segs = np.array([[1, 1, 1, 1, 2, 2, 0, 0]])
  pos = np.array([[0, 1, 2, 3, 0, 1, 0, 0]])
  out = blt_train.seqio_to_blt(inputs, segs, pos)
  np.testing.assert_array_equal(out, [[256, 104, 105, 257, 256, 97, 258, 258]])
  np.testing.assert_array_equal(blt_train.seqio_to_blt(jnp.asarray(inputs), segs, pos), out)
  assert blt_train.seqio_to_blt(np.array([[2]]), np.array([[1]]), np.array([[3]]))[0, 0] == blt_train.PAD
  back = blt_train.blt_to_seqio(out)
  np.testing.assert_array_equal(back, inputs)


def test_derived_max_patches_bounds_every_row():
  cfg = _tiny("patcher=space")
  length = 64
  bound = blt_train.resolve_max_patches(cfg.model.patching, length)
  rng = np.random.default_rng(0)
  alphabet = np.frombuffer(b"ab ,.\n", np.uint8)
  worst = np.tile(np.frombuffer(b"a ", np.uint8), length // 2)[None]  # a patch every 2 bytes
  x = np.concatenate([rng.choice(alphabet, (16, length)), worst, np.full((1, length), 32)]).astype(np.int32)
  p = patch(jnp.asarray(x), method="space", max_patches=bound,
            max_patch_length=int(cfg.model.patching.max_patch_length))
  assert int(p.num_patches.max()) <= bound
  assert int(p.num_patches[16]) == length // 2
  static = _tiny().model.patching
  assert blt_train.resolve_max_patches(static, 256) == 64


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="patcher"):
    _tiny("patcher=bpe")
  cfg = _tiny("patcher=entropy")
  with pytest.raises(ConfigError, match="model.patching.method"):
    blt_train.validate_blt_config(cfg)
  cfg = _tiny()
  cfg.model.d_local = 66
  with pytest.raises(ConfigError, match="model.d_local"):
    blt_train.validate_blt_config(cfg)


@pytest.mark.parametrize("patcher", ["space"])
def test_short_training_run(tmp_path, patcher):
  cfg = _tiny(f"patcher={patcher}")
  cfg.model.update(d_local=32, n_heads_local=2, n_heads_cross=2, local_window=16, d_global=64, n_heads_global=2,
                   hash_table_size=256, n_layers_decoder=1, n_layers_global=1)
  cfg.data.seq_len = 64
  cfg.data.cache_dir = str(tmp_path / "cache")
  cfg.data.max_train_bytes = 100_000
  cfg.data.max_eval_bytes = 20_000
  cfg.train.update(steps=6, batch_size=8, warmup_steps=2)
  cfg.log.update(every_steps=2, progress="lines")
  cfg.eval.update(every_steps=6, batches=1)
  cfg.checkpoint.update(every_steps=6, async_save=False)
  workdir = str(tmp_path / "run")
  task = blt_train.make_task(cfg)
  assert train(cfg, workdir, task, devices=jax.devices()[:2]) == 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if "loss" in r]
  losses = [r["loss"] for r in train_rows]
  assert [r["step"] for r in train_rows] == [2, 4, 6]
  assert all(math.isfinite(v) for v in losses) and losses[-1] < math.log(260) + 0.5
  assert all(r["bytes_per_sec"] > 0 and 0 < r["patches_per_byte"] <= 1 for r in train_rows)
  ev = [r for r in rows if "eval/bpb" in r][-1]
  assert math.isfinite(ev["eval/bpb"]) and ev["eval/bytes_per_patch"] >= 1.0
  assert ev["eval/bpb"] == pytest.approx(ev["eval/loss"] / math.log(2))
  assert os.path.isdir(os.path.join(workdir, "checkpoints"))


def test_cli_refuses_entropy_patching_with_status_2(tmp_path):
  import subprocess
  import sys
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "blt.train", "--config=blt/configs/tiny.py:patcher=entropy",
                         f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "model.patching.method" in proc.stderr.strip().splitlines()[-1]
  assert not workdir.exists()
