"""File-system helpers shared by tests: a snapshot of a folder (to show a refused command touched nothing), a
copy of a Hugging Face checkpoint folder with its config.json edited (to show what an import refuses), and a
toy SentencePiece BPE model built in memory."""
import io
import json
import os
import shutil


def snapshot(root) -> dict[str, tuple[int, int]]:
  """{relative path: (size, mtime_ns)} of everything under `root`."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      st = os.stat(os.path.join(dirpath, name))
      out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
  return out


def edited_checkpoint(folder: str, tmp_path, **changes) -> str:
  """A copy of checkpoint `folder` under tmp_path/edited whose config.json has `changes` applied."""
  out = tmp_path / "edited"
  shutil.copytree(folder, out)
  hf = json.loads((out / "config.json").read_text())
  hf.update(changes)
  (out / "config.json").write_text(json.dumps(hf))
  return str(out)


def toy_bpe_model():
  """A 40-piece SentencePiece BPE model of a toy corpus whose merges are readable ('the', '▁cat', '▁sat', '▁on',
  '▁mat'), built in memory; special ids as seqio's (pad 0, EOS 1, unk 2, no BOS)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top  (only the BPE tests need it)
  lines = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 50
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=40, pad_id=0, eos_id=1,
      unk_id=2, bos_id=-1, normalization_rule_name="identity", add_dummy_prefix=False,
      remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2)
  return spm.SentencePieceProcessor(model_proto=model.getvalue())
