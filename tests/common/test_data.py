"""Behaviour of common.data, checked against facts computed independently of the pipeline
(file bytes on disk, byte-vocabulary arithmetic, permutation properties)."""
import os
import pathlib
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import common.data as data
from common.data import DataError, corpus, pipeline

REPO = pathlib.Path(__file__).resolve().parents[2]
EOS = 1
BYTE_OFFSET = 3  # seqio.ByteVocabulary: pad 0, eos 1, unk 2, then bytes


def _cfg(tmp_path, **overrides):
  cfg = data.default_data_config()
  cfg.cache_dir = str(tmp_path / "cache")
  cfg.max_train_bytes = 60_000
  cfg.max_eval_bytes = 20_000
  cfg.seq_len = 64
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _write_docs(root: pathlib.Path) -> dict[str, bytes]:
  """Text files of awkward lengths (empty-ish, longer than several rows, non-ASCII) in nested dirs."""
  rng = np.random.default_rng(0)
  docs = {}
  for i in range(12):
    n = int(rng.integers(1, 300)) if i != 3 else 1000  # file 3 spans many 64-token rows
    text = "".join(rng.choice(list("abcdefgh \n\téü☃")) for _ in range(n)) + f"#{i}"
    rel = f"sub{i % 3}/doc{i:02d}.txt"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(text.encode("utf-8"))
    docs[rel] = text.encode("utf-8")
  return docs


def _segments(arrays):
  """Token lists of the segments of packed rows, in row order."""
  out = []
  for tgt, seg in zip(arrays["targets"], arrays["segment_ids"]):
    for s in range(1, seg.max() + 1):
      out.append(tgt[seg == s])
  return out


def _documents(segments):
  """Rejoins chunked segments at EOS boundaries: one token array per original document."""
  stream = np.concatenate(segments)
  ends = np.flatnonzero(stream == EOS)
  assert ends.size and ends[-1] == len(stream) - 1, "every document ends with EOS"
  return [d[:-1] for d in np.split(stream, ends + 1)[:-1]]


@pytest.fixture(scope="module")
def files_setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("docs")
  docs = _write_docs(root)
  cfg = _cfg(tmp_path_factory.mktemp("c"), source="files", path=str(root / "**" / "*.txt"),
             max_train_bytes=0, max_eval_bytes=0, seq_len=64, validation_fraction=0.2)
  return root, docs, cfg


def test_default_config_keys():
  cfg = data.default_data_config()
  for key in ("source", "path", "tfds_name", "tfds_data_dir", "tfds_train_split", "tfds_eval_split",
              "text_key", "vocab", "spm_model", "seq_len", "max_train_bytes", "max_eval_bytes",
              "validation_fraction", "cache_dir"):
    assert key in cfg
  assert (cfg.source, cfg.vocab, cfg.seq_len, cfg.max_train_bytes) == ("embedded", "byte", 256, 0)
  import ml_collections
  partial = data.with_defaults(ml_collections.ConfigDict(dict(seq_len=32, extra="kept")))
  assert (partial.seq_len, partial.vocab, partial.extra) == (32, "byte", "kept")


def test_embedded_split_deterministic_disjoint_covering(tmp_path):
  root, rels = corpus.embedded_files()
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()
  assert pathlib.Path(root) == stdlib
  # Independent listing: every stdlib module outside test/site-packages dirs is in the corpus.
  expected = {str(p.relative_to(stdlib)) for p in stdlib.rglob("*.py")
              if not {"test", "tests", "site-packages", "idlelib", "__pycache__"}
              & set(p.relative_to(stdlib).parts)}
  assert expected <= set(rels) and len(expected) > 300
  assert rels == sorted(rels)
  cfg = _cfg(tmp_path, max_train_bytes=0, max_eval_bytes=0)
  _, train = corpus.list_documents(cfg, "train")
  _, val = corpus.list_documents(cfg, "validation")
  assert val and not set(train) & set(val) and set(train) | set(val) == set(rels)
  assert corpus.list_documents(cfg, "train")[1] == train  # deterministic
  # A byte budget keeps a deterministic subset of train that just reaches the budget.
  cfg.max_train_bytes = 100_000
  _, small = corpus.list_documents(cfg, "train")
  sizes = [os.path.getsize(os.path.join(root, r)) for r in small]
  assert set(small) < set(train) and sum(sizes) >= 100_000 and sum(sizes) - max(sizes) < 100_000
  assert corpus.list_documents(cfg, "train")[1] == small


