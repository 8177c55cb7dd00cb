"""A tiny BLT on the embedded byte corpus: 200 steps of 8 x 256 bytes in a few minutes on a 2-core CPU.

`--config=blt/configs/tiny.py[:ARGS]`, ARGS (comma-separated):
- `patcher=static` (default, 4-byte patches) or `patcher=space`;
- `patcher=entropy|entropy_monotonic,entropy_model=DIR[,threshold=X][,reset_at_newline=1]`: DIR is the workdir
  of `python -m blt.train_entropy --config=blt/configs/entropy_tiny.py`; without `threshold` (nats), θ is
  calibrated at start-up so that patches average `patch_size` = 6 bytes on the first training rows
  (`model.patching.calibrate`; `python -m blt.calibrate` prints θ for other targets);
- `patcher=bpe,spm_model=PATH`: patches are the tokens of the SentencePiece model at PATH
  (`python -m common.data.train_tokenizer --out=PATH`).

`model.patching`: `method` (static | space | entropy | entropy_monotonic | bpe), `patch_size` (static patches;
the mean patch size the FLOP count assumes; the calibration target), `max_patches` (static number of patch
slots per row; 0 derives one at start-up, see `blt.train.resolve_max_patches`), `threshold` (entropy
patching, nats), `calibrate` (derive `threshold` from `patch_size` at start-up), `max_patch_length` (0 = no
limit), `entropy_model` (workdir), `reset_at_newline` (entropy patching: the entropy model reads every line as
its own document, the paper's fix for entropy drift, `blt.entropy`; absent in older configs = false),
`spm_model` (path).
"""
import ml_collections

from blt.model import blt_model
from blt.patcher import METHODS
from common.config import config_args
from common.configs.base import base_config, tiny_run


def _args(arg) -> dict:
  out = config_args(arg, dict(patcher="static", entropy_model="", threshold="", spm_model="", reset_at_newline="0"))
  if out["patcher"] not in METHODS:
    raise ValueError(f"patcher={out['patcher']!r}: expected one of {', '.join(METHODS)}")
  if out["reset_at_newline"] not in ("0", "1"):
    raise ValueError(f"reset_at_newline={out['reset_at_newline']!r}: expected 0 or 1")
  if out["threshold"]:
    try:
      float(out["threshold"])
    except ValueError:
      raise ValueError(f"threshold={out['threshold']!r}: expected a number of nats") from None
  return out


def get_config(arg=None):
  a = _args(arg)
  c = base_config()
  c.model = blt_model(d_local=64, n_heads_local=4, local_window=64, n_layers_encoder=1, n_layers_decoder=2,
                      n_heads_cross=4, d_global=128, n_layers_global=2, n_heads_global=4,
                      hash_n_min=3, hash_n_max=8, hash_table_size=4096)
  c.model.patching = ml_collections.ConfigDict(dict(
      method=a["patcher"], patch_size=4, max_patches=0, threshold=0.0, calibrate=False, max_patch_length=0,
      entropy_model=a["entropy_model"], reset_at_newline=a["reset_at_newline"] == "1", spm_model=a["spm_model"]))
  if a["patcher"] == "space":
    # Space patches average ~7.5 bytes on the embedded corpus (Python sources and docs: eval/bytes_per_patch
    # 7.47 after 200 steps); the cap keeps long runs of letters (URLs, identifiers) from making one huge patch.
    # patch_size is only the FLOP model's assumed mean here.
    c.model.patching.patch_size = 7
    c.model.patching.max_patch_length = 16
  if a["patcher"] in ("entropy", "entropy_monotonic"):
    # The paper's entropy patches average 4.5-8 bytes (Sec. 4); 6 here, capped like space patches.
    c.model.patching.update(patch_size=6, max_patch_length=16)
    if a["threshold"]:
      c.model.patching.threshold = float(a["threshold"])
    else:
      c.model.patching.calibrate = True
  c = tiny_run(c, seq_len=256)
  # Greedy samples in the log and DIR/samples.txt at every eval (blt.generate; 0 turns them off).
  c.eval.sample_bytes = 48
  c.eval.sample_prompts = ("def ", "The ")
  return c
