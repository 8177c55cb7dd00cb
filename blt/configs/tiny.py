"""A tiny BLT on the embedded byte corpus: 200 steps of 8 x 256 bytes in a few minutes on a 2-core CPU.

`--config=blt/configs/tiny.py:patcher=space` (default `patcher=static`; `entropy` needs a trained entropy model,
which does not exist yet, and is refused with a ConfigError naming `model.patching.method`).

`model.patching`: `method` (static | space | entropy | entropy_monotonic), `patch_size` (static patches, and the
mean patch size the FLOP count assumes), `max_patches` (static number of patch slots per row; 0 derives a bound
from data.seq_len that no row can exceed, see `blt.train.resolve_max_patches`), `threshold` (entropy patching, in
nats), `max_patch_length` (0 = no limit).
"""
import ml_collections

from blt.model import blt_model
from common.config import config_args
from common.configs.base import base_config, tiny_run

PATCHERS = ("static", "space", "entropy", "entropy_monotonic")


def _args(arg) -> dict:
  out = config_args(arg, dict(patcher="static"))
  if out["patcher"] not in PATCHERS:
    raise ValueError(f"patcher={out['patcher']!r}: expected one of {', '.join(PATCHERS)}")
  return out


def get_config(arg=None):
  a = _args(arg)
  c = base_config()
  c.model = blt_model(d_local=64, n_heads_local=4, local_window=64, n_layers_encoder=1, n_layers_decoder=2,
                      n_heads_cross=4, d_global=128, n_layers_global=2, n_heads_global=4,
                      hash_n_min=3, hash_n_max=8, hash_table_size=4096)
  c.model.patching = ml_collections.ConfigDict(dict(
      method=a["patcher"], patch_size=4, max_patches=0, threshold=0.0, max_patch_length=0))
  if a["patcher"] == "space":
    # Space patches average ~7.5 bytes on the embedded corpus (Python sources and docs: eval/bytes_per_patch
    # 7.47 after 200 steps); the cap keeps long runs of letters (URLs, identifiers) from making one huge patch.
    # patch_size is only the FLOP model's assumed mean here.
    c.model.patching.patch_size = 7
    c.model.patching.max_patch_length = 16
  return tiny_run(c, seq_len=256)
