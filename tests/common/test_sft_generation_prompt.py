"""The SFT chat format has a matching generation prompt: for every tokenizer the training ids of a dialog
begin with the generation prompt of the dialog up to each assistant reply, and the reply's first token is the
first trained one after it (so a fine-tuned model is prompted exactly as it was trained)."""
from __future__ import annotations

import base64

import pytest

from common.data.sft import generation_prompt, tokenize_example
from common.tokenizers import ByteTokenizer, Llama3Tokenizer, SentencePieceTokenizer

DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
          {"role": "assistant", "content": "6, the river said"}]


@pytest.fixture(scope="module", params=["byte", "spm", "llama3"])
def tokenizer(request, tmp_path_factory):
  folder = tmp_path_factory.mktemp(request.param)
  if request.param == "byte":
    return ByteTokenizer()
  if request.param == "llama3":  # every byte a token, no merges
    path = folder / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return Llama3Tokenizer(str(path))
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  lines = ["the quick brown fox said 2+2 is 4", "a café by the river, be brief", "and 3+3 is 6"] * 20
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(folder / "tiny"), model_type="bpe", vocab_size=64,
      pad_id=0, eos_id=1, unk_id=2, bos_id=3, character_coverage=1.0, minloglevel=2)
  return SentencePieceTokenizer(str(folder / "tiny.model"))


def test_a_dialog_starts_with_the_generation_prompt_of_each_prefix(tokenizer):
  ids, trained = tokenize_example({"messages": DIALOG}, tokenizer)
  replies = [k for k, message in enumerate(DIALOG) if message["role"] == "assistant"]
  for k in replies:
    prompt = generation_prompt({"messages": DIALOG[:k]}, tokenizer)
    assert ids[:len(prompt)].tolist() == prompt
    assert trained[len(prompt)], "the reply starts right after the prompt"
    reply = tokenize_example({"messages": DIALOG[:k + 1]}, tokenizer)[0][len(prompt):]
    assert tokenizer.decode(reply).startswith(DIALOG[k]["content"])
  first = generation_prompt({"messages": DIALOG[:replies[0]]}, tokenizer)
  assert not trained[:len(first)].any()


def test_a_prompt_response_pair_starts_with_the_generation_prompt_of_its_prompt(tokenizer):
  example = {"prompt": "Add: 2+2\nAnswer: ", "response": "4"}
  ids, trained = tokenize_example(example, tokenizer)
  prompt = generation_prompt({"prompt": example["prompt"]}, tokenizer)
  assert ids[:len(prompt)].tolist() == prompt
  assert not trained[:len(prompt)].any() and trained[len(prompt):].all()
  assert tokenizer.decode(ids[len(prompt):]).strip().startswith("4")


def test_the_byte_generation_prompt_ends_with_the_assistant_role():
  byte = ByteTokenizer()
  prompt = generation_prompt({"messages": DIALOG[:2]}, byte)
  assert byte.decode(prompt) == "system: Be brief.user: 2+2?assistant: "
  assert prompt.count(byte.eos_id) == 2  # each turn ends with EOS, as in training
