"""Bits per byte (blt.train.blt_summary) counts byte targets only: a BLT whose next-byte distribution is uniform
over the 256 byte values scores exactly 8 on real eval rows, although those rows also have EOS targets."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from blt.model import BLT
from blt.data import EOS, seqio_to_blt
from blt.train import blt_loss, blt_summary, resolve_max_patches
from common import config as config_lib
from common.data import LMData

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny_config(cache_dir: str):
  cfg = config_lib.load(os.path.join(ROOT, "blt/configs/tiny.py"))
  cfg.model.update(d_local=32, n_heads_local=2, n_heads_cross=2, local_window=16, d_global=64, n_heads_global=2,
                   hash_table_size=256, n_layers_decoder=1, n_layers_global=1)
  cfg.data.update(seq_len=64, cache_dir=cache_dir, max_train_bytes=100_000, max_eval_bytes=20_000)
  return cfg


class OnlyBytes(nnx.Module):
  """A BLT with its special-id logits (BOS, EOS, PAD, BOE) pushed to -1e9: no probability on them."""

  def __init__(self, blt: BLT):
    self.blt = blt

  def __call__(self, *args):
    logits = self.blt(*args)
    return logits.at[..., 256:].add(-1e9)


@pytest.mark.parametrize("bytes_only", [True, False])
def test_uniform_model_bits_per_byte(tmp_path_factory, bytes_only):
  cfg = _tiny_config(str(tmp_path_factory.getbasetemp() / "blt_data_cache"))
  blt = BLT(cfg.model, rngs=nnx.Rngs(params=0))
  blt.local_decoder.lm_head.kernel[...] = jnp.zeros_like(blt.local_decoder.lm_head.kernel[...])  # logits all 0
  model = OnlyBytes(blt) if bytes_only else blt
  data = LMData(cfg.data, batch_size=8, seed=0)
  max_patches = resolve_max_patches(cfg.model.patching, 64, max_segments=64)
  loss = nnx.jit(lambda mdl, batch: blt_loss(mdl, batch, patching=cfg.model.patching, max_patches=max_patches))
  sums, eos_targets, used = {}, 0, 0
  for batch in data.eval_batches():
    targets = seqio_to_blt(batch["targets"], batch["segment_ids"], np.ones_like(batch["positions"]))
    n_eos = int(((targets == EOS) & (batch["loss_mask"] > 0)).sum())
    if used and not n_eos:  # the first batch, then only batches where documents end
      continue
    total, weight, extra = jax.device_get(loss(model, batch))
    for k, v in {"loss": total, "weight": weight, **extra}.items():
      sums[k] = sums.get(k, 0.0) + float(v)
    eos_targets, used = eos_targets + n_eos, used + 1
    if used == 3:
      break
  assert eos_targets > 0  # the rows end documents: EOS targets are there, and must not count
  assert sums["byte_targets"] == sums["weight"] - eos_targets
  expected = 8.0 if bytes_only else math.log2(260)
  assert blt_summary(sums)["bpb"] == pytest.approx(expected, rel=1e-5)  # f32 sums
