"""Patch slots (blt.train's docstring): the measured `max_patches` of entropy and BPE patching on hand-built
rows, recorded and found again by a resumed run; and overflow, a row with more patches than slots: every byte
keeps a slot, the loss is finite, `overflow_bytes` counts exactly the bytes past the last slot, the BLT stays
causal, and the bytes before the last slot get the logits they get with enough slots."""
import importlib.util
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from blt import train as blt_train
from blt.calibrate import patches_per_row
from blt.data import blt_data, seqio_to_blt
from blt.model import BLT, blt_model
from blt.patcher import patch
from common.config import ConfigError
from common.train import resume
from common.train.loop import check_workdir
from common.train.workdir import run_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
A = ord("a") + 3  # a seqio byte id


def _patching(method, **kw):
  p = ml_collections.ConfigDict(dict(method=method, patch_size=6, max_patches=0, threshold=1.0, max_patch_length=0))
  p.update(kw)
  return p


def _hand_built_rows():
  """Two rows of 64: one document; a document of 40 bytes, then row padding. (seqio inputs, segment ids,
  positions.)"""
  seg = np.array([[1] * 64, [1] * 40 + [0] * 24])
  pos = np.array([np.arange(64), np.concatenate([np.arange(40), np.zeros(24, int)])])
  inputs = np.where((pos == 0) & (seg > 0), 0, A) * (seg > 0)  # BOS (seqio 0) at each document start
  return dict(inputs=inputs, segment_ids=seg, positions=pos)


def test_measured_bound_of_hand_built_rows():
  rows = _hand_built_rows()
  # Entropy: H(t) > θ at every odd t opens every even byte: 0, 1 forced, then 2, 4, ..., 62 (33 patches).
  # Row 2: 0, 1 forced, 17 and 33 by max_patch_length 16 (from byte 1), 40 the padding, 56 (16 padding bytes).
  entropies = np.tile(np.where(np.arange(64) % 2 == 1, 2.0, 0.0), (2, 1)) * np.array([[1.0], [0.0]])
  p = _patching("entropy", max_patch_length=16)
  np.testing.assert_array_equal(patches_per_row(dict(rows, entropies=entropies), p), [33, 6])
  assert blt_train.resolve_max_patches(p, 64, most_patches=33) == 48  # 1.25 x 33 = 41.25 -> 48
  assert blt_train.resolve_max_patches(p, 64, most_patches=60) == 64  # at most seq_len
  assert blt_train.resolve_max_patches(p, 64, most_patches=1) == 8
  assert blt_train.resolve_max_patches(p, 64) == 64  # nothing measured: a slot per byte
  # BPE: token starts every 4 bytes (16 patches); row 2 has no token start but its document's: 2 patches.
  starts = np.zeros((2, 65), bool)
  starts[0, ::4] = True
  np.testing.assert_array_equal(patches_per_row(dict(rows, patch_starts=starts), _patching("bpe")), [16, 2])
  p.max_patches = 24
  assert blt_train.resolve_max_patches(p, 64, most_patches=33) == 24  # a set value stays


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  """A 1000-piece BPE of lines of the embedded corpus (tokens of about 2.4 bytes)."""
  spm = pytest.importorskip("sentencepiece")
  from common.data import corpus, default_data_config
  root, rels = corpus.list_documents(default_data_config(), "train")
  lines = [line for rel in rels[:20] for line in corpus.read_text(os.path.join(root, rel)).split("\n") if line]
  path = tmp_path_factory.mktemp("spm") / "bpe.model"
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(path)[:-len(".model")], model_type="bpe", vocab_size=1000,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="identity", add_dummy_prefix=False,
      remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2)
  return str(path)


