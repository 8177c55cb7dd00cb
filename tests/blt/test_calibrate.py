"""blt.calibrate: the threshold it finds gives the target mean patch size (within 5%) on the entropies of a
real byte LM trained for a few steps, counted independently in numpy; and its command line."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from blt.calibrate import calibrate_threshold, mean_patch_size, patches_per_row, sample_patching_inputs
from blt.data import PatchingData
from blt.entropy import EntropyScorer, load_entropy_model
from blt.patcher import patch
from common import config as config_lib
from common.data import LMData
from common.tasks.lm import lm_task, resolve
from common.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_entropy_config(cache_dir: str):
  cfg = config_lib.load(os.path.join(ROOT, "blt/configs/entropy_tiny.py"))
  cfg.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, window=16)
  cfg.data.update(seq_len=64, cache_dir=cache_dir, max_train_bytes=100_000, max_eval_bytes=20_000)
  cfg.train.update(steps=30, batch_size=8, warmup_steps=5, learning_rate=1e-2)
  cfg.log.update(every_steps=10, progress="lines")
  cfg.eval.update(every_steps=30, batches=2)
  cfg.checkpoint.update(every_steps=30, async_save=False)
  return cfg


@pytest.fixture(scope="module")
def entropy_workdir(tmp_path_factory):
  cfg = tiny_entropy_config(str(tmp_path_factory.getbasetemp() / "blt_data_cache"))
  workdir = str(tmp_path_factory.mktemp("calibrate") / "entropy_model")
  assert train(cfg, workdir, lm_task(resolve(cfg)), devices=jax.devices()[:1]) == 0
  return workdir


@pytest.fixture(scope="module")
def sample(entropy_workdir):
  model, cfg = load_entropy_model(entropy_workdir)
  data = PatchingData(LMData(cfg.data, batch_size=8, seed=0), entropy_scorer=EntropyScorer(model))
  return sample_patching_inputs(data, sample_bytes=64 * 64)


def _numpy_mean_patch_size(sample, theta, monotonic, max_len):
  """Bytes of the documents over the patches that open on them, from blt.patcher's starts."""
  method = "entropy_monotonic" if monotonic else "entropy"
  h, seg, pos = (jnp.asarray(sample[k]) for k in ("entropies", "segment_ids", "positions"))
  starts = np.asarray(patch(jnp.zeros(h.shape, jnp.int32), method=method, max_patches=h.shape[1], entropies=h,
                            threshold=theta, max_patch_length=max_len, segment_ids=seg, positions=pos).patch_starts)
  in_doc = sample["segment_ids"] > 0
  return in_doc.sum() / (starts & in_doc).sum()


@pytest.mark.parametrize("monotonic,max_len", [(False, 0), (False, 16), (True, 0)])
@pytest.mark.parametrize("target", [3.0, 6.0])
def test_threshold_gives_the_target_patch_size_within_5_percent(sample, monotonic, max_len, target):
  assert sample["entropies"].std() > 0.1  # a real model: entropies vary with the bytes
  theta, achieved = calibrate_threshold(sample["entropies"], target, monotonic=monotonic, max_patch_length=max_len,
                                        segment_ids=sample["segment_ids"], positions=sample["positions"])
  assert achieved == pytest.approx(_numpy_mean_patch_size(sample, theta, monotonic, max_len), rel=1e-6)
  assert abs(achieved - target) <= 0.05 * target


def test_patches_per_row_count_what_the_mean_patch_size_divides_by(sample):
  """Per row, the patches the slot bound is measured from (blt.train.resolve_max_patches): summed, the
  documents' patches behind `mean_patch_size`, plus one for each row's padding (packing pads at the end)."""
  assert set(sample) == {"inputs", "segment_ids", "positions", "entropies"}
  theta = float(np.median(sample["entropies"]))
  p = ml_collections.ConfigDict(dict(method="entropy", patch_size=6, threshold=theta, max_patch_length=0))
  counts = patches_per_row(sample, p)
  in_doc = sample["segment_ids"] > 0
  doc_patches = in_doc.sum() / mean_patch_size(sample["entropies"], theta, segment_ids=sample["segment_ids"],
                                               positions=sample["positions"])
  assert counts.shape == (len(in_doc),) and counts.min() >= 2  # BOS, then the first byte
  assert counts.sum() == pytest.approx(doc_patches + (~in_doc).any(axis=1).sum(), abs=1e-3)


def test_unreachable_target_returns_the_nearest_end(sample):
  theta, achieved = calibrate_threshold(sample["entropies"], 0.5, segment_ids=sample["segment_ids"],
                                        positions=sample["positions"])
  assert achieved == pytest.approx(1.0)  # every byte its own patch
  assert theta < sample["entropies"].min()


def test_cli_prints_threshold_and_override(entropy_workdir, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "blt.calibrate", f"--entropy-model={entropy_workdir}",
                         "--target-patch-size=5", "--sample-bytes=4096"], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  mean = float(re.search(r"mean ([\d.]+) bytes per patch", proc.stdout).group(1))
  theta = re.search(r"--config.model.patching.threshold=([-\d.]+)", proc.stdout).group(1)
  assert abs(mean - 5) <= 0.25 and float(theta) > 0
  missing = subprocess.run([sys.executable, "-m", "blt.calibrate", f"--entropy-model={tmp_path}/none",
                            "--target-patch-size=5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert missing.returncode == 2
  assert f"{tmp_path}/none" in missing.stderr.strip().splitlines()[-1]
