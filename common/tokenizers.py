"""Tokenizers behind one interface: bytes, SentencePiece, Llama 3's tiktoken BPE, and Hugging Face
`tokenizer.json` folders. Nothing is downloaded: models are read from local paths.

- `ByteTokenizer`: UTF-8 bytes shifted by three (pad 0, eos 1, unk 2), the ids of seqio's
  ByteVocabulary that `data.vocab=byte` trains with.
- `SentencePieceTokenizer`: a `.model` file, e.g. from `python -m common.data.train_tokenizer`
  (pad 0, eos 1, unk 2, no bos: the ids `data.vocab=spm` trains with).
- `Llama3Tokenizer`: Llama 3's `tokenizer.model` (Dubey et al., 2024, "The Llama 3 Herd of Models",
  section 3.2: 128K tokens, tiktoken's 100K plus 28K for other languages), one base64 token and its
  rank per line; text is split by Llama 3's pre-tokenisation regex before BPE, 256 special tokens
  follow the ranks, and dialogs use the Llama 3 chat format.
- `HFTokenizer`: a Hugging Face tokenizer folder (`tokenizer.json` through the `tokenizers` library, the
  special tokens of `tokenizer_config.json` / `special_tokens_map.json`, stop ids of `generation_config.json`)
  whose dialogs use the folder's own Jinja chat template (`render_chat_template`), as transformers'
  `apply_chat_template` renders it.
"""
from __future__ import annotations

import abc
import base64
import binascii
import datetime
import functools
import json
import os
from typing import Any, Mapping, Sequence

from common.config import ConfigError

# Llama 3's pre-tokenisation (the regex of its reference tokenizer): contractions, letter runs with
# one leading non-letter, digit groups of at most three, punctuation runs, newlines, other whitespace.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL_TOKENS = 256
BEGIN_OF_TEXT, END_OF_TEXT = "<|begin_of_text|>", "<|end_of_text|>"
START_HEADER, END_HEADER, END_OF_TURN = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
# Llama 3.1 names the slot Llama 3 reserved as <|reserved_special_token_4|> (id 128008) <|eom_id|>: the end of
# a message after which a tool runs; generation stops there as at <|eot_id|>.
END_OF_MESSAGE, END_OF_MESSAGE_SLOT = "<|eom_id|>", 8


def llama3_special_tokens() -> list[str]:
  """Llama 3's 256 special tokens in id order (ids follow the BPE ranks: 128000 ... 128255)."""
  named = [BEGIN_OF_TEXT, END_OF_TEXT] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
  named += [START_HEADER, END_HEADER, "<|reserved_special_token_4|>", END_OF_TURN]
  reserved = [f"<|reserved_special_token_{i}|>"
              for i in range(5, LLAMA3_NUM_SPECIAL_TOKENS - len(named) + 5)]
  return named + reserved


class Tokenizer(abc.ABC):
  """Text <-> ids. `bos_id`/`pad_id` are None where the vocabulary has none; `stop_ids` end a
  generation; `special_tokens` maps each special token's text to its id."""
  vocab_size: int
  bos_id: int | None
  eos_id: int
  pad_id: int | None
  special_tokens: Mapping[str, int]

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return (self.eos_id,)

  @abc.abstractmethod
  def _encode(self, text: str) -> list[int]:
    """The ids of `text`, special-token text encoded as ordinary text."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; ids without text of their own (pad, eos, control pieces) are dropped."""

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    if bos and self.bos_id is None:
      raise ValueError(f"{type(self).__name__} has no beginning-of-sequence token")
    return ([self.bos_id] if bos else []) + self._encode(text) + ([self.eos_id] if eos else [])

  def special_token_id(self, token: str) -> int:
    if token not in self.special_tokens:
      known = ", ".join(list(self.special_tokens)[:12])
      raise KeyError(f"{token!r} is not a special token of {type(self).__name__} (e.g. {known})")
    return self.special_tokens[token]


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
  """Refuses a tokenizer with ids past the model's vocabulary: their embeddings do not exist, and an
  out-of-range lookup gives zeros or NaN instead of an error."""
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"{type(tokenizer).__name__} has {tokenizer.vocab_size} ids but the model's vocabulary "
                     f"(model.vocab_size) has {vocab_size}: the tokenizer does not fit the model")


