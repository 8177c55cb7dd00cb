"""Hugging Face tokenizer folders and chat templates, checked against the libraries themselves: a tiny
byte-level BPE trained here (offline) encodes and decodes as `tokenizers` and transformers'
PreTrainedTokenizerFast do on the same folder, and chat templates written here (a ChatML one in Qwen2's style,
one in Llama 3's) render as transformers' `apply_chat_template`. Needs the `hf` extra."""
from __future__ import annotations

import json
from typing import Mapping

import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from common.config import ConfigError
from common.tokenizers import ChatTemplateError, HFTokenizer, load_tokenizer

transformers.logging.set_verbosity_error()

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
          "Sphinx of black quartz, judge my vow.", "naïve café déjà vu 1234567890", "  spaces\tand\nnewlines  "]
TEXTS = ["The lazy fox, judged.", "déjà vu: 42 jugs\n\tindented", "unseen wörds ✓ and emoji 🙂", "",
         "literal <|im_end|> in text"]

# Written for these tests (the shape of ChatML as Qwen2 uses it, and of Llama 3's headers); a system prompt
# is the first message or, for ChatML, a default one.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are terse.<|im_end|>\n{% endif %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_STYLE = """{{ bos_token }}
{%- for message in messages %}
  {%- if loop.index0 % 2 == (1 if messages[0]['role'] == 'system' else 0) and message['role'] == 'assistant' %}
    {{- raise_exception('roles must alternate user/assistant') }}
  {%- endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'] | trim }}{{ eos_token }}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""
DIALOG = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
          {"role": "assistant", "content": " Blue. "}, {"role": "user", "content": "Grass? ✓"}]


def _train_bpe(specials: list[str]) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS * 3, trainer)
  return tok


def _folder(tmp_path, name: str, specials: list[str], config: dict, token_map: dict | None = None):
  folder = tmp_path / name
  folder.mkdir()
  _train_bpe(specials).save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", **config}))
  if token_map is not None:
    (folder / "special_tokens_map.json").write_text(json.dumps(token_map))
  return str(folder)


@pytest.fixture(scope="module")
def chatml(tmp_path_factory) -> str:
  """Qwen2's layout: no bos, eos <|im_end|>, pad <|endoftext|>, a second stop id in generation_config.json."""
  folder = _folder(tmp_path_factory.mktemp("tok"), "chatml", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                    "chat_template": CHATML})
  with open(f"{folder}/generation_config.json", "w") as f:
    json.dump({"eos_token_id": [2, 0]}, f)
  return folder


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory) -> str:
  """Specials in special_tokens_map.json (bos as a serialised AddedToken), whose eos wins over
  tokenizer_config.json's, as in transformers."""
  specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
  return _folder(tmp_path_factory.mktemp("tok"), "llama", specials,
                 {"chat_template": LLAMA3_STYLE, "eos_token": "<|end_of_text|>"},
                 {"bos_token": {"content": "<|begin_of_text|>", "special": True}, "eos_token": "<|eot_id|>"})


def test_special_ids_come_from_the_folder(chatml, llama_style):
  ours = HFTokenizer(chatml)
  assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.stop_ids) == (None, 2, 0, (2, 0))
  assert ours.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
  llama = load_tokenizer("hf", llama_style)
  assert (llama.bos_id, llama.eos_id, llama.pad_id, llama.stop_ids) == (0, 4, None, (4,))
  reference = transformers.PreTrainedTokenizerFast.from_pretrained(llama_style)
  assert (reference.bos_token_id, reference.eos_token_id, len(reference)) == (0, 4, llama.vocab_size)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_tokenizers_and_transformers(chatml, text):
  ours = HFTokenizer(chatml)
  reference = transformers.PreTrainedTokenizerFast.from_pretrained(chatml)
  ids = ours.encode(text, allow_special=True)
  assert ids == reference.encode(text, add_special_tokens=False)
  assert ids == tokenizers.Tokenizer.from_file(f"{chatml}/tokenizer.json").encode(text).ids
  assert ours.decode(ids) == reference.decode(ids) == text
  assert ours.decode(ours.encode(text)) == text
  assert max(ids, default=0) < ours.vocab_size == len(reference)


