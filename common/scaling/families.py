"""Model families for scaling sweeps: a family is a function `size -> ml_collections.ConfigDict`.

A sweep varies one knob (the size) and holds everything else fixed, so that a family's runs differ only in
model shape and training length, as in the IsoFLOP sweeps of Hoffmann et al. 2022 ("Chinchilla", sec. 3.2)
and the model-size sweeps of Kaplan et al. 2020 (sec. 3). The budget planner (budget.py) sets `train.steps`;
everything else (data, batch, optimiser) comes from the family. A family function may carry a
`default_sizes` attribute, the sizes a sweep uses when `--sizes` is not given.

Families are named on the command line as `module:function` (`common.scaling.families:dense_lm`).
"""
from __future__ import annotations

import importlib
from typing import Callable

import ml_collections

from common.config import ConfigError

Family = Callable[[int], ml_collections.ConfigDict]

# seqio's ByteVocabulary has 256 bytes + pad/eos/unk ids; lm_task pads the vocabulary to a multiple of 128.
# The planner needs it before any data is loaded (FLOPs of the logits depend on it), so it is set here.
BYTE_VOCAB_PADDED = 384


def dense_lm_shape(d_model: int) -> dict:
  """The dense LM shape at width `d_model`: head_dim 16, depth d_model / 32 (at least 1), GQA with two query
  heads per KV head where the head count is even, SwiGLU d_ff ~ 8/3 d_model (a multiple of 16), as in the
  Llama recipe at miniature scale. Depth grows with width so that the aspect ratio stays roughly fixed,
  which Kaplan et al. 2020 (sec. 3.1, fig. 5) find costs little loss over a wide range."""
  if d_model < 16 or d_model % 16:
    raise ConfigError(f"--sizes: the dense_lm size is d_model, a positive multiple of 16; got {d_model}")
  n_heads = d_model // 16
  return dict(d_model=d_model, n_layers=max(1, d_model // 32), n_heads=n_heads,
              n_kv_heads=n_heads // 2 if n_heads % 2 == 0 else n_heads,
              d_ff=16 * max(1, round(8 * d_model / 3 / 16)))


def dense_lm(size: int) -> ml_collections.ConfigDict:
  """The dense LM at d_model=`size` on the embedded byte corpus, with a tiny batch and context so that a run
  on a CPU takes seconds. Scale up with `--config.*` overrides (train.batch_size, data.seq_len, data.*)."""
  from common.configs.base import base_config, dense_model  # local: keeps `import families` light
  c = base_config()
  c.model = dense_model(vocab_size=BYTE_VOCAB_PADDED, **dense_lm_shape(int(size)))
  c.train.update(dict(batch_size=8, learning_rate=3e-3, warmup_steps=10))
  c.data.update(dict(seq_len=64, max_train_bytes=1_000_000, max_eval_bytes=100_000))
  c.checkpoint.update(dict(every_steps=50, keep=2))
  c.log.update(dict(every_steps=5))
  c.eval.update(dict(every_steps=1_000_000, batches=4))  # one eval, at the last step
  return c


dense_lm.default_sizes = (32, 48, 64, 96, 128)


def resolve_family(spec: str) -> tuple[str, Family]:
  """'package.module:function' -> (function name, the function). Bad specs raise ConfigError naming
  --family."""
  module_name, sep, fn_name = spec.partition(":")
  if not sep or not module_name or not fn_name:
    raise ConfigError(f"--family: expected 'module:function' (e.g. common.scaling.families:dense_lm), "
                      f"got '{spec}'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError(f"--family: cannot import module '{module_name}' ({e})") from None
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    raise ConfigError(f"--family: module '{module_name}' has no function '{fn_name}'")
  return fn_name, fn


def family_sizes(fn: Family, sizes: str | None) -> list[int]:
  """`--sizes=32,64` or, when empty, the family's `default_sizes`."""
  if sizes:
    try:
      return [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
      raise ConfigError(f"--sizes: expected comma-separated integers, got '{sizes}'") from None
  default = getattr(fn, "default_sizes", None)
  if not default:
    raise ConfigError("--sizes: the family defines no default_sizes; pass --sizes=S1,S2,...")
  return list(default)
