"""File-system helpers shared by tests: a snapshot of a folder (to show a refused command touched nothing) and a
copy of a Hugging Face checkpoint folder with its config.json edited (to show what an import refuses)."""
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
