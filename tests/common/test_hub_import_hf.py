"""`python -m common.hub import_hf`: a Hugging Face folder written by transformers becomes a library entry
whose model gives transformers' logits and whose tokenizer is the folder's. Needs the `hf` extra."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from common.config import ConfigError
from common.hub.__main__ import main
from common.hub.import_hf import folder_tokenizer
from common.models import checkpoint_library as hub
from common.tokenizers import HFTokenizer

transformers.logging.set_verbosity_error()
TOKENS = np.random.RandomState(1).randint(0, 300, (2, 24))


def _bpe_folder(folder) -> None:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the cat sat on the mat", "a dog ran far away"] * 5, trainer)
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_an_imported_folder_gives_transformers_logits_and_its_tokenizer(kind, tmp_path):
  torch.manual_seed(0)
  common = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, eos_token_id=0, bos_token_id=None)
  hf = (transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)) if kind == "qwen2" else
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))).eval()
  folder = tmp_path / "hf"
  hf.save_pretrained(folder)
  _bpe_folder(folder)
  assert main(["import_hf", f"--path={folder}", "--name=imported", f"--root={tmp_path / 'hub'}"]) == 0
  cfg, model, tokenizer, metadata = hub.load("imported", root=tmp_path / "hub")
  with torch.no_grad():
    expected = hf(torch.tensor(TOKENS)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), expected, atol=3e-6)
  assert metadata["model_type"] == kind and cfg.max_len == 64 and list(cfg.eos_ids) == [0]
  assert isinstance(tokenizer, HFTokenizer)
  assert tokenizer.encode("the cat") == HFTokenizer(str(folder)).encode("the cat")


def test_the_tokenizer_model_file_kind_is_told_apart(tmp_path):
  (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # tiktoken: `base64 rank` per line
  assert folder_tokenizer(str(tmp_path)) == ("llama3", str(tmp_path / "tokenizer.model"))
  (tmp_path / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")  # a protobuf
  assert folder_tokenizer(str(tmp_path))[0] == "spm"
  assert folder_tokenizer(str(tmp_path / "none")) is None


def test_an_unknown_architecture_names_config_json(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ConfigError, match="config.json: model_type 'gpt2'"):
    main(["import_hf", f"--path={tmp_path}", "--name=x", f"--root={tmp_path / 'hub'}"])
  assert not (tmp_path / "hub" / "x").exists()