def _bpe_config(spm_model, cache_dir):
  spec = importlib.util.spec_from_file_location("_blt_tiny", os.path.join(ROOT, "blt", "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(f"patcher=bpe,spm_model={spm_model}")
  cfg.data.update(seq_len=128, cache_dir=cache_dir, max_train_bytes=100_000, max_eval_bytes=20_000)
  cfg.train.batch_size = 8
  return cfg


def test_resolved_bound_is_recorded_and_a_resume_resolves_the_same(spm_model, tmp_path, tmp_path_factory):
  cache = str(tmp_path_factory.getbasetemp() / "blt_data_cache")
  cfg = blt_train.resolve(_bpe_config(spm_model, cache))
  bound = int(cfg.model.patching.max_patches)
  # Measured on the first training rows (64 KiB: data positions 0 .. 511), through the pipeline's BPE starts.
  data = blt_data(cfg)
  most = 0
  for position in range(0, 65_536 // 128, 8):
    b = data.train_batch(position)
    p = patch(seqio_to_blt(b["inputs"], b["segment_ids"], b["positions"]), method="bpe", max_patches=128,
              patch_starts=b["patch_starts"], segment_ids=b["segment_ids"], positions=b["positions"])
    most = max(most, int(p.num_patches.max()))
  assert bound == min(8 * -(-5 * most // 32), 128)  # 1.25 x most, rounded up to a multiple of 8, at most 128
  workdir = str(tmp_path / "run")
  os.makedirs(run_path(workdir))
  (run_path(workdir) / "config.json").write_text(resume.config_record(workdir, cfg, {}, 0))  # as the trainer does
  again = blt_train.resolve(_bpe_config(spm_model, cache))  # a rerun of the same command
  assert int(again.model.patching.max_patches) == bound
  assert check_workdir(workdir, again) == {}
  again.model.patching.max_patches = bound + 8  # a bound found differently would be refused, naming the key
  with pytest.raises(ConfigError, match="model.patching.max_patches"):
    check_workdir(workdir, again)


LENGTH, SLOTS = 32, 5
# Row 0: a document of 28 bytes, then 4 bytes of row padding; row 1: documents of 12 and 20 bytes.
SEGMENTS = np.array([[1] * 28 + [0] * 4, [1] * 12 + [2] * 20])
POSITIONS = np.array([np.concatenate([np.arange(28), np.zeros(4, int)]),
                      np.concatenate([np.arange(12), np.arange(20)])])
# Static patches of 2: row 0 has 14 + 1 (padding) patches, row 1 has 6 + 10. Past the 5 slots (patch index >= 5):
# row 0 its bytes 10..27 (the padding does not count), row 1 bytes 10, 11 of its first document and all 20 of the
# second: 18 + 22.
OVERFLOW_BYTES = 40


def _overflow_batch():
  rng = np.random.default_rng(0)
  targets = np.where(SEGMENTS > 0, rng.integers(3, 259, SEGMENTS.shape), 0)
  inputs = np.where(POSITIONS == 0, 0, np.roll(targets, 1, axis=1)) * (SEGMENTS > 0)
  return dict(inputs=inputs, targets=targets, segment_ids=SEGMENTS, positions=POSITIONS,
              loss_mask=(SEGMENTS > 0).astype(np.float32))


@pytest.fixture(scope="module", params=["official", "lagged"])
def tiny_blt(request):
  m = blt_model(d_local=16, n_heads_local=2, local_window=8, n_layers_decoder=1, n_heads_cross=2, d_global=32,
                n_heads_global=2, n_layers_global=1, hash_table_size=64, decoder_grouping=request.param)
  return BLT(m, rngs=nnx.Rngs(params=0))


def _static(byte_ids, max_patches):
  return patch(byte_ids, method="static", patch_size=2, max_patches=max_patches, segment_ids=jnp.asarray(SEGMENTS),
               positions=jnp.asarray(POSITIONS))


def test_overflowing_row_keeps_every_byte_and_counts_the_overflow(tiny_blt):
  batch = _overflow_batch()
  byte_ids = seqio_to_blt(jnp.asarray(batch["inputs"]), SEGMENTS, POSITIONS)
  p = _static(byte_ids, SLOTS)
  np.testing.assert_array_equal(p.num_patches, [15, 16])
  assert int(p.patch_ids.max()) == int(p.next_patch_ids.max()) == SLOTS - 1  # every byte has a slot
  np.testing.assert_array_equal(p.bytes_per_patch.sum(axis=1), [LENGTH, LENGTH])
  loss = nnx.jit(lambda m, b: blt_train.blt_loss(m, b, patching=_patching("static", patch_size=2),
                                                  max_patches=SLOTS))
  total, weight, sums = loss(tiny_blt, batch)
  assert np.isfinite(float(total)) and float(weight) == 60
  assert int(sums["overflow_bytes"]) == OVERFLOW_BYTES
  summary = blt_train.blt_summary({"loss": float(total), "weight": float(weight),
                                   **{k: float(v) for k, v in sums.items()}})
  assert summary["overflow_bytes"] == OVERFLOW_BYTES and np.isfinite(summary["bpb"])


def test_overflowing_row_stays_causal_and_the_earlier_bytes_are_unchanged(tiny_blt):
  byte_ids = seqio_to_blt(jnp.asarray(_overflow_batch()["inputs"]), SEGMENTS, POSITIONS)
  seg, pos = jnp.asarray(SEGMENTS), jnp.asarray(POSITIONS)

  @nnx.jit
  def logits(model, x):
    p = _static(x, SLOTS)
    return model(x, p.patch_ids, SLOTS, pos, seg, p.next_patch_ids)

  base = np.asarray(logits(tiny_blt, byte_ids))
  # Causality: changing byte t (every t of both rows, patches unchanged: static) leaves logits < t alone.
  for t in range(1, LENGTH):
    changed = np.asarray(logits(tiny_blt, byte_ids.at[:, t].set((byte_ids[:, t] + 1) % 256)))
    np.testing.assert_allclose(changed[:, :t], base[:, :t], atol=1e-5, rtol=1e-5, err_msg=f"byte {t} leaked")
  # With a slot per patch, a byte reading only slots below the last gets the same logits.
  full = _static(byte_ids, LENGTH)
  enough = np.asarray(nnx.jit(lambda m, x: m(x, full.patch_ids, LENGTH, pos, seg, full.next_patch_ids))(
      tiny_blt, byte_ids))
  readable = np.asarray(full.next_patch_ids if tiny_blt.grouping == "official" else full.patch_ids)
  before_last = readable <= SLOTS - 1
  assert before_last.sum() >= 16
  np.testing.assert_allclose(base[before_last], enough[before_last], atol=1e-5, rtol=1e-5)
