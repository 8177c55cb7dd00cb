"""common.generate: batched KV-cached generation against recomputing the full forward pass at every token
(prompts of different lengths in one batch; GQA and sliding-window models), sampling, stop ids and stop
strings, the eval harness adapter, and the same tokens on an 8-device mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common import sharding
from common.configs.base import dense_model
from common.eval.harness import GenerationExample, evaluate_generations
from common.generate import Sampling, generate, sample_tokens, text_generate_fn
from common.models.dense_lm import DenseLM
from common.tokenizers import Tokenizer

VOCAB = 64
PROMPT_LENGTHS = (2, 7, 5, 11)
NEW = 8  # new tokens in every test: equal shapes share the compiled generation across tests


def _model(window=0, n_kv_heads=2, seed=0):
  cfg = dense_model(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, d_ff=64,
                    window=window, tie_embeddings=False)
  return DenseLM(cfg, rngs=nnx.Rngs(params=seed))


def _prompts(seed=0, lengths=PROMPT_LENGTHS):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(0, VOCAB, n)] for n in lengths]


@nnx.jit
def _full_logits(model, tokens):
  return model(tokens)


def _greedy_by_recompute(model, prompts, new_tokens):
  """Greedy continuations computed without a cache: the whole sequence through the model for every token.
  Rows sit right-padded in one buffer; causal attention keeps the padding after a row's end invisible."""
  width = max(len(p) for p in prompts) + new_tokens
  rows = [list(p) for p in prompts]
  for _ in range(new_tokens):
    buffer = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
      buffer[i, :len(row)] = row
    logits = np.asarray(_full_logits(model, jnp.asarray(buffer)))
    for i, row in enumerate(rows):
      row.append(int(logits[i, len(row) - 1].argmax()))
  return [row[len(p):] for row, p in zip(rows, prompts)]


@pytest.mark.parametrize("window,n_kv_heads", [(0, 2), (4, 1)], ids=["gqa", "windowed"])
def test_cached_greedy_equals_full_recompute(window, n_kv_heads):
  model = _model(window, n_kv_heads)
  prompts = _prompts()
  expected = _greedy_by_recompute(model, prompts, NEW)
  assert len({tuple(e) for e in expected}) > 1  # the rows differ, so a mix-up between rows would show
  assert generate(model, prompts, max_new_tokens=NEW) == expected
  assert generate(model, prompts, max_new_tokens=NEW, loop="python") == expected


def test_sampling_depends_only_on_the_seed():
  model, prompts = _model(), _prompts()
  first = generate(model, prompts, max_new_tokens=NEW, temperature=1.0, seed=3)
  assert generate(model, prompts, max_new_tokens=NEW, temperature=1.0, seed=3) == first
  assert generate(model, prompts, max_new_tokens=NEW, temperature=1.0, seed=3, loop="python") == first
  assert generate(model, prompts, max_new_tokens=NEW, temperature=1.0, seed=4) != first


def test_top_k_one_is_greedy():
  model, prompts = _model(), _prompts()
  greedy = generate(model, prompts, max_new_tokens=NEW)
  assert generate(model, prompts, max_new_tokens=NEW, temperature=2.0, top_k=1, seed=5) == greedy


def _draws(logits, sampling, n=4000):
  keys = jax.random.split(jax.random.key(0), n)
  draw = jax.vmap(lambda k: sample_tokens(jnp.asarray([logits], jnp.float32), k, sampling)[0])
  return np.bincount(np.asarray(draw(keys)), minlength=len(logits)) / n


def test_top_p_keeps_the_smallest_nucleus_and_renormalises():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is the first two tokens, drawn 5:3
  freq = _draws(np.log(probs), Sampling(temperature=1.0, top_p=0.7))
  assert freq[2] == freq[3] == 0
  np.testing.assert_allclose(freq[:2], [0.625, 0.375], atol=0.03)
  freq = _draws(np.log(probs), Sampling(temperature=1.0, top_k=3))
  assert freq[3] == 0
  np.testing.assert_allclose(freq[:3], probs[:3] / 0.95, atol=0.03)
  freq = _draws(np.log(probs), Sampling(temperature=0.5))  # p^2, renormalised
  np.testing.assert_allclose(freq, probs ** 2 / (probs ** 2).sum(), atol=0.03)


def test_ids_past_the_tokenizer_vocabulary_are_never_drawn():
  logits = jnp.asarray([[0.0, 1.0, 3.0, 9.0]])
  assert int(sample_tokens(logits, jax.random.key(0), Sampling(vocab_size=3))[0]) == 2
  assert _draws([0.0, 1.0, 3.0, 9.0], Sampling(temperature=1.0, vocab_size=3))[3] == 0


def test_a_row_ends_before_its_first_stop_id():
  model, prompts = _model(), _prompts()
  full = generate(model, prompts, max_new_tokens=NEW)
  stop = full[0][4]
  cut = generate(model, prompts, max_new_tokens=NEW, stop_ids=(stop,))
  for row, full_row in zip(cut, full):
    expected = full_row[:full_row.index(stop)] if stop in full_row else full_row
    assert row == expected
  assert len(cut[0]) <= 4


