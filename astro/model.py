"""The policy every ASTRO stage trains: the dense LM (common.models), started from the run of the stage before
(`init_run`: the base policy for SFT, an SFT run for RL), a hub entry (`model.init_from`, e.g. an imported
Llama) or random weights (the base stage), and the tokenizer it reads."""
from __future__ import annotations

import ml_collections
from flax import nnx

from common.config import ConfigError, require
from common.models import build_model, padded_vocab_size
from common.models import checkpoint_library as hub
from common.tasks.sft import adopt_hub_base
from common.tokenizers import Tokenizer, load_tokenizer
from common.train.restore import load_run_model, read_run_config


def tokenizer_for(cfg) -> Tokenizer:
  """A hub base's tokenizer when it stored one, else `data.tokenizer`."""
  stored = hub.entry_tokenizer(cfg.model.init_from) if cfg.model.init_from else None
  return stored or load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)


def adopt_base(cfg) -> None:
  """`model.*` of what the run starts from: the `init_run`'s resolved model config (keeping its
  `init_from`), else the hub entry's; a fine-tuning stage has the architecture of its starting point."""
  if cfg.init_run:
    run_model = read_run_config(cfg.init_run, "init_run").model
    cfg.model = ml_collections.ConfigDict({**run_model.to_dict(), "init_from": run_model.get("init_from", "")})
  else:
    adopt_hub_base(cfg)
  if int(cfg.model.vocab_size) == 0:
    cfg.model.vocab_size = padded_vocab_size(tokenizer_for(cfg).vocab_size)


def model_builder(cfg):
  """() -> the starting model of a resolved config (`adopt_base`), its parameters read once here."""
  seed = int(cfg.train.seed)
  if cfg.init_run:
    run_cfg = read_run_config(cfg.init_run, "init_run")
    fresh = lambda: build_model(run_cfg.model, seed=seed)
    state = nnx.split(load_run_model(cfg.init_run, run_cfg, fresh, key="init_run")[0])
    return lambda: nnx.merge(*state)
  if cfg.model.init_from:
    try:
      state = nnx.split(hub.load(cfg.model.init_from)[1])
    except (FileNotFoundError, OSError) as e:
      raise ConfigError(f"config key 'model.init_from': {e}") from None
    return lambda: nnx.merge(*state)
  return lambda: build_model(cfg.model, seed=seed)


def check_fits(cfg, tokenizer: Tokenizer) -> None:
  require(int(cfg.model.vocab_size) >= tokenizer.vocab_size, "model.vocab_size",
          f"{cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids")
