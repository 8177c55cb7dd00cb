"""Bits per byte has one definition (blt.train's docstring): all nats, EOS predictions included, over ln 2 x the
byte targets. Checked by hand on uniform models for the BLT (blt.train.blt_summary) and the dense byte LM
(common.tasks.lm.nats_summary), on real eval rows with EOS targets; and the byte targets of the held-out split
are its text bytes, the denominator blt.reproduce scores every arm by."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from blt.model import BLT
from blt.data import EOS
from blt.train import blt_loss, blt_summary, resolve_max_patches
from common import config as config_lib
from common.data import LMData
from common.tasks.lm import byte_lm_loss, nats_summary

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny_config(cache_dir: str):
  cfg = config_lib.load(os.path.join(ROOT, "blt/configs/tiny.py"))
  cfg.model.update(d_local=32, n_heads_local=2, n_heads_cross=2, local_window=16, d_global=64, n_heads_global=2,
                   hash_table_size=256, n_layers_decoder=1, n_layers_global=1)
  cfg.data.update(seq_len=64, cache_dir=cache_dir, max_train_bytes=100_000, max_eval_bytes=20_000)
  return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  cfg = _tiny_config(str(tmp_path_factory.getbasetemp() / "blt_data_cache"))
  return cfg, LMData(cfg.data, batch_size=8, seed=0)


def _batches_ending_documents(data, n: int = 3):
  """The first eval batch, then batches where documents end (EOS targets), n in all."""
  out = []
  for batch in data.eval_batches():
    if not out or ((batch["targets"] == 1) & (batch["loss_mask"] > 0)).any():
      out.append(batch)
    if len(out) == n:
      return out
  return out


def _counts(batches):
  """(byte targets, EOS targets) of the batches, counted in numpy on the seqio ids (byte b is b + 3, EOS 1)."""
  mask = np.concatenate([b["loss_mask"] for b in batches]) > 0
  targets = np.concatenate([b["targets"] for b in batches])
  return int((mask & (targets >= 3)).sum()), int((mask & (targets == 1)).sum())


class UniformOver(nnx.Module):
  """A BLT whose logits are 0 on `kept` ids and -1e9 elsewhere: uniform over them."""

  def __init__(self, blt: BLT, kept: tuple[int, ...]):
    self.blt = blt
    self.penalty = nnx.Variable(jnp.full((260,), -1e9).at[jnp.asarray(kept)].set(0.0))

  def __call__(self, *args):
    return self.blt(*args) * 0.0 + self.penalty[...]


@pytest.mark.parametrize("kept", [tuple(range(256)) + (EOS,), tuple(range(260))])
def test_uniform_blt_bits_per_byte_by_hand(data, kept):
  cfg, lm_data = data
  model = UniformOver(BLT(cfg.model, rngs=nnx.Rngs(params=0)), kept)
  max_patches = resolve_max_patches(cfg.model.patching, 64, max_segments=64)
  loss = nnx.jit(lambda mdl, batch: blt_loss(mdl, batch, patching=cfg.model.patching, max_patches=max_patches))
  batches = _batches_ending_documents(lm_data)
  sums = {}
  for batch in batches:
    total, weight, extra = jax.device_get(loss(model, batch))
    for k, v in {"loss": total, "weight": weight, **extra}.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  n_bytes, n_eos = _counts(batches)
  assert n_eos > 0  # EOS targets are there: their nats count, they do not
  assert sums["byte_targets"] == n_bytes and sums["weight"] == n_bytes + n_eos
  expected = math.log2(len(kept)) * (n_bytes + n_eos) / n_bytes  # every target costs ln |kept| nats
  assert blt_summary(sums)["bpb"] == pytest.approx(expected, rel=1e-5)  # f32 sums


class UniformDenseLM(nnx.Module):
  """A dense LM's call signature with logits 0 over its padded vocabulary of 384 ids."""

  def __call__(self, tokens, positions, segment_ids):
    return jnp.zeros((*tokens.shape, 384), jnp.float32)


def test_uniform_dense_byte_lm_bits_per_byte_by_hand(data):
  _, lm_data = data
  batches = _batches_ending_documents(lm_data)
  sums = {}
  for batch in batches:
    total, weight, extra = jax.device_get(byte_lm_loss(UniformDenseLM(), jax.tree.map(jnp.asarray, batch)))
    for k, v in {"loss": total, "weight": weight, **extra}.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  n_bytes, n_eos = _counts(batches)
  assert n_eos > 0 and sums["byte_targets"] == n_bytes
  bpb = nats_summary(sums, bytes_per_target=True)["bpb"]
  assert bpb == pytest.approx(math.log2(384) * (n_bytes + n_eos) / n_bytes, rel=1e-5)


def test_byte_targets_of_the_held_out_split_are_its_text_bytes(data):
  """So `eval/bpb` over the whole split (eval.batches 0, as blt.reproduce runs it) is total nats / (ln 2 x the
  text's bytes), reproduce's figure for every arm."""
  _, lm_data = data
  batches = list(lm_data.eval_batches())
  n_bytes, n_eos = _counts(batches)
  assert n_eos > 0 and n_bytes == lm_data.eval_bytes