def model_special_ids(tokenizer: Tokenizer) -> dict:
  """The special-id keys of a `model.*` section (`bos_id`, `eos_ids`, `pad_id`; -1 / [] for none) for a
  model that reads `tokenizer`'s ids: its stop ids are the eos ids, so a generation ends where the
  tokenizer's text ends (a chat turn included)."""
  optional = lambda token_id: -1 if token_id is None else int(token_id)
  return dict(bos_id=optional(tokenizer.bos_id), eos_ids=[int(i) for i in tokenizer.stop_ids],
              pad_id=optional(tokenizer.pad_id))


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 3..258 after pad 0, eos 1, unk 2; invalid UTF-8 is dropped when decoding."""
  NUM_SPECIAL = 3

  def __init__(self):
    self.vocab_size, self.bos_id, self.eos_id, self.pad_id = 256 + self.NUM_SPECIAL, None, 1, 0
    self.special_tokens = {"<pad>": 0, "</s>": 1, "<unk>": 2}

  def _encode(self, text: str) -> list[int]:
    return [byte + self.NUM_SPECIAL for byte in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(int(i) - self.NUM_SPECIAL for i in ids if self.NUM_SPECIAL <= int(i) < self.vocab_size)
    return data.decode("utf-8", errors="ignore")


def _existing(path: str, what: str) -> str:
  path = os.path.expanduser(path or "")
  if not path or not os.path.isfile(path):
    raise ConfigError(f"{what} '{path}': no such file")
  return path


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model file; its control pieces (pad, bos, eos) and unk are the specials."""

  def __init__(self, model_path: str):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    path = _existing(model_path, "SentencePiece model")
    self._model = sentencepiece.SentencePieceProcessor()
    try:
      self._model.Load(path)
    except (OSError, RuntimeError) as e:
      raise ConfigError(f"SentencePiece model '{path}': unreadable ({str(e).splitlines()[0]})") from None
    optional = lambda i: i if i >= 0 else None  # sentencepiece says -1 for "none"
    self.vocab_size = self._model.GetPieceSize()
    self.bos_id, self.pad_id = optional(self._model.bos_id()), optional(self._model.pad_id())
    self.eos_id = self._model.eos_id()
    if self.eos_id < 0:
      raise ConfigError(f"SentencePiece model '{path}': has no end-of-sequence piece")
    self.special_tokens = {self._model.IdToPiece(i): i for i in range(self.vocab_size)
                           if self._model.IsControl(i) or self._model.IsUnknown(i)}

  def _encode(self, text: str) -> list[int]:
    return list(self._model.EncodeAsIds(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self._model.DecodeIds([int(i) for i in ids])


def _read_bpe_ranks(path: str) -> dict[bytes, int]:
  """tiktoken's BPE file: one `base64(token) rank` per line, ranks 0..N-1, every single byte a token."""
  ranks: dict[bytes, int] = {}
  with open(path, "rb") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      parts = line.split()
      try:
        if len(parts) != 2:
          raise ValueError("expected '<base64 token> <rank>'")
        ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
      except (ValueError, binascii.Error) as e:
        raise ConfigError(f"Llama 3 tokenizer '{path}': line {line_no} is not a tiktoken BPE entry "
                          f"({e})") from None
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise ConfigError(f"Llama 3 tokenizer '{path}': ranks must be 0..{len(ranks) - 1}, each once")
  missing = [b for b in range(256) if bytes([b]) not in ranks]
  if missing:
    raise ConfigError(f"Llama 3 tokenizer '{path}': {len(missing)} single bytes are not tokens "
                      f"(e.g. {missing[0]}), so not every text could be encoded")
  return ranks


class Llama3Tokenizer(Tokenizer):
  """Llama 3's BPE from a local `tokenizer.model` (tiktoken format); specials follow the BPE ranks.

  `special_tokens` replaces the 256 Llama 3 names (later Llama versions rename reserved slots); it
  must keep <|begin_of_text|>, <|end_of_text|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|>.
  """

  def __init__(self, model_path: str, special_tokens: Sequence[str] | None = None):
    import tiktoken  # pylint: disable=g-import-not-at-top
    path = _existing(model_path, "Llama 3 tokenizer")
    ranks = _read_bpe_ranks(path)
    names = list(special_tokens) if special_tokens is not None else llama3_special_tokens()
    needed = [token for token in (BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, END_OF_TURN)
              if token not in names]
    if needed or len(set(names)) != len(names):
      raise ValueError(f"special_tokens: need distinct names including {needed or 'each of them'}")
    self.special_tokens = {name: len(ranks) + i for i, name in enumerate(names)}
    self._encoding = tiktoken.Encoding(name=f"llama3:{os.path.basename(path)}", pat_str=LLAMA3_PATTERN,
                                       mergeable_ranks=ranks, special_tokens=self.special_tokens)
    self.vocab_size = len(ranks) + len(names)
    self.bos_id, self.eos_id = self.special_tokens[BEGIN_OF_TEXT], self.special_tokens[END_OF_TEXT]
    self.pad_id = None  # Llama 3 has no padding token
    # <|eom_id|> where named, else its slot (never generated by a Llama 3.0 model, which does not train it).
    self._eom_id = self.special_tokens.get(END_OF_MESSAGE, len(ranks) + END_OF_MESSAGE_SLOT)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """A base model ends with <|end_of_text|>, a chat turn with <|eot_id|>, a Llama 3.1 tool call with
    <|eom_id|>."""
    eom = (self._eom_id,) if self._eom_id < self.vocab_size else ()
    return (self.eos_id, self.special_tokens[END_OF_TURN]) + eom

  def _encode(self, text: str) -> list[int]:
    return self._encoding.encode(text, allowed_special=set(), disallowed_special=())

  def encode(self, text: str, *, bos: bool = False, eos: bool = False,
             allow_special: bool = False) -> list[int]:
    """`allow_special`: special-token text in `text` becomes its single id (only for trusted text,
    such as a rendered chat template); otherwise it is encoded as the characters it is made of."""
    if not allow_special:
      return super().encode(text, bos=bos, eos=eos)
    ids = self._encoding.encode(text, allowed_special="all")
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def decode(self, ids: Sequence[int]) -> str:
    """Special tokens decode to their text, as in a rendered chat."""
    return self._encoding.decode([int(i) for i in ids])

  def encode_chat(self, messages: Sequence[Mapping[str, str]], *,
                  add_generation_prompt: bool = True) -> list[int]:
    """Ids of a dialog in the Llama 3 chat format: <|begin_of_text|>, then per message
    <|start_header_id|>role<|end_header_id|>\\n\\n content (stripped) <|eot_id|>; with
    `add_generation_prompt`, an open assistant header. Contents are encoded as plain text, so a
    message cannot forge a special token."""
    special = self.special_tokens
    ids = [self.bos_id]
    for index, message in enumerate(messages):
      if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
        raise ValueError(f"messages[{index}]: need string 'role' and 'content', got {sorted(message)}")
      ids += self._header(message["role"]) + self._encode(message["content"].strip())
      ids.append(special[END_OF_TURN])
    if add_generation_prompt:
      ids += self._header("assistant")
    return ids

  def _header(self, role: str) -> list[int]:
    return ([self.special_tokens[START_HEADER]] + self._encode(role) + [self.special_tokens[END_HEADER]]
            + self._encode("\n\n"))

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *,
                          add_generation_prompt: bool = True) -> str:
    """The Llama 3 chat prompt as text (what `encode_chat` encodes)."""
    return self.decode(self.encode_chat(messages, add_generation_prompt=add_generation_prompt))


class ChatTemplateError(ValueError):
  """A chat template refused its messages (its `raise_exception(...)`), or could not be compiled."""


def _raise_exception(message: str):
  raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False,
            ensure_ascii: bool = False) -> str:
  """Jinja's `tojson` as chat templates expect it: plain JSON, non-ASCII kept (Jinja's own escapes HTML)."""
  return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _strftime_now(format_string: str) -> str:
  return datetime.datetime.now().strftime(format_string)


