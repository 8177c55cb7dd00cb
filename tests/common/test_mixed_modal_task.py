"""The mixed-modal training task: per-modality losses against a hand computation, and a two-step run of the
shared loop whose metrics carry the loss of each modality."""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from common.config import ConfigError
from common.configs.base import base_config, dense_model
from common.data.mixed_modal import AUDIO, IMAGE, TEXT, mixed_modal_data_config
from common.models import build_model
from common.train.loop import train
from common.tasks.mixed_modal import mixed_modal_task, modality_summary, per_modality_nll, resolve, train_view
from tests.patch_colour_tokenizer import PatchColourTokenizer


def _tiny_batch():
  logits = np.array([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0], [5.0, 0.0, 0.0]]],
                    np.float32)
  batch = dict(targets=np.array([[0, 1, 2, 0, 1]], np.int32),
               target_modality=np.array([[TEXT, IMAGE, IMAGE, AUDIO, TEXT]], np.int32),
               loss_mask=np.array([[1, 1, 1, 1, 0]], np.float32))
  return logits, batch


def _nll(row, target):
  return math.log(sum(math.exp(x) for x in row)) - row[target]


def test_per_modality_nll_matches_a_hand_computation():
  logits, batch = _tiny_batch()
  per_pos = [_nll(logits[0, i], batch["targets"][0, i]) for i in range(5)]
  total, weight, sums = per_modality_nll(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), batch)
  assert float(total) == pytest.approx(sum(per_pos[:4]), rel=1e-5)   # the masked position does not count
  assert float(weight) == 4
  expected = {"nll/text": per_pos[0], "weight/text": 1, "nll/image": per_pos[1] + per_pos[2],
              "weight/image": 2, "nll/audio": per_pos[3], "weight/audio": 1}
  assert {k: float(v) for k, v in sums.items()} == pytest.approx(expected, rel=1e-5)
  view = train_view(sums, weight)
  assert float(view["loss_image"]) / 4 == pytest.approx((per_pos[1] + per_pos[2]) / 2, rel=1e-5)


def test_summary_reports_the_mean_of_each_present_modality_only():
  sums = {"loss": 9.0, "weight": 6.0, "nll/text": 4.0, "weight/text": 2.0, "nll/image": 5.0,
          "weight/image": 4.0, "nll/audio": 0.0, "weight/audio": 0.0}
  assert modality_summary(sums) == {"loss_text": 2.0, "loss_image": 1.25}


def _cfg(tmp_path, modalities):
  cfg = base_config()
  cfg.model = dense_model(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
  cfg.data = mixed_modal_data_config()
  cfg.data.update(dict(modalities=modalities, image_size=16, seq_len=128, n_train_docs=40, n_eval_docs=10,
                       audio_codebook=16, cache_dir=str(tmp_path / "cache")))
  cfg.train.update(steps=2, batch_size=8, warmup_steps=1)
  cfg.eval.update(every_steps=2, batches=2)
  cfg.log.update(every_steps=1, progress="lines")
  cfg.checkpoint.update(every_steps=2, async_save=False)
  return cfg


def test_two_steps_report_each_modality_in_train_and_eval(tmp_path):
  cfg = _cfg(tmp_path, ("text", "image", "audio"))
  tokenizer = PatchColourTokenizer(16)
  task = mixed_modal_task(resolve(cfg, tokenizer.codebook_size), build_model, image_tokenizer=tokenizer)
  assert cfg.model.vocab_size == 384 and task.data.vocab_size == 263 + 64 + 16  # padded to 128
  assert train(cfg, str(tmp_path / "run"), task) == 0
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  train_rows = [r for r in rows if "loss" in r]
  evals = [r for r in rows if "eval/loss" in r]
  assert all(np.isfinite(r[f"loss_{m}"]) for r in train_rows for m in ("text", "image", "audio"))
  per_mod = np.array([evals[-1][f"eval/loss_{m}"] for m in ("text", "image", "audio")])
  # The overall loss is the token-weighted mean of the three, weights counted from the eval batches.
  counts = np.zeros(3)
  for batch in task.data.eval_batches(cfg.eval.batches):
    counts += np.bincount(batch["target_modality"][batch["loss_mask"] > 0], minlength=3)
  assert evals[-1]["eval/loss"] == pytest.approx(float(per_mod @ counts / counts.sum()), rel=1e-4)


def test_transfusion_without_a_diffusion_loss_is_refused(tmp_path):
  cfg = _cfg(tmp_path, ("text", "image"))
  cfg.data.setting = "transfusion"
  with pytest.raises(ConfigError, match="data.setting"):
    mixed_modal_task(cfg, build_model)
