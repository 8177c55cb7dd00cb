"""The five models of `python -m blt.reproduce` (Pagnoni et al. 2024, sec. 5 and fig. 1, in miniature).

`--config=blt/configs/reproduce.py:arm=ARM[,scale=tiny|quick][,...]`, trained by `python -m common.train`
(arms `byte`, `bpe`: the dense LM) or `python -m blt.train` (arms `space`, `entropy`):
  byte     the dense LM on bytes (seqio ByteVocabulary)
  bpe      the same dense LM on SentencePiece tokens (`spm_model=PATH`), with `seq_len` tokens a row, which
           blt.reproduce sets so a row holds about as many bytes as a byte row (the paper matches context
           in bytes, sec. 5.1)
  space    a BLT whose latent transformer is that dense LM's body, space patching
  entropy  the same BLT, entropy patching (global rule) with `entropy_model=WORKDIR` (blt.train_entropy)
           and `threshold` (nats, which blt.reproduce calibrates with blt.calibrate for each target size)
The dense LMs and the BLT's latent transformer share one body (width, depth, heads, SwiGLU width), so the
arms differ only in what a position holds: a byte, a BPE token, or a patch. `patch_size` is the mean patch
size the BLT FLOP count assumes (common.flops.blt_mean_patch_size); blt.reproduce measures it on training
rows before it picks the number of steps. `scale=quick` shrinks everything for a smoke run.

`n_layers_global=N` (BLT arms) deepens the latent transformer (blt.reproduce's patch-size trend).
`ablation=NAME` (BLT arms) changes one architecture switch of `blt.model` (the paper's sec. 7 ablations), the
rest as above: `no_hash` (no hash n-gram embeddings), `hash3` (three hash functions per n, as the official
code), `pool_only` (no encoder cross-attention: a patch is its max-pooled bytes), `dec_first` (decoder
cross-attention before the first layer only), `k2` (two query slots per patch), `own_patch` (a byte reads only
the patch its grouping points at). At the tiny scale the encoder has one layer, so 'every' equals 'last' there
and is not an arm.
"""
import ml_collections

from blt.model import blt_model
from common.config import config_args
from common.configs.base import base_config, dense_model, tiny_run

ARMS = ("byte", "bpe", "space", "entropy")
# body: the dense LM / latent transformer; local: the BLT's byte-level encoder and decoder; data: rows and text.
SCALES = {
    "tiny": dict(body=dict(d_model=128, n_layers=4, n_heads=4, d_ff=512),
                 local=dict(d_local=64, n_heads_local=4, local_window=64, n_layers_encoder=1, n_layers_decoder=2,
                            n_heads_cross=4, hash_table_size=4096),
                 data=dict(seq_len=256, max_train_bytes=4_000_000, max_eval_bytes=100_000), batch_size=8),
    "quick": dict(body=dict(d_model=32, n_layers=1, n_heads=2, d_ff=64),
                  local=dict(d_local=16, n_heads_local=2, local_window=16, n_layers_encoder=1, n_layers_decoder=1,
                             n_heads_cross=2, hash_table_size=256),
                  data=dict(seq_len=64, max_train_bytes=60_000, max_eval_bytes=6_000), batch_size=8),
}
ABLATIONS = {"no_hash": dict(hash_functions=0), "hash3": dict(hash_functions=3),
             "pool_only": dict(encoder_cross="none"), "dec_first": dict(decoder_cross="first"),
             "k2": dict(cross_attn_k=2), "own_patch": dict(decoder_patch_scope="own")}
MAX_PATCH_LENGTH = 16  # as blt/configs/tiny.py: long identifiers and URLs do not make one huge patch


def _args(arg) -> dict:
  a = config_args(arg, dict(arm="byte", scale="tiny", spm_model="", seq_len="0", entropy_model="",
                            threshold="0.0", patch_size="4.0", max_patches="0", ablation="",
                            n_layers_global="0"))
  if a["ablation"] and (a["ablation"] not in ABLATIONS or a["arm"] in ("byte", "bpe")):
    raise ValueError(f"ablation={a['ablation']!r}: expected one of {', '.join(ABLATIONS)}, on a BLT arm")
  if a["arm"] not in ARMS:
    raise ValueError(f"arm={a['arm']!r}: expected one of {', '.join(ARMS)}")
  if a["scale"] not in SCALES:
    raise ValueError(f"scale={a['scale']!r}: expected one of {', '.join(SCALES)}")
  return a


def get_config(arg=None):
  a = _args(arg)
  s = SCALES[a["scale"]]
  body = s["body"]
  c = tiny_run(base_config(), seq_len=s["data"]["seq_len"])
  c.data.update(s["data"])
  c.train.batch_size = s["batch_size"]
  c.eval.batches = 0  # the whole held-out split: every arm is scored on exactly the same bytes
  if a["arm"] in ("byte", "bpe"):
    c.model = dense_model(d_model=body["d_model"], n_layers=body["n_layers"], n_heads=body["n_heads"],
                          n_kv_heads=body["n_heads"], d_ff=body["d_ff"])
    if a["arm"] == "bpe":
      c.data.update(vocab="spm", spm_model=a["spm_model"])
      if int(a["seq_len"]) > 0:
        c.data.seq_len = int(a["seq_len"])
    return c
  c.model = blt_model(d_global=body["d_model"], n_layers_global=body["n_layers"], n_heads_global=body["n_heads"],
                      d_ff_global=body["d_ff"], hash_n_min=3, hash_n_max=8, **s["local"],
                      **ABLATIONS.get(a["ablation"], {}))
  if int(a["n_layers_global"]) > 0:
    c.model.n_layers_global = int(a["n_layers_global"])
  c.model.patching = ml_collections.ConfigDict(dict(
      method=a["arm"], patch_size=float(a["patch_size"]), max_patches=int(a["max_patches"]),
      threshold=float(a["threshold"]), calibrate=False, max_patch_length=MAX_PATCH_LENGTH,
      entropy_model=a["entropy_model"], spm_model=""))
  return c