def test_files_packing_reproduces_documents(files_setup):
  root, docs, cfg = files_setup
  _, train = corpus.list_documents(cfg, "train")
  _, val = corpus.list_documents(cfg, "validation")
  assert sorted(train + val) == sorted(docs) and train and val
  rows, vocab_size = pipeline.load_rows(cfg)
  assert vocab_size == 259
  for split, rels in (("train", train), ("validation", val)):
    got = _documents(_segments(rows[split]))
    assert [bytes((d - BYTE_OFFSET).astype(np.uint8)) for d in got] == [docs[r] for r in rels]
    assert int(rows[split]["num_bytes"]) == sum(len(docs[r]) for r in rels)


def test_packed_row_structure(files_setup):
  _, _, cfg = files_setup
  lm = data.LMData(cfg, batch_size=5, seed=1)
  L = cfg.seq_len
  split_seen = False
  for pos in range(0, 3 * lm.num_train_rows, 5):
    b = lm.train_batch(pos)
    assert set(b) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    for k in ("inputs", "targets", "segment_ids", "positions"):
      assert b[k].dtype == np.int32 and b[k].shape == (5, L)
    assert b["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(b["loss_mask"], (b["segment_ids"] > 0).astype(np.float32))
    for inp, tgt, seg, p in zip(b["inputs"], b["targets"], b["segment_ids"], b["positions"]):
      n = int((seg > 0).sum())
      assert (seg[n:] == 0).all() and (tgt[n:] == 0).all() and (inp[n:] == 0).all()
      assert seg[0] == 1 and (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
      for s in range(1, seg.max() + 1):
        idx = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(p[idx], np.arange(len(idx)))      # positions restart
        assert inp[idx[0]] == 0                                          # BOS = pad
        np.testing.assert_array_equal(inp[idx[1:]], tgt[idx[:-1]])      # shifted in segment
        if tgt[idx[-1]] != EOS:  # a segment without EOS is a chunk of a split document
          assert len(idx) == L
          split_seen = True
  assert split_seen  # doc03 is longer than a row


def test_batches_seeded_deterministic_and_resumable(tmp_path):
  cfg = _cfg(tmp_path)
  a = data.LMData(cfg, batch_size=7, seed=3)
  n = a.num_train_rows
  assert n > 20
  stream = [a.train_batch(p) for p in range(0, 2 * n + 14, 7)]  # crosses epoch boundaries
  b = data.LMData(cfg, batch_size=7, seed=3)
  for i in (0, 3, len(stream) - 1, n // 7):  # fresh object, jump straight to a position
    for k in stream[i]:
      np.testing.assert_array_equal(b.train_batch(7 * i)[k], stream[i][k])
  c = data.LMData(cfg, batch_size=7, seed=4)
  assert not np.array_equal(c.train_batch(0)["targets"], stream[0]["targets"])
  # Different batch size, same seed: the same row stream (position counts rows, not steps).
  d = data.LMData(cfg, batch_size=14, seed=3)
  np.testing.assert_array_equal(
      d.train_batch(7)["targets"],
      np.concatenate([stream[1]["targets"], stream[2]["targets"]]))


def test_epochs_are_permutations(tmp_path):
  cfg = _cfg(tmp_path)
  lm = data.LMData(cfg, batch_size=4, seed=0)
  n = lm.num_train_rows
  rows, _ = pipeline.load_rows(cfg)
  epochs = []
  for e in range(3):
    idx = lm.train_rows_at(e * n, n)
    np.testing.assert_array_equal(np.sort(idx), np.arange(n))
    epochs.append(idx)
  assert not np.array_equal(epochs[0], epochs[1])
  # Content check through the public batches: an epoch's batches hold every packed row once.
  got = np.concatenate([lm.train_batch(p)["targets"] for p in range(n, 2 * n, 4)])[:n]
  want = rows["train"]["targets"]
  assert sorted(map(bytes, got)) == sorted(map(bytes, want))


def test_eval_batches_padded(tmp_path):
  cfg = _cfg(tmp_path)
  lm = data.LMData(cfg, batch_size=8, seed=0)
  rows, _ = pipeline.load_rows(cfg)
  m = lm.num_eval_rows
  assert m % 8, "test wants a partial last batch; change max_eval_bytes"
  batches = list(lm.eval_batches(0))
  assert len(batches) == -(-m // 8)
  stacked = np.concatenate([b["targets"] for b in batches])
  np.testing.assert_array_equal(stacked[:m], rows["validation"]["targets"])
  last = batches[-1]
  assert last["targets"].shape == (8, cfg.seq_len)
  assert (last["loss_mask"][m % 8:] == 0).all() and (last["segment_ids"][m % 8:] == 0).all()
  assert last["loss_mask"][: m % 8].sum() > 0
  assert len(list(lm.eval_batches(1))) == 1
  # Eval order is fixed: a second pass (or another seed) gives the same batches.
  again = data.LMData(cfg, batch_size=8, seed=9)
  np.testing.assert_array_equal(next(again.eval_batches(1))["targets"], batches[0]["targets"])


def test_cache_reused_memory_mapped_and_import_is_light(tmp_path, capsys):
  cfg = _cfg(tmp_path)
  data.LMData(cfg, batch_size=2, seed=0)
  capsys.readouterr()
  files = sorted(os.listdir(cfg.cache_dir))
  assert len(files) == 2 and all(f.endswith(("-train", "-validation")) for f in files)
  lm = data.LMData(cfg, batch_size=2, seed=0)
  # The rows are memory-mapped from the cache, not read into RAM; their bytes are the cached files'.
  train = lm._train[0]["targets"]
  assert isinstance(train, np.memmap) and train.filename.endswith("targets.i32")
  assert os.path.getsize(train.filename) == train.size * 4
  assert "building" not in capsys.readouterr().err
  assert sorted(os.listdir(cfg.cache_dir)) == files
  # A fresh process with the cache in place needs neither TensorFlow nor seqio.
  code = ("import sys, common.data as d\n"
          f"cfg = d.default_data_config(); cfg.update(dict({dict(cfg)!r}))\n"
          "lm = d.LMData(cfg, batch_size=2, seed=0); lm.train_batch(5)\n"
          "assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules, 'heavy import'\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "building" not in proc.stderr
  # Changing seq_len is a different cache entry.
  cfg.seq_len = 32
  data.LMData(cfg, batch_size=2, seed=0)
  assert len(os.listdir(cfg.cache_dir)) == 4


def test_task_registration(tmp_path, files_setup):
  cfg = _cfg(tmp_path)
  name = data.register_lm_task(cfg)
  assert data.register_lm_task(cfg) == name  # idempotent
  _, _, fcfg = files_setup
  assert data.register_lm_task(fcfg) != name
  import seqio
  ds = seqio.get_mixture_or_task(name).get_dataset(
      sequence_length={"targets": 32}, split="validation", shuffle=False)
  ex = next(ds.as_numpy_iterator())
  assert ex["targets"].dtype == np.int32 and len(ex["targets"]) <= 32


@pytest.mark.parametrize("overrides, keys", [
    (dict(source="files", path="/nonexistent/dir/**/*.txt"), ["data.path", "/nonexistent/dir"]),
    (dict(vocab="spm", spm_model="/nonexistent/x.model"), ["data.spm_model"]),
    (dict(vocab="wordpiece"), ["data.vocab"]),
    (dict(source="ftp"), ["data.source"]),
    (dict(source="tfds", tfds_name="my_text", tfds_data_dir="/nonexistent/tfds"),
     ["data.tfds_name", "data.tfds_data_dir"]),
])
def test_bad_config_raises_data_error(tmp_path, overrides, keys):
  cfg = _cfg(tmp_path, **overrides)
  with pytest.raises(DataError) as err:
    data.LMData(cfg, batch_size=2, seed=0)
  assert isinstance(err.value, ValueError)
  for key in keys:
    assert key in str(err.value)
  assert not os.path.exists(cfg.cache_dir) or not os.listdir(cfg.cache_dir)


def test_empty_training_files_refused_before_the_cache(tmp_path, capsys):
  """Files of no bytes would pack into rows of end-of-document ids only: refused naming data.path, before the
  cache is built (no [common.data] lines)."""
  (tmp_path / "docs").mkdir()
  for name in ("a.txt", "b.txt", "c.txt"):
    (tmp_path / "docs" / name).write_text("")
  cfg = _cfg(tmp_path, source="files", path=str(tmp_path / "docs" / "*.txt"), validation_fraction=0.3)
  with pytest.raises(DataError, match=r"config key 'data.path'.*no training text"):
    data.LMData(cfg, batch_size=2, seed=0)
  assert "[common.data]" not in capsys.readouterr().err
  assert not os.path.exists(cfg.cache_dir)


def test_a_single_file_is_refused_unless_eval_on_train(tmp_path):
  """One file cannot be split: it is refused naming data.path, and with data.eval_on_train both splits are
  exactly its packed bytes."""
  text = "one file, trained on and evaluated on\n" * 20
  (tmp_path / "only.txt").write_text(text)
  cfg = _cfg(tmp_path, source="files", path=str(tmp_path / "only.txt"), max_train_bytes=0, max_eval_bytes=0)
  with pytest.raises(DataError, match=r"config key 'data.path'.*one file.*data.eval_on_train"):
    data.LMData(cfg, batch_size=2, seed=0)
  assert not os.path.exists(cfg.cache_dir)
  cfg.eval_on_train = True
  lm = data.LMData(cfg, batch_size=2, seed=0)
  assert lm.train_bytes == lm.eval_bytes == len(text.encode())
  assert corpus.list_documents(cfg, "train") == corpus.list_documents(cfg, "validation") == (str(tmp_path),
                                                                                            ["only.txt"])


def test_eval_on_train_evaluates_on_every_training_file(files_setup):
  """With data.eval_on_train nothing is held out: both splits list every file the glob matches."""
  root, docs, cfg = files_setup
  cfg = data.with_defaults(cfg)
  assert set(corpus.list_documents(cfg, "train")[1]) != set(docs)  # held-out files by default
  cfg.eval_on_train = True
  assert corpus.list_documents(cfg, "train")[1] == corpus.list_documents(cfg, "validation")[1] == sorted(docs)


def test_tfds_data_dir_without_dataset(tmp_path):
  (tmp_path / "tfds").mkdir()
  cfg = _cfg(tmp_path, source="tfds", tfds_name="surely_not_a_dataset",
             tfds_data_dir=str(tmp_path / "tfds"))
  with pytest.raises(DataError, match="data.tfds_name"):
    data.LMData(cfg, batch_size=2, seed=0)


def _train_tokenizer(*args):
  return subprocess.run([sys.executable, "-m", "common.data.train_tokenizer", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_train_tokenizer_and_spm_pipeline(tmp_path, files_setup):
  src = tmp_path / "src"
  src.mkdir()
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  for name in ("textwrap.py", "string.py", "shlex.py", "bisect.py", "colorsys.py", "fnmatch.py"):
    (src / name).write_bytes((stdlib / name).read_bytes())
  out = tmp_path / "tok" / "m.model"
  proc = _train_tokenizer(f"--out={out}", "--vocab_size=300", f"--path={src}/*.py")
  assert proc.returncode == 0, proc.stderr
  assert out.exists() and str(out) in proc.stdout
  again = _train_tokenizer(f"--out={out}", "--vocab_size=300", f"--path={src}/*.py")
  assert again.returncode == 2 and "--force" in again.stderr
  assert len(again.stderr.strip().splitlines()) == 1
  assert _train_tokenizer(f"--out={out}", "--vocab_size=300", f"--path={src}/*.py",
                          "--force").returncode == 0
  missing = _train_tokenizer(f"--out={tmp_path}/x.model", f"--path={tmp_path}/none/*.txt")
  assert missing.returncode == 2 and "none" in missing.stderr

  cfg = _cfg(tmp_path, source="files", path=f"{src}/*.py", vocab="spm", spm_model=str(out),
             max_train_bytes=0, max_eval_bytes=0, seq_len=32)
  vocab = data.get_vocabulary(cfg)
  assert vocab.vocab_size == 300 and vocab.eos_id == 1 and vocab.pad_id == 0
  text = "class A:\n    return x + 1\n\tpass\n"
  ids = vocab.encode(text)
  assert len(ids) < len(text) and vocab.decode(ids) == text
  # The packed spm rows decode back to the files' texts, in order.
  lm = data.LMData(cfg, batch_size=4, seed=0)
  assert lm.vocab_size == 300
  rows, _ = pipeline.load_rows(cfg)
  root, rels = corpus.list_documents(cfg, "train")
  got = [vocab.decode(d.tolist()) for d in _documents(_segments(rows["train"]))]
  assert got == [open(os.path.join(root, r)).read() for r in rels]


def test_tfds_source(tmp_path):
  from common.data._tf import import_tf, import_tfds
  tf, tfds = import_tf(), import_tfds()
  texts = {"train": [f"train doc {i}: " + "wörds " * (i * 7) for i in range(25)],
           "test": [f"eval doc {i}" for i in range(4)]}
  tfds.dataset_builders.store_as_tfds_dataset(
      name="common_data_tiny_text", version="1.0.0",
      features=tfds.features.FeaturesDict({"body": tfds.features.Text()}),
      split_datasets={k: tf.data.Dataset.from_tensor_slices({"body": v}) for k, v in texts.items()},
      data_dir=str(tmp_path / "tfds"), disable_shuffling=True)
  cfg = _cfg(tmp_path, source="tfds", tfds_name="common_data_tiny_text",
             tfds_data_dir=str(tmp_path / "tfds"), tfds_eval_split="test", text_key="body",
             max_train_bytes=0, max_eval_bytes=0, seq_len=48)
  lm = data.LMData(cfg, batch_size=4, seed=0)
  rows, _ = pipeline.load_rows(cfg)
  for split, want in (("train", texts["train"]), ("validation", texts["test"])):
    got = [bytes((d - BYTE_OFFSET).astype(np.uint8)).decode() for d in _documents(_segments(rows[split]))]
    assert got == want
  assert lm.train_batch(0)["targets"].shape == (4, 48)
  # A byte budget stops after the document that reaches it.
  cfg.max_train_bytes = 300
  rows, _ = pipeline.load_rows(cfg)
  got = _documents(_segments(rows["train"]))
  sizes = np.cumsum([len(t.encode()) for t in texts["train"]])
  assert len(got) == int(np.searchsorted(sizes, 300)) + 1
  # Two training shards (seqio's shard_info): disjoint, and together the whole split.
  cfg.max_train_bytes = 0
  halves = [[bytes((d - BYTE_OFFSET).astype(np.uint8)).decode()
             for d in _documents(_segments(pipeline.load_rows(cfg, (i, 2))[0]["train"]))] for i in (0, 1)]
  assert halves[0] and halves[1] and sorted(halves[0] + halves[1]) == sorted(texts["train"])


# ------------------------------------------------------------------------ per-process training shards

def test_training_shards_split_the_files_and_each_process_packs_only_its_own(files_setup, monkeypatch, tmp_path):
  """Two processes (simulated) with data.shards=2: each opens only its round-robin half of the training files,
  its cache holds exactly those documents, and the halves are disjoint and cover the split."""
  root, docs, cfg = files_setup
  _, train = corpus.list_documents(cfg, "train")
  _, validation = corpus.list_documents(cfg, "validation")
  cfg = data.with_defaults(cfg)
  cfg.shards, cfg.cache_dir = 2, str(tmp_path / "cache")  # a fresh cache: every process builds its own
  opened = []
  real_read = corpus.read_text
  monkeypatch.setattr(corpus, "read_text", lambda path: opened.append(path) or real_read(path))
  halves = []
  for process in (0, 1):
    opened.clear()
    lm = data.LMData(cfg, batch_size=4, seed=0, process_index=process, process_count=2)
    mine = train[process::2]
    assert {os.path.relpath(p, root) for p in opened} - set(validation) == set(mine)  # + the validation split
    got = _documents(_segments(lm._train[0]))
    assert [bytes((d - BYTE_OFFSET).astype(np.uint8)) for d in got] == [docs[r] for r in mine]
    assert lm.train_bytes == sum(len(docs[r]) for r in mine)
    assert lm.process_rows == slice(2 * process, 2 * process + 2)
    halves.append(set(mine))
  assert not halves[0] & halves[1] and halves[0] | halves[1] == set(train)


def test_one_process_with_two_shards_batches_like_two_processes(files_setup):
  """The global batch depends on data.shards, not on the process count: one process owning both shards
  returns the rows the two processes return, concatenated, at every position (epochs included)."""
  _, _, cfg = files_setup
  cfg = data.with_defaults(cfg)
  cfg.shards = 2
  whole = data.LMData(cfg, batch_size=6, seed=5)
  parts = [data.LMData(cfg, batch_size=6, seed=5, process_index=i, process_count=2) for i in (0, 1)]
  assert whole.process_rows == slice(0, 6) and whole.num_train_rows == sum(p.num_train_rows for p in parts)
  for position in range(0, 6 * whole.num_train_rows, 6):
    want = whole.train_batch(position)
    got = [p.train_batch(position) for p in parts]
    for k in want:
      np.testing.assert_array_equal(want[k], np.concatenate([got[0][k], got[1][k]]))
  # Each shard cycles through its own rows: over one of its epochs every row appears once.
  rows0 = parts[0]._train[0]["targets"]
  seen = np.concatenate([parts[0].train_batch(p)["targets"] for p in range(0, 2 * len(rows0) * 3, 6)])
  assert {r.tobytes() for r in seen[:len(rows0)]} == {r.tobytes() for r in rows0}


@pytest.mark.parametrize("shards, processes, batch, needle", [(3, 2, 6, "multiple of the process count"),
                                                               (4, 2, 6, "divide the batch size")])
def test_bad_shard_counts_are_refused_naming_the_key(files_setup, shards, processes, batch, needle):
  _, _, cfg = files_setup
  cfg = data.with_defaults(cfg)
  cfg.shards = shards
  with pytest.raises(DataError, match=needle) as e:
    data.LMData(cfg, batch_size=batch, seed=0, process_count=processes)
  assert "data.shards" in str(e.value)


def test_packing_in_chunks_equals_packing_at_once():
  """The cache is written a chunk of rows at a time: the chunks are the rows of packing everything at once."""
  rng = np.random.default_rng(0)
  docs = [rng.integers(3, 50, size=int(rng.integers(1, 40))) for _ in range(200)]
  whole = data.pack_documents(docs, 16)
  chunks = list(pipeline.packing.pack_chunks(docs, 16, rows_per_chunk=7))
  assert {len(c["targets"]) for c in chunks[:-1]} == {7} and 1 <= len(chunks[-1]["targets"]) <= 7
  for k in whole:
    np.testing.assert_array_equal(np.concatenate([c[k] for c in chunks]), whole[k])