@functools.lru_cache(maxsize=16)
def _compiled_template(template: str):
  """The Jinja environment chat templates are written for: sandboxed and immutable (a template is data from
  a checkpoint folder), blocks trimmed as in transformers, `{% break %}`/`{% continue %}`, the helpers
  `raise_exception` and `strftime_now` and a `tojson` filter that keeps non-ASCII text."""
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top
  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
  try:
    return env.from_string(template)
  except jinja2.TemplateSyntaxError as e:
    raise ChatTemplateError(f"chat template line {e.lineno}: {e.message}") from None


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool,
                         special_tokens: Mapping[str, str | None], **variables) -> str:
  """`template` (Jinja) rendered for `messages` (dicts with 'role' and 'content'; a system prompt is a
  message with role 'system'), with `add_generation_prompt`, the special token strings (`bos_token`,
  `eos_token`, ... ) and any further template `variables`."""
  for index, message in enumerate(messages):
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
      raise ValueError(f"messages[{index}]: need a dict with a string 'role', got {message!r}")
  context = {**special_tokens, **variables}
  return _compiled_template(template).render(messages=[dict(m) for m in messages],
                                             add_generation_prompt=add_generation_prompt, **context)


HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
HF_SPECIAL_TOKENS_MAP, HF_CHAT_TEMPLATE_FILE = "special_tokens_map.json", "chat_template.jinja"
HF_GENERATION_CONFIG = "generation_config.json"
_HF_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _json_file(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except ValueError as e:
      raise ConfigError(f"'{path}': not JSON ({e})") from None
  if not isinstance(data, dict):
    raise ConfigError(f"'{path}': expected a JSON object")
  return data


def _token_text(value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string, or a serialised AddedToken dict."""
  return value.get("content") if isinstance(value, dict) else value


class HFTokenizer(Tokenizer):
  """A Hugging Face tokenizer folder: `tokenizer.json` (any model the `tokenizers` library runs: byte-level
  BPE, WordPiece, Unigram), with bos/eos/pad/unk named in `special_tokens_map.json` or, where that is silent
  or absent, `tokenizer_config.json` (transformers' precedence), `special_tokens` its added tokens marked
  special, and `stop_ids` the eos plus the eos ids of a `generation_config.json` in the folder (Qwen2.5
  Instruct stops on <|im_end|> and <|endoftext|>). The chat template is `chat_template.jinja` or
  tokenizer_config.json's `chat_template`. Ids match transformers' tokenizer of the same folder with
  `add_special_tokens=False`: bos is added only by `encode(bos=True)` or by the chat template itself."""

  def __init__(self, folder: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    folder = os.path.expanduser(folder or "")
    path = _existing(os.path.join(folder, HF_TOKENIZER_FILE), "Hugging Face tokenizer")
    try:
      self._model = tokenizers.Tokenizer.from_file(path)  # special-token text becomes its id
      self._plain = tokenizers.Tokenizer.from_file(path)  # special-token text is ordinary text
    except Exception as e:  # pylint: disable=broad-except  (tokenizers raises a bare Exception)
      raise ConfigError(f"Hugging Face tokenizer '{path}': unreadable ({str(e).splitlines()[0]})") from None
    self._plain.encode_special_tokens = True
    self.folder = folder
    config_path = os.path.join(folder, HF_TOKENIZER_CONFIG)
    config = _json_file(config_path)
    token_map = _json_file(os.path.join(folder, HF_SPECIAL_TOKENS_MAP))
    self.special_token_text = {key: _token_text(token_map[key] if key in token_map else config.get(key))
                               for key in _HF_SPECIAL_KEYS}
    ids = {key: self._id_of(text, key) for key, text in self.special_token_text.items()}
    if ids["eos_token"] is None:
      raise ConfigError(f"'{config_path}': key 'eos_token' is missing (nor in {HF_SPECIAL_TOKENS_MAP}); a "
                        "tokenizer needs an end-of-sequence token")
    self.bos_id, self.eos_id, self.pad_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]
    vocab = self._model.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1
    self.special_tokens = {token.content: i for i, token in self._model.get_added_tokens_decoder().items()
                           if token.special}
    generation = _json_file(os.path.join(folder, HF_GENERATION_CONFIG)).get("eos_token_id")
    extra_stops = generation if isinstance(generation, list) else [] if generation is None else [generation]
    self._stop_ids = tuple(dict.fromkeys([self.eos_id, *(int(i) for i in extra_stops)]))
    self.chat_template = self._chat_template(config, config_path)

  def _id_of(self, text: str | None, key: str) -> int | None:
    if text is None:
      return None
    token_id = self._model.token_to_id(text)
    if token_id is None:
      raise ConfigError(f"'{os.path.join(self.folder, HF_TOKENIZER_CONFIG)}': key '{key}' names {text!r}, "
                        f"which is not a token of {HF_TOKENIZER_FILE}")
    return token_id

  def _chat_template(self, config: dict, config_path: str) -> str | None:
    template_path = os.path.join(self.folder, HF_CHAT_TEMPLATE_FILE)
    if os.path.isfile(template_path):
      with open(template_path, encoding="utf-8") as f:
        return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
      named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
      template = named.get("default")
    if template is not None and not isinstance(template, str):
      raise ConfigError(f"'{config_path}': key 'chat_template' must be a string or a list of named templates")
    return template

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return self._stop_ids

  def _encode(self, text: str) -> list[int]:
    return list(self._plain.encode(text, add_special_tokens=False).ids)

  def encode(self, text: str, *, bos: bool = False, eos: bool = False,
             allow_special: bool = False) -> list[int]:
    """`allow_special`: special-token text in `text` becomes its single id (only for trusted text,
    such as a rendered chat template); otherwise it is encoded as the characters it is made of."""
    if not allow_special:
      return super().encode(text, bos=bos, eos=eos)
    if bos and self.bos_id is None:
      raise ValueError(f"{type(self).__name__} has no beginning-of-sequence token")
    ids = list(self._model.encode(text, add_special_tokens=False).ids)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def decode(self, ids: Sequence[int]) -> str:
    """Special tokens decode to their text, as in a rendered chat."""
    return self._model.decode([int(i) for i in ids], skip_special_tokens=False)

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                          add_generation_prompt: bool = True) -> str:
    """The folder's chat template rendered for `messages` (system prompts included, as the template
    places them); with `add_generation_prompt`, up to the opening of the assistant's turn."""
    if self.chat_template is None:
      raise ConfigError(f"'{self.folder}': no chat template ({HF_CHAT_TEMPLATE_FILE} or the 'chat_template' key "
                        f"of {HF_TOKENIZER_CONFIG})")
    return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                special_tokens=self.special_token_text)

  def encode_chat(self, messages: Sequence[Mapping[str, Any]], *,
                  add_generation_prompt: bool = True) -> list[int]:
    """Ids of the rendered chat; the template's special-token text becomes special ids. Unlike
    `Llama3Tokenizer.encode_chat`, message contents are inside the rendered text, so special-token text in
    a message becomes a special id too (as in transformers): render only trusted messages."""
    return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt),
                       allow_special=True)


