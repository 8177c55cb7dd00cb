"""The files of a run's workdir, local or in an object store (`gs://`, `s3://`, any `etils.epath` scheme).

Every path of a run goes through `epath.Path`, never `os.path`/`open` (which would make a local folder named
`gs:`). Object stores have no append and no rename of a whole object in one step, so `append_text` rewrites
the object and `write_atomic` writes it whole (an object store never shows a partly written object); locally
they append, and write a temporary file renamed over the old one, as before.
"""
from __future__ import annotations

from etils import epath


def is_local(path) -> bool:
  """A path of the local file system (not a URL such as gs://bucket/dir)."""
  return "://" not in str(path)


def run_path(path) -> epath.Path:
  """`path` as an epath; a local one made absolute, so that messages name it whatever the cwd. For any other,
  TensorFlow (epath's client of gs:// and s3://) is loaded first our way: quiet, CPU-only."""
  if not is_local(path):
    from common.data._tf import import_tf  # pylint: disable=g-import-not-at-top
    import_tf()
  path = epath.Path(path)
  return path.resolve() if is_local(path) else path


def write_atomic(path: epath.Path, text: str) -> None:
  """Writes `path` so that no reader (another process, a resumed run) ever sees it half written."""
  if not is_local(path):
    path.write_text(text)
    return
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def append_text(path: epath.Path, text: str) -> None:
  """Adds `text` at the end of `path` (created if absent)."""
  if is_local(path):
    with path.open("a", encoding="utf-8") as f:
      f.write(text)
    return
  path.write_text((path.read_text(encoding="utf-8") if path.exists() else "") + text, encoding="utf-8")
