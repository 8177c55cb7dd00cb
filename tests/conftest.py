"""Test set-up: 8 simulated CPU devices (set before JAX is imported), quiet TensorFlow, a fixed CPU peak so
no test times a matmul, and data caches under a per-session temporary folder."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("META_PAPERS_CPU_PEAK", "2.0e11")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))
