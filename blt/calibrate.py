"""Choosing the entropy threshold θ for a target mean patch size (Pagnoni et al. 2024, Sec. 2.3 and Sec. 4:
the paper sets θ so that entropy patches average a chosen size, e.g. 6 or 8 bytes, to match BPE's).

    python -m blt.calibrate --entropy_model=DIR --target_patch_size=6 [--monotonic] [--max_patch_length=N]
        [--sample_bytes=N]

prints θ, the mean bytes per patch it gives on a sample of the entropy model's training corpus, and the config
override to pass to `blt.train`.

Mean patch size is counted as `eval/bytes_per_patch` of `blt.train`: non-padding bytes over the patches that
open on them, with a patch forced at every packed segment start and `max_patch_length` applied. It does not
decrease as θ grows (a higher θ opens a subset of the patches; merging two patches never adds forced
max-length splits), so bisection on θ converges to the target up to the step the finite sample allows.

The same sample (the first training rows) sizes the patch slots of entropy and BPE patching: `patches_per_row`
counts its patches at the resolved θ for `blt.train.resolve_max_patches`.
"""
from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from blt.data import PatchingData, seqio_to_blt
from blt.entropy import EntropyScorer, load_entropy_model
from blt.patcher import patch
from common.cli import ArgumentParser
from common.config import ConfigError, run_main

DEFAULT_SAMPLE_BYTES = 65_536


@functools.partial(jax.jit, static_argnames=("method", "max_patch_length"))
def _mean_patch_size(entropies, segment_ids, positions, threshold, *, method: str, max_patch_length: int):
  patches = patch(jnp.zeros(entropies.shape, jnp.int32), method=method, max_patches=1, entropies=entropies,
                  threshold=threshold, max_patch_length=max_patch_length, segment_ids=segment_ids,
                  positions=positions)
  in_segment = segment_ids > 0
  return jnp.sum(in_segment) / jnp.maximum(jnp.sum(patches.patch_starts & in_segment), 1)


