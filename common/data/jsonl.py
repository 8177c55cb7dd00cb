"""Reading jsonl files of examples (SFT data, math problems in any public layout) with one error per bad line,
naming the file and the line, in whatever error type the caller reports bad input with."""
from __future__ import annotations

import json
import os
from typing import Callable, Iterator


def jsonl_objects(path: str, error: Callable[[str], Exception]) -> Iterator[tuple[int, dict]]:
  """(line number, object) of each non-blank line; `error(message)` is raised for a missing file, a line that
  is not JSON, or one that is not a JSON object."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise error(f"{path}: no such file")
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise error(f"{path}:{line_no}: not a JSON object ({e.msg})") from None
      if not isinstance(row, dict):
        raise error(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
      yield line_no, row
