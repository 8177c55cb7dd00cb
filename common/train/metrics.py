"""Where training metrics go: `metrics.jsonl` (one JSON object a line, always with `step`), TensorBoard
event files, and a progress display (a bar on a terminal, plain lines otherwise)."""
from __future__ import annotations

import json
import math
import sys
import time
import types

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from common.config import ConfigError
from common.train import workdir as workdir_lib


def _event_file_writer(logdir: str) -> EventFileWriter:
  """TensorBoard's event writer. A local directory, unless TensorFlow is already loaded: TensorBoard is
  pointed at its own TF-free file layer (its documented `tensorboard.compat.notf` switch), since otherwise the
  writer imports all of TensorFlow (seconds, and C++ log lines on stderr) just to write a local file. Anywhere
  else (gs://...): TensorFlow's file system, which writes there itself."""
  if not workdir_lib.is_local(logdir):
    from common.data._tf import import_tf  # pylint: disable=g-import-not-at-top
    import_tf()
  elif "tensorflow" not in sys.modules:
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
  return EventFileWriter(logdir)


def _finite_or_str(v):
  v = float(v)
  return v if math.isfinite(v) else str(v)


class MetricsWriter:
  """Appends to metrics.jsonl and TensorBoard. On resume from step s, lines after s (written by a run that
  was killed before its next checkpoint) are dropped so the file reads like one uninterrupted run, and so is
  a last line torn by the kill (its step is logged again). TensorBoard gets a restart marker at s + 1 (its
  `purge_step`), so it drops the killed run's events after s instead of showing those steps twice.

  A local file gets each line as it is written. An object store (gs://...) has no append: the lines are kept
  and the whole file is written at each `flush`, which the loop calls before every checkpoint save (and at
  the end). So a checkpoint of step s never exists without the lines up to s, and a run killed before its
  next flush loses only lines after its newest checkpoint, which the resumed run writes again: each step's
  line is in the file once."""

  def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = workdir_lib.run_path(workdir) / "metrics.jsonl"
    self.local = workdir_lib.is_local(self.path)
    if not enabled:
      return
    self.lines = self._truncate_after(resume_step)
    self.file = self.path.open("a") if self.local else None
    self.tb = _event_file_writer(str(workdir_lib.run_path(workdir) / "tensorboard"))
    if resume_step > 0:
      self.tb.add_event(event_pb2.Event(wall_time=time.time(), step=resume_step + 1,
                                        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def _read_rows(self) -> list[tuple[str, dict]]:
    """(line, parsed row) of every line; a last line that does not parse (torn by a kill) is left out."""
    lines = [l for l in self.path.read_text().splitlines(keepends=True) if l.strip()]
    rows = []
    for i, line in enumerate(lines):
      try:
        rows.append((line, json.loads(line)))
      except ValueError:
        if i < len(lines) - 1 or line.endswith("\n"):
          raise ConfigError(f"'{self.path}' line {i + 1} is not JSON; fix or remove that line to resume") from None
    return rows

  def _truncate_after(self, step: int) -> list[str]:
    """The file's lines of steps up to `step`, and the file cut to them."""
    if not self.path.exists():
      return []
    lines = self.path.read_text().splitlines(keepends=True)
    kept = [line for line, row in self._read_rows() if row.get("step", 0) <= step]
    if len(kept) != len(lines):
      workdir_lib.write_atomic(self.path, "".join(kept))
    return kept

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _finite_or_str(v) for k, v in metrics.items()}}
    line = json.dumps(row) + "\n"
    if self.local:
      self.file.write(line)
      self.file.flush()
    else:
      self.lines.append(line)
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
    self.tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                      summary=summary_pb2.Summary(value=values)))

  def flush(self) -> None:
    """Everything written so far into the file and TensorBoard's events."""
    if not self.enabled:
      return
    if not self.local:
      self.path.write_text("".join(self.lines))
    self.tb.flush()

  def close(self) -> None:
    if self.enabled:
      self.flush()
      if self.local:
        self.file.close()
      self.tb.close()


class Progress:
  """tqdm bar when stderr is a terminal (mode 'auto' or 'bar'), else one plain line per log step."""

  def __init__(self, total: int, start: int, mode: str = "auto", enabled: bool = True):
    use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
    self.enabled = enabled
    self.bar = None
    if enabled and use_bar:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    self.total = total
    self.t0, self.s0 = time.time(), start

  def update(self, step: int, metrics: dict, throughput_key: str) -> None:
    if not self.enabled:
      return
    done = step - self.s0
    eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
    tput = metrics.get(throughput_key, 0.0)
    if self.bar is not None:
      self.bar.n = step
      self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", **{throughput_key: f"{tput:,.0f}"},
                           mfu=f"{metrics.get('mfu', 0):.1%}", refresh=False)
      self.bar.refresh()
    else:
      print(f"step {step}/{self.total}  loss {metrics['loss']:.4f}  {throughput_key} {tput:,.0f}  "
            f"mfu {metrics.get('mfu', 0):.1%}  eta {eta:,.0f}s", flush=True)

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