def mean_patch_size(entropies, threshold: float, *, monotonic: bool = False, max_patch_length: int = 0,
                    segment_ids=None, positions=None) -> float:
  """Mean bytes per patch of entropy patching with `threshold` over rows [rows, length] (no segment ids:
  each row is one document)."""
  entropies = jnp.asarray(entropies, jnp.float32)
  segment_ids = jnp.ones(entropies.shape, jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
  positions = jnp.broadcast_to(jnp.arange(entropies.shape[1]), entropies.shape) if positions is None else \
      jnp.asarray(positions)
  method = "entropy_monotonic" if monotonic else "entropy"
  return float(_mean_patch_size(entropies, segment_ids, positions, jnp.float32(threshold), method=method,
                                max_patch_length=int(max_patch_length)))


def calibrate_threshold(entropies, target_patch_size: float, *, monotonic: bool = False, max_patch_length: int = 0,
                        segment_ids=None, positions=None, iterations: int = 48) -> tuple[float, float]:
  """(θ, achieved mean bytes per patch): bisection on θ for the global rule H(t) > θ (or the monotonic rule
  H(t) - H(t-1) > θ) over sampled entropies [rows, length] in nats. θ is bracketed by the values the rule
  compares (below the smallest: every byte opens a patch; at the largest: only forced starts); a target
  outside what the sample allows returns the nearest end. Of the θ tried, the one whose mean is closest to
  the target is returned."""
  h = np.asarray(entropies, np.float32)
  compared = h[:, 1:-1] - h[:, :-2] if monotonic else h[:, :-1]
  lo, hi = float(compared.min()) - 1.0, float(compared.max())
  size = functools.partial(mean_patch_size, h, monotonic=monotonic, max_patch_length=max_patch_length,
                           segment_ids=segment_ids, positions=positions)
  best = min(((t, size(t)) for t in (lo, hi)), key=lambda r: abs(r[1] - target_patch_size))
  for _ in range(iterations):
    mid = 0.5 * (lo + hi)
    achieved = size(mid)
    if abs(achieved - target_patch_size) < abs(best[1] - target_patch_size):
      best = (mid, achieved)
    if achieved < target_patch_size:
      lo = mid
    else:
      hi = mid
  return best


def sample_patching_inputs(data, sample_bytes: int = DEFAULT_SAMPLE_BYTES) -> dict[str, np.ndarray]:
  """The first training rows (data positions 0, 1, ...; about `sample_bytes` bytes) of a `blt.data.PatchingData`
  as the trainer patches them: `inputs`, `segment_ids`, `positions` [rows, length] and what the pipeline adds
  (`entropies` of an entropy scorer; BPE `patch_starts`, [rows, length + 1])."""
  rows = max(1, sample_bytes // data.seq_len)
  batches = [data.train_batch(position) for position in range(0, rows, data.batch_size)]
  keys = ("inputs", "segment_ids", "positions", "entropies", "patch_starts")
  return {k: np.concatenate([b[k] for b in batches])[:rows] for k in keys if k in batches[0]}


@functools.partial(jax.jit, static_argnames=("method", "patch_size", "max_patch_length"))
def _patches_per_row(sample, threshold, *, method: str, patch_size: int, max_patch_length: int):
  seg, pos = sample["segment_ids"], sample["positions"]
  return patch(seqio_to_blt(sample["inputs"], seg, pos), method=method, max_patches=1, patch_size=patch_size,
               entropies=sample.get("entropies"), threshold=threshold, max_patch_length=max_patch_length,
               patch_starts=sample.get("patch_starts"), segment_ids=seg, positions=pos).num_patches  # all, unslotted


def patches_per_row(sample, patching) -> np.ndarray:
  """int [rows]: the patches of each row of `sample` (`sample_patching_inputs`) under `patching` (a resolved
  `model.patching`), counted as `blt.train.blt_loss` opens them, through `blt.patcher.patch`: segment starts
  (the row padding is one patch), forced starts and `max_patch_length` included."""
  sample = {k: jnp.asarray(v) for k, v in sample.items()}
  return np.asarray(_patches_per_row(sample, jnp.float32(patching.get("threshold", 0.0)), method=patching.method,
                                     patch_size=int(patching.patch_size),
                                     max_patch_length=int(patching.max_patch_length)))


def main(argv=None) -> int:
  parser = ArgumentParser(prog="python -m blt.calibrate", description=__doc__)
  parser.add_argument("--entropy_model", required=True, help="workdir of `python -m blt.train_entropy`")
  parser.add_argument("--target_patch_size", type=float, required=True, help="mean bytes per patch")
  parser.add_argument("--monotonic", action="store_true", help="the monotonic rule H(t) - H(t-1) > θ")
  parser.add_argument("--max_patch_length", type=int, default=0, help="as model.patching.max_patch_length")
  parser.add_argument("--reset_at_newline", action="store_true",
                      help="the entropy context restarts at every newline (model.patching.reset_at_newline)")
  parser.add_argument("--sample_bytes", type=int, default=DEFAULT_SAMPLE_BYTES,
                      help="bytes of the training corpus to calibrate on")
  args = parser.parse_args(argv)
  from common.data import DataError, LMData
  if args.target_patch_size < 1:
    print(f"error: --target_patch_size={args.target_patch_size} must be >= 1", file=sys.stderr)
    return 2
  try:
    model, cfg = load_entropy_model(args.entropy_model)
    lm_data = LMData(cfg.data, batch_size=int(cfg.train.batch_size), seed=int(cfg.train.seed))
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sample = sample_patching_inputs(PatchingData(lm_data, entropy_scorer=EntropyScorer(model, reset_at_newline=args.reset_at_newline)), args.sample_bytes)
  options = dict(monotonic=args.monotonic, max_patch_length=args.max_patch_length,
                 segment_ids=sample["segment_ids"], positions=sample["positions"])
  theta, _ = calibrate_threshold(sample["entropies"], args.target_patch_size, **options)
  theta = round(theta, 4)  # what is printed is what is measured
  achieved = mean_patch_size(sample["entropies"], theta, **options)
  n_bytes = int((sample["segment_ids"] > 0).sum())
  method = "entropy_monotonic" if args.monotonic else "entropy"
  print(f"threshold {theta:.4f} nats: mean {achieved:.3f} bytes per patch on {n_bytes:,} bytes "
        f"(target {args.target_patch_size:g}, method {method})")
  print(f"--config.model.patching.method={method} --config.model.patching.threshold={theta:.4f}")
  return 0


if __name__ == "__main__":
  run_main(main)
