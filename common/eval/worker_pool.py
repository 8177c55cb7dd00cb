"""Worker processes that run one call each under a wall-clock limit, reused across calls.

Threads cannot bound grading: math-verify's own limit uses SIGALRM, which only the main thread may set,
and big-integer arithmetic (`9^{9^{9^{9}}}`) holds the GIL, so nothing in the process can interrupt it.
A separate process can be killed. Workers are fresh interpreters running this module (not forked: the
parent may hold JAX threads; not multiprocessing's spawn, which re-runs an unguarded `__main__` script),
started on first use; a worker that runs past the limit is killed and replaced by a fresh one.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import Any, Callable

from common.cli import ArgumentParser
from common.config import run_main

_START_TIMEOUT_S = 120.0  # importing SymPy in a fresh interpreter; not counted against a call's limit


def _serve(requests: Connection, replies: Connection) -> None:
  """Worker loop: run each `(function, args)` received and send back `(ok, result or exception)`."""
  replies.send("ready")
  while True:
    try:
      function, args = requests.recv()
    except EOFError:
      return
    try:
      reply = (True, function(*args))
    except Exception as error:  # pylint: disable=broad-except
      reply = (False, error)
    replies.send(reply)


@dataclasses.dataclass
class _Worker:
  process: subprocess.Popen
  requests: Connection
  replies: Connection

  def stop(self) -> None:
    self.process.kill()
    self.process.wait()
    self.requests.close()
    self.replies.close()


class WorkerPool:
  """`call(function, *args)` runs a function of an importable module (pickled by name) in one of `workers`
  processes; past `timeout_s` it raises TimeoutError and replaces that worker. Safe to call from any thread."""

  def __init__(self, workers: int = 2, timeout_s: float = 5.0):
    self.timeout_s = timeout_s
    self.timeouts = 0  # calls that ran past the limit, for reports
    self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
    for _ in range(workers):
      self._idle.put(None)  # a slot whose worker starts when first needed

  def _start(self) -> _Worker:
    request_read, request_write = os.pipe()
    reply_read, reply_write = os.pipe()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path for path in sys.path if path))
    process = subprocess.Popen([sys.executable, "-m", __name__, f"--requests_fd={request_read}",
                                f"--replies_fd={reply_write}"],
                               pass_fds=(request_read, reply_write), env=env, stdin=subprocess.DEVNULL)
    os.close(request_read)
    os.close(reply_write)
    worker = _Worker(process, Connection(request_write, readable=False), Connection(reply_read, writable=False))
    if not worker.replies.poll(_START_TIMEOUT_S) or worker.replies.recv() != "ready":
      worker.stop()
      raise ChildProcessError("a grading worker did not start")
    return worker

  def call(self, function: Callable, *args) -> Any:
    worker = self._idle.get()
    try:
      if worker is None:
        worker = self._start()
      worker.requests.send((function, args))
      if not worker.replies.poll(self.timeout_s):
        self.timeouts += 1
        raise TimeoutError(f"{function.__name__} ran past {self.timeout_s} s")
      ok, result = worker.replies.recv()
    except (OSError, EOFError) as error:  # TimeoutError is an OSError; EOF: the worker died
      if worker is not None:
        worker.stop()
        worker = None
      if isinstance(error, (TimeoutError, ChildProcessError)):
        raise
      raise ChildProcessError(f"a grading worker died running {function.__name__}") from error
    finally:
      self._idle.put(worker)
    if not ok:
      raise result
    return result

  def close(self) -> None:
    """Stop the idle workers (those busy in other threads finish their call and stay)."""
    stopped = []
    while True:
      try:
        worker = self._idle.get_nowait()
      except queue.Empty:
        break
      if worker is not None:
        worker.stop()
      stopped.append(None)
    for slot in stopped:
      self._idle.put(slot)


def main(argv: list[str]) -> None:
  """The worker's command line (started by `WorkerPool`, not by hand): the two pipe ends it inherits."""
  parser = ArgumentParser(prog="python -m common.eval.worker_pool",
                          description="A grading worker of common.eval.worker_pool.WorkerPool (started by the pool).")
  parser.add_argument("--requests_fd", type=int, required=True, help="inherited pipe end the pool writes calls to")
  parser.add_argument("--replies_fd", type=int, required=True, help="inherited pipe end the worker answers on")
  args = parser.parse_args(argv)
  _serve(Connection(args.requests_fd, writable=False), Connection(args.replies_fd, readable=False))


if __name__ == "__main__":
  run_main(lambda: main(sys.argv[1:]))