def test_special_token_text_is_plain_text_unless_allowed(chatml):
  ours = HFTokenizer(chatml)
  assert ours.encode("a<|im_end|>", allow_special=True)[-1] == ours.eos_id
  plain = ours.encode("a<|im_end|>")
  assert ours.eos_id not in plain and len(plain) > 2
  assert ours.encode("hi", eos=True)[-1] == 2
  with pytest.raises(ValueError, match="no beginning-of-sequence"):
    ours.encode("hi", bos=True)


@pytest.mark.parametrize("messages", [DIALOG, DIALOG[1:], DIALOG[:3]], ids=["system", "no_system", "ends_assistant"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", ["chatml", "llama_style"])
def test_chat_template_renders_as_transformers(request, name, messages, add_generation_prompt):
  folder = request.getfixturevalue(name)
  ours = HFTokenizer(folder)
  reference = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
  text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
  assert text == reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                               tokenize=False)
  ids = reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
  assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == list(
      ids["input_ids"] if isinstance(ids, Mapping) else ids)


def test_chat_templates_place_the_system_prompt_and_the_generation_prompt(chatml, llama_style):
  chat = HFTokenizer(chatml).apply_chat_template(DIALOG[:2])
  assert chat == ("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nSky colour?<|im_end|>\n"
                  "<|im_start|>assistant\n")
  assert HFTokenizer(chatml).apply_chat_template(DIALOG[1:2]).startswith("<|im_start|>system\nYou are terse.")
  llama = HFTokenizer(llama_style).apply_chat_template(DIALOG[:1], add_generation_prompt=False)
  assert llama == "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer in one word.<|eot_id|>"


def test_a_template_refusal_is_a_chat_template_error(chatml, llama_style):
  with pytest.raises(ChatTemplateError, match="unknown role tool"):
    HFTokenizer(chatml).apply_chat_template([{"role": "tool", "content": "x"}])
  with pytest.raises(ChatTemplateError, match="alternate"):
    HFTokenizer(llama_style).apply_chat_template([{"role": "assistant", "content": "x"}])


def test_bad_folders_name_the_file_or_key(chatml, tmp_path):
  with pytest.raises(ConfigError, match="tokenizer.json"):
    HFTokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ConfigError, match="unreadable"):
    HFTokenizer(str(tmp_path))
  folder = _folder(tmp_path, "no_eos", ["<s>"], {"bos_token": "<s>"})
  with pytest.raises(ConfigError, match="'eos_token' is missing"):
    HFTokenizer(folder)
  folder = _folder(tmp_path, "unknown", ["<s>"], {"eos_token": "</s>"})
  with pytest.raises(ConfigError, match="'eos_token' names '</s>'"):
    HFTokenizer(folder)
  folder = _folder(tmp_path, "untemplated", ["</s>"], {"eos_token": "</s>"})
  with pytest.raises(ConfigError, match="no chat template"):
    HFTokenizer(folder).apply_chat_template(DIALOG)


def test_a_folder_saved_by_transformers_reads_the_same(chatml, tmp_path):
  """transformers writes the template to chat_template.jinja and the specials its own way; nothing changes."""
  transformers.PreTrainedTokenizerFast.from_pretrained(chatml).save_pretrained(tmp_path / "saved")
  original, saved = HFTokenizer(chatml), HFTokenizer(str(tmp_path / "saved"))
  assert (saved.bos_id, saved.eos_id, saved.pad_id, saved.special_tokens, saved.vocab_size) == (
      original.bos_id, original.eos_id, original.pad_id, original.special_tokens, original.vocab_size)
  assert saved.apply_chat_template(DIALOG) == original.apply_chat_template(DIALOG)
  assert saved.encode(TEXTS[2]) == original.encode(TEXTS[2])