class PairTokenizer(Tokenizer):
  """A hand-made vocabulary of two-letter tokens: id i is 'AB'[i // 32] + LETTERS[i % 32]; id 63 is EOS."""
  LETTERS = "abcdefghijklmnopqrstuvwxyz012345"

  def __init__(self):
    self.vocab_size, self.bos_id, self.eos_id, self.pad_id, self.special_tokens = VOCAB, None, VOCAB - 1, None, {}

  def _piece(self, i):
    return "AB"[i // 32] + self.LETTERS[i % 32]

  def _encode(self, text):
    pieces = {self._piece(i): i for i in range(VOCAB)}
    return [pieces[text[j:j + 2]] for j in range(0, len(text), 2)]

  def decode(self, ids):
    return "".join(self._piece(i) for i in ids)


def test_stop_strings_cut_the_ids_and_the_text():
  model, tok = _model(), PairTokenizer()
  prompts = _prompts()
  full = generate(model, prompts, max_new_tokens=NEW)
  text = tok.decode(full[1])
  stop = text[7:10]  # from the second letter of token 3 to the end of token 4
  first = text.index(stop)
  ids = generate(model, prompts, max_new_tokens=NEW, stop_strings=[stop], tokenizer=tok)
  assert ids[1] == full[1][:first // 2]  # a token that straddles the start goes with the stop string
  for row, full_row in zip(ids, full):
    if stop not in tok.decode(full_row):
      assert row == full_row
  until_eos = full[1][:full[1].index(tok.eos_id)] if tok.eos_id in full[1] else full[1]
  generate_fn = text_generate_fn(model, tok, max_new_tokens=NEW, stop_strings=[stop])
  texts = generate_fn([tok.decode(p) for p in prompts], 1)
  assert texts[1] == [tok.decode(until_eos).split(stop)[0]]


def test_harness_gets_n_samples_per_prompt():
  model, tok = _model(), PairTokenizer()
  prompts = [tok.decode(p) for p in _prompts(5, (3, 6))]
  generate_fn = text_generate_fn(model, tok, max_new_tokens=5, temperature=1.0, seed=1)
  samples = generate_fn(prompts, 3)
  assert [len(s) for s in samples] == [3, 3]
  assert len(set(samples[0])) > 1  # rows of one prompt draw independently
  records = [GenerationExample(p, (samples[i][0],)) for i, p in enumerate(prompts)]
  result = evaluate_generations(records, generate_fn, "exact_match", n=3, k=3)
  assert result["pass@3"] == 1.0  # the first sample of each prompt is its own reference


def test_mesh_gives_the_tokens_of_one_device():
  """Rows split over data x fsdp = 4 devices (3 greedy rows are padded to 4), heads over tensor = 2."""
  model, prompts = _model(), _prompts()
  mesh = sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  greedy = generate(model, prompts, max_new_tokens=NEW)
  assert generate(model, prompts[:3], max_new_tokens=NEW, mesh=mesh) == greedy[:3]
  sampled = generate(model, prompts, max_new_tokens=NEW, temperature=1.0, seed=3)
  assert generate(model, prompts, max_new_tokens=NEW, temperature=1.0, seed=3, mesh=mesh) == sampled


def test_a_row_stops_decoding_at_its_stop_string(monkeypatch):
  """Every row's text holds the stop string early: decoding ends there (counted in decode steps), not at
  max_new_tokens; the ids and text are cut as before."""
  import common.generate as gen  # pylint: disable=import-outside-toplevel
  model, tok = _model(), PairTokenizer()
  prompts = _prompts()[:1]
  full = generate(model, prompts, max_new_tokens=NEW)
  stop = tok.decode(full[0])[3:6]  # second letter of token 1 to the end of token 2: completed at step 3
  steps = []
  step = gen._python_step  # pylint: disable=protected-access
  monkeypatch.setattr(gen, "_python_step", lambda *a: steps.append(1) or step(*a))
  ids = generate(model, prompts, max_new_tokens=NEW, stop_strings=[stop], tokenizer=tok)
  assert ids == [full[0][:1]] and len(steps) == 2  # tokens 0..2: the prefill's and two decode steps
  steps.clear()
  texts = text_generate_fn(model, tok, max_new_tokens=NEW, stop_strings=[stop])([tok.decode(prompts[0])], 1)
  assert texts == [[tok.decode(full[0])[:3]]] and len(steps) == 2


def test_a_tokenizer_larger_than_the_model_is_refused():
  class Wide(PairTokenizer):
    def __init__(self):
      super().__init__()
      self.vocab_size = VOCAB + 1
  with pytest.raises(ValueError, match="65 ids but the model's vocabulary"):
    generate(_model(), _prompts(), max_new_tokens=NEW, tokenizer=Wide())
  with pytest.raises(ValueError, match="does not fit the model"):
    text_generate_fn(_model(), Wide(), max_new_tokens=NEW)


@pytest.mark.parametrize("bad", [VOCAB, -1])
def test_out_of_range_prompt_ids_are_refused(bad):
  prompts = _prompts()
  prompts[2][1] = bad
  with pytest.raises(ValueError, match=f"prompt 2 holds token id {bad}, outside the model's vocabulary"):
    generate(_model(), prompts, max_new_tokens=NEW)


def test_prompts_past_the_context_are_refused():
  cfg = dense_model(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, max_len=18)
  model = DenseLM(cfg, rngs=nnx.Rngs(params=0))
  with pytest.raises(ValueError, match="prompt 3 has 11 tokens \\+ max_new_tokens 8 = 19, more than the model's "
                                       "context of 18"):
    generate(model, _prompts(), max_new_tokens=NEW)
  assert len(generate(model, _prompts()[:3], max_new_tokens=NEW)[0]) == NEW
  del cfg["max_len"]  # a config saved before the key: unbounded
  assert len(generate(DenseLM(cfg, rngs=nnx.Rngs(params=0)), _prompts(), max_new_tokens=NEW)[3]) == NEW