TOKENIZERS = ("byte", "spm", "llama3", "hf")


def load_tokenizer(kind: str, path: str = "") -> Tokenizer:
  """`kind` is 'byte' (no file), 'spm' (a SentencePiece .model), 'llama3' (a tiktoken tokenizer.model) or
  'hf' (a Hugging Face folder with tokenizer.json)."""
  if kind == "byte":
    return ByteTokenizer()
  if kind == "spm":
    return SentencePieceTokenizer(path)
  if kind == "llama3":
    return Llama3Tokenizer(path)
  if kind == "hf":
    return HFTokenizer(path)
  raise ConfigError(f"tokenizer '{kind}' is unknown (expected one of {TOKENIZERS})")


def tokenizer_for_data(data_cfg) -> Tokenizer:
  """The tokenizer with the ids a model trained on `data.*` saw (`data.vocab`, `data.spm_model`)."""
  if data_cfg.vocab == "byte":
    return ByteTokenizer()
  if data_cfg.vocab == "spm":
    path = os.path.expanduser(data_cfg.spm_model or "")
    if not os.path.isfile(path):
      raise ConfigError(f"data.spm_model='{data_cfg.spm_model}': no such file")
    return SentencePieceTokenizer(path)
  raise ConfigError(f"data.vocab='{data_cfg.vocab}' is unknown (expected 'byte' or 'spm')")
