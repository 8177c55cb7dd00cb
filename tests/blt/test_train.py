"""blt.train: the vocabulary map, patch-slot bounds, config errors, a short in-process training run, entropy
patching end to end (an entropy model trained a few steps here, its entropies in the input pipeline, then BLT
steps), and BPE patch starts in the pipeline."""
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from blt import data as blt_data, train as blt_train
from blt.entropy import load_entropy_model, next_byte_entropies
from blt.patcher import patch
from common.config import ConfigError
from common.data import LMData
from common.tasks.lm import lm_task, next_token_loss, resolve
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
  out = blt_data.seqio_to_blt(inputs, segs, pos)
  np.testing.assert_array_equal(out, [[256, 104, 105, 257, 256, 97, 258, 258]])
  np.testing.assert_array_equal(blt_data.seqio_to_blt(jnp.asarray(inputs), segs, pos), out)
  assert blt_data.seqio_to_blt(np.array([[2]]), np.array([[1]]), np.array([[3]]))[0, 0] == blt_data.PAD
  back = blt_data.blt_to_seqio(out)
  np.testing.assert_array_equal(back, inputs)


def test_derived_max_patches_bounds_every_row():
  cfg = _tiny("patcher=space")
  length = 64
  rng = np.random.default_rng(0)
  alphabet = np.frombuffer(b"ab ,.\n", np.uint8)
  worst = np.tile(np.frombuffer(b"a ", np.uint8), length // 2)[None]  # a patch every 2 bytes
  x = np.concatenate([rng.choice(alphabet, (16, length)), worst, np.full((1, length), 32)]).astype(np.int32)
  # Segments of random lengths (up to 6 per row): each opens its own patches.
  cuts = np.sort(rng.integers(1, length, (x.shape[0], 5)), axis=1)
  segments = 1 + (np.arange(length)[None, :, None] >= cuts[:, None, :]).sum(-1)
  starts = np.concatenate([np.zeros((x.shape[0], 1), int), cuts], axis=1)  # [rows, 6]
  positions = np.arange(length)[None] - np.take_along_axis(starts, segments - 1, axis=1)
  for p_cfg in (cfg.model.patching, _tiny().model.patching):
    bound = blt_train.resolve_max_patches(p_cfg, length, max_segments=6)
    p = patch(jnp.asarray(x), method=p_cfg.method, max_patches=bound, patch_size=int(p_cfg.patch_size),
              max_patch_length=int(p_cfg.max_patch_length), segment_ids=jnp.asarray(segments),
              positions=jnp.asarray(positions))
    assert int(p.num_patches.max()) <= bound
  one_segment = blt_train.resolve_max_patches(cfg.model.patching, length)
  p = patch(jnp.asarray(x), method="space", max_patches=one_segment, max_patch_length=16)
  assert int(p.num_patches[16]) == length // 2 + 1 <= one_segment  # [a] [ ] then "a " patches
  static = _tiny().model.patching
  assert blt_train.resolve_max_patches(static, 256) == 64
  # The bound is reached: segments of 1, 1 and 254 bytes hold 1 + 1 + 64 static patches of 4.
  seg = np.repeat([1, 2, 3], [1, 1, 254])[None]
  pos = np.concatenate([[0, 0], np.arange(254)])[None]
  p = patch(jnp.zeros((1, 256), jnp.int32), method="static", patch_size=4, max_patches=66,
            segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
  assert int(p.num_patches[0]) == 66 == blt_train.resolve_max_patches(static, 256, max_segments=3)


def test_config_errors_name_the_key(tmp_path):
  with pytest.raises(ValueError, match="patcher"):
    _tiny("patcher=wordpiece")
  for arg, key in (("patcher=entropy", "model.patching.entropy_model"),
                   (f"patcher=entropy_monotonic,entropy_model={tmp_path}", "model.patching.entropy_model"),
                   (f"patcher=bpe,spm_model={tmp_path}/none.model", "model.patching.spm_model")):
    with pytest.raises(ConfigError, match=key):
      blt_train.validate_blt_config(_tiny(arg))
  cfg = _tiny()
  cfg.model.d_local = 66
  with pytest.raises(ConfigError, match="model.d_local"):
    blt_train.validate_blt_config(cfg)


@pytest.mark.parametrize("patcher", ["space"])
def test_short_training_run(tmp_path, tmp_path_factory, patcher):
  cfg = _tiny(f"patcher={patcher}")
  cfg.model.update(d_local=32, n_heads_local=2, n_heads_cross=2, local_window=16, d_global=64, n_heads_global=2,
                   hash_table_size=256, n_layers_decoder=1, n_layers_global=1)
  _small_data(cfg, str(tmp_path_factory.getbasetemp() / "blt_data_cache"))
  cfg.train.update(steps=6, batch_size=8, warmup_steps=2)
  cfg.log.update(every_steps=2, progress="lines")
  cfg.eval.update(every_steps=6, batches=1, sample_bytes=8, sample_prompts=("def ", "The "))
  cfg.checkpoint.update(every_steps=6, async_save=False)
  workdir = str(tmp_path / "run")
  task = blt_train.make_task(blt_train.resolve(cfg))
  assert train(cfg, workdir, task, devices=jax.devices()[:2]) == 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if "loss" in r]
  losses = [r["loss"] for r in train_rows]
  assert [r["step"] for r in train_rows] == [2, 4, 6]
  assert all(math.isfinite(v) for v in losses) and losses[-1] < math.log(260) + 0.5
  assert all(r["bytes_per_sec"] > 0 and 0 < r["patches_per_byte"] <= 1 for r in train_rows)
  ev = [r for r in rows if "eval/bpb" in r][-1]
  assert math.isfinite(ev["eval/bpb"]) and ev["eval/bytes_per_patch"] >= 1.0 and ev["eval/overflow_bytes"] == 0
  batch = next(task.data.eval_batches(1))  # eval.batches = 1: bpb = all nats / byte targets / ln 2
  mask = batch["loss_mask"] > 0
  per_byte_target = mask.sum() / (mask & (batch["targets"] >= 3)).sum()
  assert ev["eval/bpb"] == pytest.approx(ev["eval/loss"] * per_byte_target / math.log(2), rel=1e-5)
  assert os.path.isdir(os.path.join(workdir, "checkpoints"))
  with open(os.path.join(workdir, "samples.txt"), encoding="utf-8") as f:  # the eval's generated samples
    headers = [line for line in f if line.startswith("=== step")]
  assert headers == ["=== step 6 | prompt 'def '\n", "=== step 6 | prompt 'The '\n"]


@pytest.mark.parametrize("arg,key", [("patcher=entropy", "model.patching.entropy_model"),
                                     ("patcher=bpe,spm_model=/nonexistent/m.model", "model.patching.spm_model")])
def test_cli_bad_patching_input_exits_2_naming_the_key(tmp_path, arg, key):
  import subprocess
  import sys
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "blt.train", f"--config=blt/configs/tiny.py:{arg}",
                         f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert key in proc.stderr.strip().splitlines()[-1]
  assert not workdir.exists()


def _small_data(cfg, cache_dir):
  cfg.data.update(seq_len=64, cache_dir=cache_dir, max_train_bytes=100_000, max_eval_bytes=20_000)
  return cfg


@pytest.fixture(scope="module")
def entropy_run(tmp_path_factory):
  """(workdir, config) of an entropy model trained 12 steps by the shared trainer (blt.train_entropy's task)."""
  spec = importlib.util.spec_from_file_location("_entropy_tiny", os.path.join(ROOT, "blt/configs/entropy_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = _small_data(module.get_config(), str(tmp_path_factory.getbasetemp() / "blt_data_cache"))
  cfg.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, window=16)
  cfg.train.update(steps=12, batch_size=8, warmup_steps=2, learning_rate=1e-2)
  cfg.log.update(every_steps=6, progress="lines")
  cfg.eval.update(every_steps=12, batches=2)
  cfg.checkpoint.update(every_steps=12, async_save=False)
  workdir = str(tmp_path_factory.mktemp("entropy") / "entropy_model")
  assert train(cfg, workdir, lm_task(resolve(cfg)), devices=jax.devices()[:1]) == 0
  return workdir, cfg


def test_loaded_entropy_model_is_the_trained_one(entropy_run):
  workdir, cfg = entropy_run
  model, loaded_cfg = load_entropy_model(workdir)
  assert loaded_cfg.model.window == 16 and loaded_cfg.model.vocab_size == cfg.model.vocab_size
  data = LMData(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  total = weight = 0.0
  loss = nnx.jit(next_token_loss)
  for batch in data.eval_batches(cfg.eval.batches):
    t, w, _ = loss(model, batch)
    total, weight = total + float(t), weight + float(w)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f if "eval/loss" in line][-1]
  assert total / weight == pytest.approx(logged["eval/loss"], rel=1e-5)


def test_entropy_patching_trains_end_to_end(entropy_run, tmp_path, tmp_path_factory):
  workdir, _ = entropy_run
  cfg = _small_data(_tiny(f"patcher=entropy,entropy_model={workdir}"),
                    str(tmp_path_factory.getbasetemp() / "blt_data_cache"))
  cfg.model.update(d_local=32, n_heads_local=2, n_heads_cross=2, local_window=16, d_global=64, n_heads_global=2,
                   hash_table_size=256, n_layers_decoder=1, n_layers_global=1)
  cfg.train.update(steps=4, batch_size=8, warmup_steps=1)
  cfg.log.update(every_steps=2, progress="lines")
  cfg.eval.update(every_steps=4, batches=1)
  cfg.checkpoint.update(every_steps=4, async_save=False)
  assert cfg.model.patching.calibrate
  task = blt_train.make_task(blt_train.resolve(cfg))
  p = cfg.model.patching  # resolved: θ derived for 6-byte patches, recorded as a plain threshold
  assert not p.calibrate and p.threshold > 0
  # The slots: 1.25 x the most patches of a calibration row (the first training rows), a multiple of 8.
  rows = [task.data.train_batch(position) for position in range(0, 65_536 // 64, 8)]
  most = max(int(patch(jnp.asarray(blt_data.seqio_to_blt(b["inputs"], b["segment_ids"], b["positions"])),
                       method="entropy", max_patches=64, entropies=jnp.asarray(b["entropies"]),
                       threshold=p.threshold, max_patch_length=16, segment_ids=jnp.asarray(b["segment_ids"]),
                       positions=jnp.asarray(b["positions"])).num_patches.max()) for b in rows)
  assert p.max_patches == min(8 * math.ceil(1.25 * most / 8), 64) < cfg.data.seq_len

  batch = task.data.train_batch(0)
  model, _ = load_entropy_model(workdir)
  byte_ids = blt_data.seqio_to_blt(batch["inputs"], batch["segment_ids"], batch["positions"])
  recomputed = next_byte_entropies(model, blt_data.blt_to_seqio(jnp.asarray(byte_ids)),
                                   jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"]))
  np.testing.assert_allclose(batch["entropies"], recomputed, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(task.data.train_batch(0)["entropies"], batch["entropies"])  # a function of position
  assert set(next(task.data.eval_batches(1))) == set(batch)

  run = str(tmp_path / "run")
  assert train(cfg, run, task, devices=jax.devices()[:2]) == 0
  with open(os.path.join(run, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4]
  assert all(math.isfinite(r["loss"]) and r["overflow_bytes"] == 0 for r in train_rows)  # within the sample
  # The first rows are the calibration sample: their patches average about 6 bytes.
  assert all(1 / 9 < r["patches_per_byte"] < 1 / 4 for r in train_rows)
  ev = [r for r in rows if "eval/bpb" in r][-1]
  assert math.isfinite(ev["eval/bpb"]) and ev["eval/bytes_per_patch"] > 2 and ev["eval/overflow_bytes"] >= 0


def test_bpe_patch_starts_in_the_pipeline_are_the_token_starts(tmp_path, tmp_path_factory):
  spm = pytest.importorskip("sentencepiece")
  from common.data import corpus, default_data_config
  data_cfg = default_data_config()
  root, rels = corpus.list_documents(data_cfg, "train")
  lines = [line for rel in rels[:20] for line in corpus.read_text(os.path.join(root, rel)).split("\n") if line]
  model_path = str(tmp_path / "bpe.model")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=model_path[:-len(".model")], model_type="bpe", vocab_size=300,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="identity", add_dummy_prefix=False,
      remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2)
  cfg = _small_data(_tiny(f"patcher=bpe,spm_model={model_path}"), str(tmp_path_factory.getbasetemp() / "blt_data_cache"))
  cfg.train.batch_size = 4
  blt_train.validate_blt_config(blt_train.resolve(cfg))
  data = blt_data.blt_data(cfg)
  batch = data.train_batch(0)
  sp = spm.SentencePieceProcessor(model_file=model_path)
  byte_ids = blt_data.seqio_to_blt(batch["inputs"], batch["segment_ids"], batch["positions"])
  checked = 0
  for row in range(4):
    for s in np.unique(batch["segment_ids"][row]):
      (where,) = np.nonzero(batch["segment_ids"][row] == s)
      ids = byte_ids[row, where]
      starts = batch["patch_starts"][row, where]
      if s == 0:  # the row padding: one patch
        assert starts.tolist() == [True] + [False] * (len(where) - 1)
        continue
      assert ids[0] == blt_data.BOS and starts[0] and starts[1]
      text = bytes(ids[1:].astype(np.uint8)).decode("utf-8", errors="ignore")
      if text.encode() != bytes(ids[1:].astype(np.uint8)):
        continue  # a document cut mid-character: covered in test_patcher.py
      pieces = [p.replace("\u2581", " ") for p in sp.encode(text, out_type=str)]
      expected = np.cumsum([0] + [len(p.encode()) for p in pieces[:-1]]) + 1
      assert np.flatnonzero(starts).tolist() == [0, *expected.tolist()]
      checked += 1
  assert checked >= 2
