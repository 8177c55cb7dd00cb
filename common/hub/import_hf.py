"""A local Hugging Face checkpoint folder (Llama or Qwen2) as a library entry, so that every paper's
`model.init_from=NAME` starts from it: `python -m common.hub import_hf --path=DIR --name=NAME`.

The architecture comes from config.json's `model_type`; the tokenizer is the folder's `tokenizer.json` (read with
the `tokenizers` library), else its `tokenizer.model` (Llama 3's tiktoken text file or a SentencePiece model).
"""
from __future__ import annotations

import json
import os

from common.config import ConfigError
from common.models.checkpoint_library import save
from common.models.hf_llama import load_hf_llama
from common.models.hf_qwen2 import load_hf_qwen2
from common.tokenizers import load_tokenizer

LOADERS = {"llama": load_hf_llama, "qwen2": load_hf_qwen2}


def _model_type(path: str) -> str:
  config = os.path.join(path, "config.json")
  try:
    with open(config) as f:
      model_type = json.load(f).get("model_type", "")
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"--path={path}: cannot read config.json ({e})") from None
  if model_type not in LOADERS:
    raise ConfigError(f"{config}: model_type '{model_type}' is not one of {sorted(LOADERS)}")
  return model_type


def _is_tiktoken_file(path: str) -> bool:
  """Llama 3's tokenizer.model is text, one `base64 rank` pair a line; SentencePiece's is a binary protobuf."""
  with open(path, "rb") as f:
    first = f.readline()
  parts = first.split()
  return len(parts) == 2 and parts[1].isdigit()


def folder_tokenizer(path: str) -> tuple[str, str] | None:
  """(kind, path) of the folder's tokenizer for `common.tokenizers.load_tokenizer`, None when it has none."""
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    return "hf", path
  model_file = os.path.join(path, "tokenizer.model")
  if os.path.isfile(model_file):
    return ("llama3" if _is_tiktoken_file(model_file) else "spm"), model_file
  return None


def import_hf(path: str, name: str, *, root=None, dtype: str = "float32", overwrite: bool = False):
  """Stores the checkpoint at `path` as entry `name` (parameters, model config with its context length and
  special ids, tokenizer); returns the entry's folder."""
  if not os.path.isdir(path):
    raise ConfigError(f"--path={path}: no such folder")
  model_type = _model_type(path)
  model_cfg, model = LOADERS[model_type](path, dtype=dtype)
  spec = folder_tokenizer(path)
  metadata = {"source": os.path.abspath(path), "model_type": model_type}
  return save(name, model_cfg, model, tokenizer=load_tokenizer(*spec) if spec else None, metadata=metadata,
              root=root, overwrite=overwrite)
