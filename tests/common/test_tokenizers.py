"""Tokenizers: byte ids by hand, a SentencePiece model trained in the test, and Llama 3's tiktoken
format on a tiny BPE file written in the test (single bytes plus a few merges)."""
from __future__ import annotations

import base64

import ml_collections
import pytest

from common import tokenizers
from common.config import ConfigError

TEXT = "Héllo, wörld!\n\tcafé ☃ 12345 — it's done.\n\n"


def test_byte_tokenizer_shifts_utf8_bytes_by_three():
  tok = tokenizers.ByteTokenizer()
  assert tok.encode("hé") == [104 + 3, 0xC3 + 3, 0xA9 + 3]
  assert tok.encode("a", eos=True) == [100, 1]
  assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id) == (259, 0, 1, None)
  assert tok.decode(tok.encode(TEXT)) == TEXT
  assert tok.decode([0, 107, 1, 2, 108, 999]) == "hi"  # specials and out-of-range ids carry no text
  with pytest.raises(ValueError, match="no beginning-of-sequence"):
    tok.encode("a", bos=True)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  prefix = tmp_path_factory.mktemp("spm") / "tiny"
  lines = ["the quick brown fox jumps over the lazy dog", "a café by the river", "12345 and 678"] * 20
  spm.SentencePieceTrainer.train(  # the id layout of common.data.train_tokenizer
      sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe", vocab_size=64,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
  return str(prefix) + ".model"


def test_sentencepiece_tokenizer_round_trips_and_reports_its_specials(spm_model):
  tok = tokenizers.load_tokenizer("spm", spm_model)
  assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id) == (64, 0, 1, None)
  assert tok.special_tokens == {"<pad>": 0, "</s>": 1, "<unk>": 2}
  text = "the lazy fox by the river"
  ids = tok.encode(text, eos=True)
  assert ids[-1] == 1 and all(3 <= i < 64 for i in ids[:-1])
  assert tok.decode(ids) == text


def test_tokenizer_for_data_follows_the_data_config(spm_model):
  cfg = ml_collections.ConfigDict({"vocab": "spm", "spm_model": spm_model})
  assert tokenizers.tokenizer_for_data(cfg).vocab_size == 64
  assert isinstance(tokenizers.tokenizer_for_data(ml_collections.ConfigDict({"vocab": "byte"})),
                    tokenizers.ByteTokenizer)
  with pytest.raises(ConfigError, match="data.spm_model='/nope.model'"):
    tokenizers.tokenizer_for_data(ml_collections.ConfigDict({"vocab": "spm", "spm_model": "/nope.model"}))


MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"34", b"\n\n", b"user", b"ass",
          b"istant", b"assistant"]


def _write_bpe(path, merges=MERGES):
  tokens = [bytes([b]) for b in range(256)] + merges
  path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
  return str(path)


@pytest.fixture
def llama3(tmp_path):
  return tokenizers.Llama3Tokenizer(_write_bpe(tmp_path / "tokenizer.model"))


def test_llama3_applies_the_merges_by_rank(llama3):
  assert llama3.encode("hello") == [259]  # he + ll -> hell, hell + o -> hello
  assert llama3.encode("hello world") == [259, 262, ord("l"), ord("d")]  # ' w' + 'or' -> ' wor'
  assert llama3.encode("hi", bos=True, eos=True) == [269, ord("h"), ord("i"), 270]


def test_llama3_pretokenisation_splits_digits_in_threes(llama3):
  # '12345' is cut into '123' and '45' before BPE, so the 3-4 merge cannot happen across the cut;
  # '345' is one piece and merges.
  assert llama3.encode("12345") == [ord(c) for c in "12345"]
  assert llama3.encode("345") == [263, ord("5")]


def test_llama31_names_its_end_of_message_token_and_stops_there(tmp_path):
  names = tokenizers.llama3_special_tokens()
  names[8] = "<|eom_id|>"  # Llama 3.1's name for the slot
  tok = tokenizers.Llama3Tokenizer(_write_bpe(tmp_path / "tokenizer.model"), special_tokens=names)
  eom = tok.special_token_id("<|eom_id|>")
  assert eom in tok.stop_ids and tok.decode([eom]) == "<|eom_id|>"


def test_llama3_round_trips_any_text(llama3):
  for text in [TEXT, "", "日本語のテキスト 🙂", "a\r\n\r\nb   c\t\td"]:
    assert llama3.decode(llama3.encode(text)) == text


def test_llama3_specials_have_their_ids_and_encode_as_single_tokens(llama3):
  base = 256 + len(MERGES)
  assert llama3.vocab_size == base + 256
  assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (base, base + 1, None)
  assert llama3.special_token_id("<|start_header_id|>") == base + 6
  assert llama3.special_token_id("<|end_header_id|>") == base + 7
  assert llama3.special_token_id("<|eot_id|>") == base + 9
  assert llama3.special_token_id("<|reserved_special_token_250|>") == base + 255
  assert llama3.stop_ids == (base + 1, base + 9, base + 8)  # <|eom_id|>'s slot: Llama 3.1 stops there too
  assert llama3.encode("<|eot_id|>", allow_special=True) == [base + 9]
  plain = llama3.encode("<|eot_id|>")  # untrusted text: the characters, not the token
  assert len(plain) > 1 and base + 9 not in plain and llama3.decode(plain) == "<|eot_id|>"
  with pytest.raises(KeyError, match="not a special token"):
    llama3.special_token_id("<|im_end|>")


def test_llama3_chat_template_is_the_llama3_format(llama3):
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "  What is 2+2?\n"},
              {"role": "assistant", "content": "4"},
              {"role": "user", "content": "And 3+3?"}]
  expected = ("<|begin_of_text|>"
              "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
  assert llama3.apply_chat_template(messages) == expected
  assert llama3.apply_chat_template(messages, add_generation_prompt=False) == expected[:-len(
      "<|start_header_id|>assistant<|end_header_id|>\n\n")]
  assert llama3.encode_chat(messages) == llama3.encode(expected, allow_special=True)


def test_llama3_chat_content_cannot_forge_special_tokens(llama3):
  ids = llama3.encode_chat([{"role": "user", "content": "hi<|eot_id|>"}], add_generation_prompt=False)
  assert ids.count(llama3.special_token_id("<|eot_id|>")) == 1  # only the real end of turn


def test_llama3_file_errors_name_the_path(tmp_path):
  with pytest.raises(ConfigError, match="missing.model': no such file"):
    tokenizers.load_tokenizer("llama3", str(tmp_path / "missing.model"))
  broken = tmp_path / "broken.model"
  broken.write_text("aGk= 0\nnot-base64!! 1\n")
  with pytest.raises(ConfigError, match="broken.model': line 2 is not a tiktoken BPE entry"):
    tokenizers.Llama3Tokenizer(str(broken))
  partial = tmp_path / "partial.model"
  partial.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(200)))
  with pytest.raises(ConfigError, match="56 single bytes are not tokens"):
    tokenizers.Llama3Tokenizer(str(partial))
  with pytest.raises(ConfigError, match="tokenizer 'gpt2' is unknown"):
    tokenizers.load_tokenizer("gpt2")
