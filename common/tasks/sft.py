"""Supervised fine-tuning on the common trainer: the base model (a hub checkpoint or a random dense LM), optional
LoRA adapters (`common.nn.lora`), packed SFT rows (`common.data.sft`), loss on response tokens only.

With `lora.rank > 0` only the adapters learn: the task's `trainable` filter (`LoRAParam`) gives the optimizer the
adapters alone (`common.train.optim.only_trainable`: no moments and no weight decay for the base, which stays
bit-identical), and the loss differentiates a `frozen_base` view of the model, so no base weight gradient
enters the gradient-norm clipping.
"""
from __future__ import annotations

import ml_collections
from flax import nnx

from common.models import checkpoint_library as hub
from common.config import ConfigError, require
from common.flops import flops_for
from common.models import build_model, padded_vocab_size, validate_model_config
from common.nn.lora import DEFAULT_TARGETS, LoRAParam, apply_lora, frozen_base
from common.data.sft import OVERLONG_POLICIES, SFTData, generate_examples, pack_examples, read_jsonl, \
    split_examples, tokenize_example
from common.tokenizers import TOKENIZERS, Tokenizer, load_tokenizer
from common.tasks.lm import next_token_loss
from common.tasks.base import Task

LORA_TARGETS = (*DEFAULT_TARGETS, "lm_head")


def _tokenizer(cfg) -> Tokenizer:
  """The base's tokenizer (a hub entry's, if it stored one), else `data.tokenizer`."""
  stored = hub.entry_tokenizer(cfg.model.init_from) if cfg.model.init_from else None
  return stored or load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)


def adopt_hub_base(cfg) -> None:
  """A hub base (`model.init_from`) replaces `model.*` by the entry's model config, keeping `model.init_from`:
  a fine-tuning run has the architecture of what it starts from."""
  name = cfg.model.init_from
  if name:
    try:
      entry = hub.describe(name)
    except (ConfigError, FileNotFoundError, OSError) as e:
      raise ConfigError(f"config key 'model.init_from': {e}") from None
    cfg.model = ml_collections.ConfigDict({**entry["model_config"], "init_from": name})


def resolve(cfg):
  """Fills what the config derives (in place; returns it), before any data or parameter is read: a hub base's
  model config (`adopt_hub_base`); model.vocab_size 0 becomes the tokenizer's ids padded to a multiple of 128."""
  adopt_hub_base(cfg)
  if int(cfg.model.vocab_size) == 0:
    require(cfg.data.tokenizer in TOKENIZERS, "data.tokenizer",
            f"must be one of {TOKENIZERS}, got '{cfg.data.tokenizer}'")
    cfg.model.vocab_size = padded_vocab_size(_tokenizer(cfg).vocab_size)
  return cfg


def validate_sft_config(cfg) -> None:
  """The checks of a resolved config (`resolve`), before any data or checkpoint is read; each names its key."""
  lora, data = cfg.lora, cfg.data
  require(isinstance(lora.rank, int) and lora.rank >= 0, "lora.rank", f"must be an integer >= 0, got {lora.rank}")
  require(float(lora.alpha) > 0, "lora.alpha", f"must be positive, got {lora.alpha}")
  targets = tuple(lora.targets)
  require(bool(targets) and set(targets) <= set(LORA_TARGETS), "lora.targets",
          f"must be a non-empty subset of {LORA_TARGETS}, got {targets}")
  require(int(data.seq_len) > 1, "data.seq_len", f"must be > 1, got {data.seq_len}")
  require(data.overlong in OVERLONG_POLICIES, "data.overlong", f"must be one of {OVERLONG_POLICIES}")
  require(0 <= float(data.eval_fraction) < 1, "data.eval_fraction", f"must be in [0, 1), got {data.eval_fraction}")
  require(data.tokenizer in TOKENIZERS, "data.tokenizer", f"must be one of {TOKENIZERS}, got '{data.tokenizer}'")
  if not data.sft_path:
    require(int(data.num_examples) > 0, "data.num_examples", f"must be positive, got {data.num_examples}")
  validate_model_config(cfg.model)
  if lora.rank > 0 and "lm_head" in targets:
    require(not cfg.model.get("tie_embeddings", False), "lora.targets", "'lm_head' needs model.tie_embeddings=False")


def _examples(data_cfg) -> tuple[list[dict], list[dict]]:
  if data_cfg.sft_path:
    examples = read_jsonl(data_cfg.sft_path, "data.sft_path")
  else:
    examples = generate_examples(int(data_cfg.num_examples), int(data_cfg.example_seed))
  if data_cfg.eval_path:
    return examples, read_jsonl(data_cfg.eval_path, "data.eval_path")
  return split_examples(examples, float(data_cfg.eval_fraction))


def build_sft_data(data_cfg, tokenizer: Tokenizer, *, batch_size: int, seed: int) -> SFTData:
  train_examples, eval_examples = _examples(data_cfg)
  seq_len = int(data_cfg.seq_len)
  train_rows, truncated = pack_examples((tokenize_example(e, tokenizer) for e in train_examples), seq_len,
                                        overlong=data_cfg.overlong)
  eval_rows, eval_truncated = pack_examples((tokenize_example(e, tokenizer) for e in eval_examples), seq_len,
                                            overlong=data_cfg.overlong)
  data = SFTData(train_rows, eval_rows, batch_size=batch_size, seed=seed, truncated=truncated + eval_truncated)
  print(f"sft data: {len(train_examples)} train examples in {data.num_train_rows} rows, {len(eval_examples)} eval "
        f"examples in {data.num_eval_rows} rows, {data.truncated} truncated to data.seq_len={seq_len}", flush=True)
  return data


def lora_loss(model, batch):
  """`next_token_loss` with gradients flowing into the adapters only."""
  return next_token_loss(frozen_base(model), batch)


def sft_task(cfg) -> Task:
  """The Task for `common.train.loop.train` on a resolved config (`resolve`): the hub base's parameters (or a
  random dense LM), its tokenizer, LoRA adapters when lora.rank > 0."""
  base = nnx.split(hub.load(cfg.model.init_from)[1]) if cfg.model.init_from else None
  tokenizer = _tokenizer(cfg)
  require(cfg.model.vocab_size >= tokenizer.vocab_size, "model.vocab_size",
          f"{cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids")
  data = build_sft_data(cfg.data, tokenizer, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  rank, seed = int(cfg.lora.rank), int(cfg.train.seed)

  def build():
    model = build_model(cfg.model, seed=seed) if base is None else nnx.merge(*base)
    if rank:
      try:
        apply_lora(model, rank, float(cfg.lora.alpha), tuple(cfg.lora.targets), rngs=nnx.Rngs(params=seed + 1))
      except ValueError as e:
        raise ConfigError(f"config key 'lora.targets': {e}") from None
    return model

  seq_len = data.seq_len
  flops = flops_for(cfg.model, seq_len)
  # LoRA computes no weight gradient of the base: forward plus the backward through activations, 2x forward.
  flops_per_token = 2 * flops.forward if rank else flops.training
  return Task(build_model=build, loss_fn=lora_loss if rank else next_token_loss, data=data,
              train_flops_per_example=flops_per_token * seq_len, units_per_example=seq_len,
              trainable=LoRAParam if rank else None)

