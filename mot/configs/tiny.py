"""A tiny MoT (or its dense baseline) on generated mixed-modal documents: 200 steps of 8 x 256 tokens, a minute
or two on a laptop CPU (plus, on first use, about a minute to train the cached VQ image tokenizer).

`--config=mot/configs/tiny.py[:ARGS]`, ARGS (comma-separated):
- `setting=chameleon` (default: every modality as discrete tokens, next-token loss; Liang et al. 2024 sec.
  3.1) or `setting=transfusion` (text tokens + diffusion over image patches; sec. 3.2);
- `modalities=text+image` (default) or `text+image+audio` (Chameleon only; the speech setting, sec. 3.1);
- `model=mot` (default: weights untied per modality) or `model=dense` (the baseline of the same shapes, so
  the same FLOPs per token: the MoT code with one weight set; with `norm=pre` in the Chameleon setting, the
  common dense LM, which is that same function);
- `norm=post` (default: RMSNorm on each sublayer's output, MoT's Algorithm 1 after Chameleon sec. 2.3, for
  both models of a comparison, since the paper's dense baseline is Chameleon) or `norm=pre` (on its input,
  the layout of runs made before the key existed).

`eval.sample_images`: scenes captioned greedily at every eval, written to DIR/samples.txt (0 turns it off).
"""
from __future__ import annotations

from common.config import config_args
from common.configs.base import base_config
from common.data.mixed_modal import mixed_modal_data_config
from mot.configs.base import mot_model

SETTINGS = ("chameleon", "transfusion")
MODELS = ("mot", "dense")
MODALITY_SETS = ("text+image", "text+image+audio")
NORMS = ("post", "pre")


def parse_args(arg, **defaults) -> dict[str, str]:
  """The arguments shared by the MoT configs (`setting`, `modalities`, `model`, `norm`) plus `defaults`."""
  a = config_args(arg, dict(setting="chameleon", modalities="text+image", model="mot", norm="post", **defaults))
  if a["setting"] not in SETTINGS:
    raise ValueError(f"setting={a['setting']!r}: expected one of {', '.join(SETTINGS)}")
  if a["model"] not in MODELS:
    raise ValueError(f"model={a['model']!r}: expected one of {', '.join(MODELS)}")
  if a["norm"] not in NORMS:
    raise ValueError(f"norm={a['norm']!r}: expected one of {', '.join(NORMS)}")
  if a["modalities"] not in MODALITY_SETS:
    raise ValueError(f"modalities={a['modalities']!r}: expected one of {', '.join(MODALITY_SETS)}")
  if a["setting"] == "transfusion" and a["modalities"] != "text+image":
    raise ValueError(f"modalities={a['modalities']!r}: the transfusion setting is text+image only")
  return a


def apply_args(c, a: dict[str, str]) -> None:
  """Sets data.setting / data.modalities, the norm placement and the model `model` names; the model keys that
  follow from data.* (setting, n_modalities, patch shapes, vocab_size) are filled by `mot.train.resolve`."""
  c.data.update(setting=a["setting"], modalities=tuple(a["modalities"].split("+")))
  c.model.norm_placement = a["norm"]
  if a["setting"] == "chameleon" and a["model"] == "dense" and a["norm"] == "pre":
    c.model.name = "dense_lm"
  else:
    c.model.untied = a["model"] == "mot"


def get_config(arg=None):
  a = parse_args(arg)
  c = base_config()
  c.data = mixed_modal_data_config()
  c.data.update(seq_len=256, n_train_docs=2000, n_eval_docs=200)
  c.model = mot_model(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192)
  apply_args(c, a)
  c.train.update(steps=200, batch_size=8, warmup_steps=20, learning_rate=3e-3)
  c.eval.update(every_steps=100, batches=4, sample_images=2)
  c.checkpoint.every_steps = 100
  return c
