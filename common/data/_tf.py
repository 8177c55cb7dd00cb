"""Quiet, CPU-only TensorFlow: tf is only a data tool here, it must not take the GPU or all threads."""
from __future__ import annotations

import contextlib
import os
import sys

_configured = False


@contextlib.contextmanager
def _quiet_stderr():
  """Points file descriptor 2 at /dev/null for the duration (Python errors still raise normally)."""
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError):  # no real fd 2 (embedded interpreters): nothing to silence
    yield
    return
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def import_tf():
  """Imports tensorflow once with GPUs hidden, few threads and C++ logging silenced; returns the module."""
  global _configured
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if "tensorflow" not in sys.modules:
    with _quiet_stderr():  # C++ start-up banners (oneDNN, CUDA stubs) bypass TF_CPP_MIN_LOG_LEVEL
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not _configured:
    _configured = True
    try:
      tf.config.set_visible_devices([], "GPU")
      tf.config.threading.set_inter_op_parallelism_threads(2)
      tf.config.threading.set_intra_op_parallelism_threads(2)
    except RuntimeError:  # runtime already initialised by someone else: keep its settings
      pass
    tf.get_logger().setLevel("ERROR")
  return tf


def import_seqio():
  """seqio imports tensorflow at module level, so configure tf first."""
  import_tf()
  if "seqio" not in sys.modules:
    with _quiet_stderr():  # seqio pulls in more TF libraries, which print their own banners
      import seqio  # pylint: disable=g-import-not-at-top,unused-import
  import seqio  # pylint: disable=g-import-not-at-top
  return seqio


def import_tfds():
  """tensorflow_datasets, quiet; aliases the stdlib importlib.resources as `importlib_resources` when
  that backport is not installed (tfds needs it to prepare datasets but does not require it)."""
  import_tf()
  try:
    import importlib_resources  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    import importlib.resources  # pylint: disable=g-import-not-at-top
    import importlib.resources.abc  # pylint: disable=g-import-not-at-top,unused-import
    sys.modules.setdefault("importlib_resources", importlib.resources)
  if "tensorflow_datasets" not in sys.modules:
    with _quiet_stderr():
      import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  return tfds
