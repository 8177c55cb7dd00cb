"""blt.robustness: the noisers are deterministic and do what they say on hand-made strings (UTF-8 stays valid);
the probes are deterministic and right (the true continuation never among the distractors); the scorer's
log-likelihoods equal log-softmax sums computed independently from each model's full logits (byte and BPE dense
LMs, BLTs with space and entropy patching); the command scores saved runs."""
import itertools
import json
import random

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from blt import robustness
from blt.data import BOS
from blt.entropy import EntropyScorer
from blt.model import BLT, blt_model
from blt.patcher import patch
from common.config import ConfigError
from common.configs.base import dense_model
from common.models.dense_lm import DenseLM
from tests.file_helpers import toy_bpe_model

DISTINCT = "".join(chr(0x4E00 + i) for i in range(4000))  # distinct characters, none ASCII
WORDS = ("the cat sat on mat banana parallel letters between tomorrow mississippi window system function return "
         "value string object number counter develop elephant reference statistics committee assessment balloon "
         "little coffee pepper bubble success address").split()


def _corpus(n_docs=4, n_words=500, seed=0):
  """Held-out-like documents: the words in random order, with punctuation and line breaks."""
  rng = random.Random(seed)
  docs = []
  for _ in range(n_docs):
    out = []
    for i in range(n_words):
      out.append(rng.choice(WORDS) + rng.choice(["", "", "", ",", ".", ":"]))
      out.append("\n" if i % 12 == 11 else " ")
    docs.append("".join(out))
  return docs


# ------------------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("noise", list(robustness.NOISES))
def test_noise_is_deterministic_and_rate_zero_is_the_identity(noise):
  fn, _ = robustness.NOISES[noise]
  text = "The Quick brown fox, jumps over 13 lazy dogs. " * 4
  assert fn(text, 0.3, 5) == fn(text, 0.3, 5) == fn(text, 0.3, [5])
  assert fn(text, 0.3, 5) != fn(text, 0.3, 6)
  assert fn(text, 0.3, 5) != text
  assert fn(text, 0.0, 5) == text
  with pytest.raises(ValueError, match="rate"):
    fn(text, 1.5, 0)


def test_swap_exchanges_disjoint_adjacent_pairs():
  assert robustness.swap_adjacent("abcdefg", 1.0, 0) == "badcfeg"
  out = robustness.swap_adjacent(DISTINCT, 0.2, 1)
  assert sorted(out) == sorted(DISTINCT)
  i, swaps = 0, 0
  while i < len(DISTINCT):  # every position holds its own character or one half of a swapped pair
    if out[i] == DISTINCT[i]:
      i += 1
    else:
      assert out[i:i + 2] == DISTINCT[i + 1] + DISTINCT[i]
      i, swaps = i + 2, swaps + 1
  # left to right, a position is drawn with p = 0.2 unless it closed a pair: swaps ~ n p / (1 + p) = 667
  assert 560 < swaps < 780


def test_delete_drops_characters_and_keeps_the_order():
  assert robustness.delete_chars("abcdef", 1.0, 0) == ""
  out = robustness.delete_chars(DISTINCT, 0.1, 2)
  kept = set(out)
  assert list(out) == [c for c in DISTINCT if c in kept]  # a subsequence
  assert 400 - 5 * 19 < len(DISTINCT) - len(out) < 400 + 5 * 19  # binomial(4000, 0.1): 400 +- 19


def test_case_flips_case_only():
  assert robustness.flip_case("Hello, World ß 1", 1.0, 0) == "hELLO, wORLD ß 1"
  text = "Mixed CASE text, ß and straße, 42 digits; Ünïcödé too. " * 10
  out = robustness.flip_case(text, 0.5, 3)
  assert len(out) == len(text) and out.lower() == text.lower() and out != text
  assert all(a == b or a.swapcase() == b for a, b in zip(text, out))
  flipped = sum(a != b for a, b in zip(text, out))
  assert 0.3 < flipped / sum(c.swapcase() != c and c != "ß" for c in text) < 0.7


def test_repeat_writes_characters_two_to_four_times():
  assert robustness.repeat_chars("", 1.0, 0) == ""
  out = robustness.repeat_chars("abc", 1.0, 0)
  assert [k for k, _ in itertools.groupby(out)] == ["a", "b", "c"]
  assert all(2 <= len(list(g)) <= 4 for _, g in itertools.groupby(out))
  out = robustness.repeat_chars(DISTINCT, 0.2, 4)
  runs = [(k, len(list(g))) for k, g in itertools.groupby(out)]
  assert [k for k, _ in runs] == list(DISTINCT)
  assert all(n in (1, 2, 3, 4) for _, n in runs)
  assert 800 - 5 * 25 < sum(n > 1 for _, n in runs) < 800 + 5 * 25  # binomial(4000, 0.2): 800 +- 25


def test_noise_keeps_utf8_valid():
  text = "naïve café — 日本語のテキスト, straße, emoji 🙂🚀 and ASCII. " * 5
  for noise, (fn, _) in robustness.NOISES.items():
    for seed in range(5):
      out = fn(text, 0.5, seed)
      assert out.encode("utf-8").decode("utf-8") == out, noise
      assert not any(0xD800 <= ord(c) <= 0xDFFF for c in out), noise
      assert set(out) <= set(text) | set(text.swapcase()), noise


def test_noised_items_only_change_contexts_deterministically():
  items = robustness.continuation_items(_corpus(), 6, 0)
  for noise in robustness.NOISES:
    a, b = robustness.noised(items, noise, 0), robustness.noised(items, noise, 0)
    assert a == b and a != items and a != robustness.noised(items, noise, 1)
    assert [x.candidates for x in a] == [x.candidates for x in items]
    assert [x.answer for x in a] == [x.answer for x in items]


# ------------------------------------------------------------------------------------------------ probes


def test_probes_are_deterministic_and_the_truth_is_never_a_distractor():
  texts = _corpus()
  probes = robustness.build_probes(texts, 12, 0)
  assert probes == robustness.build_probes(texts, 12, 0)
  again = robustness.build_probes(texts, 12, 1)
  for name, items in probes.items():
    assert len(items) == 12
    assert items != again[name], name
    for it in items:
      assert len(set(it.candidates)) == len(it.candidates), name  # the truth appears once
  for it in probes["continuation"]:
    truth = it.candidates[it.answer]
    assert any(it.context + truth in t for t in texts)
    assert len(it.context) == robustness.CONTEXT_CHARS and truth[0] == " " and not it.context[-1].isspace()
    assert all(len(c) == robustness.CONTINUATION_CHARS for c in it.candidates)


def test_character_probe_answers_are_right():
  texts = _corpus()
  probes = robustness.build_probes(texts, 30, 0)
  vocabulary = {w.strip(",.:").lower() for t in texts for w in t.split()}
  for it in probes["spelling"]:
    truth = it.candidates[it.answer]
    assert any(it.context + truth in t for t in texts)
    word = truth[1:-1]
    for c in it.candidates:
      other = c[1:-1]
      diff = [i for i in range(len(word)) if word[i] != other[i]]
      assert c == truth or (len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and
                                                other[diff[0]] == word[diff[1]]))
      assert c == truth or other.lower() not in vocabulary
  answers = []
  for it in probes["counting"]:
    query = it.context.splitlines()[-1]  # Count "x" in "word":
    letter, word = query.split('"')[1], query.split('"')[3]
    assert it.candidates[it.answer] == f" {word.count(letter)}\n"
    assert len(it.context.splitlines()) == robustness.N_SHOTS + 1
    answers.append(it.answer)
  assert np.bincount(answers).tolist() == [10, 10, 10]  # balanced: one constant answer scores chance
  for it in probes["substitution"]:
    query = it.context.splitlines()[-1]  # Replace "x" with "y" in "word":
    x, y, word = query.split('"')[1], query.split('"')[3], query.split('"')[5]
    assert it.candidates[it.answer] == f" {word.replace(x, y)}\n"
    for shot in it.context.splitlines()[:-1]:
      parts = shot.split('"')
      assert shot.endswith(": " + parts[5].replace(parts[1], parts[3]))


# ----------------------------------------------------------------------------------------------- scoring


def _log_softmax(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# inputs (BOS + context + continuation, less the last byte) of 24 and 20 bytes in rows of 24: the last two
# contexts are cut, and the scorer pads every row to its width bucket (one compiled shape a path and length)
ROW_LEN = 24
PAIRS = [("naïve café!", " — 日本"), ("a cat sat on", " the mat"), ("def f(x):\n    return", " x + 1\n"),
         ("the quick brown fox jumps over the lazy dog " * 3, " and runs")]


def _independent(logits_of, row, n_scored):
  """sum of log p(row[t+1] | row[:t+1]) over the last n_scored targets, from the full logits of one unpadded row."""
  logp = _log_softmax(logits_of(jnp.asarray([row[:-1]]))[0])
  return sum(logp[t, row[t + 1]] for t in range(len(row) - 1 - n_scored, len(row) - 1))


_dense_forward = nnx.jit(lambda model, ids: model(ids))


@pytest.fixture(scope="module")
def byte_lm():
  return DenseLM(dense_model(vocab_size=384, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64),
                 rngs=nnx.Rngs(params=0))


def test_byte_scorer_equals_log_softmax_of_the_full_logits(byte_lm):
  got = robustness.DenseScorer(byte_lm, row_len=ROW_LEN, batch_size=len(PAIRS))(
      [c for c, _ in PAIRS], [x for _, x in PAIRS])
  for (context, continuation), value in zip(PAIRS, got):
    x = [b + 3 for b in continuation.encode()]
    row = [0, *[b + 3 for b in context.encode()][-(ROW_LEN - len(x)):], *x]  # 0: the rows' BOS
    assert value == pytest.approx(_independent(lambda ids: _dense_forward(byte_lm, ids), row, len(x)), abs=1e-4)


@pytest.fixture(scope="module")
def toy_bpe():
  pytest.importorskip("sentencepiece")
  return toy_bpe_model()


def test_bpe_split_gives_a_straddling_token_to_the_continuation(toy_bpe):
  ids = lambda pieces: [toy_bpe.piece_to_id(p) for p in pieces]
  # the | ▁cat | ▁sat ...: '▁cat' covers bytes 3..7 and the context ends at byte 6
  assert robustness.bpe_split(toy_bpe, "the ca", "t sat") == (ids(["the"]), ids(["▁cat", "▁sat"]))
  assert robustness.bpe_split(toy_bpe, "the cat", " sat") == (ids(["the", "▁cat"]), ids(["▁sat"]))


def test_bpe_scorer_equals_log_softmax_of_the_full_logits(toy_bpe):
  model = DenseLM(dense_model(vocab_size=128, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64),
                  rngs=nnx.Rngs(params=1))
  pairs = [("the cat sat on the", " mat"), ("a dog", " sat on the log"), ("the", " cat and a dog")]
  got = robustness.DenseScorer(model, row_len=16, sentencepiece_processor=toy_bpe)(
      [c for c, _ in pairs], [x for _, x in pairs])
  for (context, continuation), value in zip(pairs, got):
    c = toy_bpe.encode(context)
    x = toy_bpe.encode(context + continuation)[len(c):]
    assert toy_bpe.encode(context + continuation)[:len(c)] == c  # no token straddles these
    assert value == pytest.approx(_independent(lambda ids: _dense_forward(model, ids), [0, *c, *x], len(x)),
                                  abs=1e-4)


BLT_MODEL = dict(d_local=16, n_heads_local=2, local_window=8, n_layers_encoder=1, n_layers_decoder=1,
                 n_heads_cross=2, d_global=32, n_layers_global=1, n_heads_global=2, hash_n_max=4,
                 hash_table_size=64)


@pytest.fixture(scope="module")
def tiny_blt():
  return BLT(blt_model(**BLT_MODEL), rngs=nnx.Rngs(params=0))


@pytest.fixture(scope="module")
def entropy_lm():
  return DenseLM(dense_model(vocab_size=260, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, window=6),
                 rngs=nnx.Rngs(params=2))


@pytest.mark.parametrize("method", ["space", "entropy"])
def test_blt_scorer_equals_the_full_forward_sliced(tiny_blt, entropy_lm, method):
  """Each pair alone, unpadded, through `blt.patcher.patch` and the model, against the scorer's padded batches."""
  entropy = EntropyScorer(entropy_lm)
  threshold = 0.0
  if method == "entropy":  # the median entropy of the first row: about half the bytes open a patch
    threshold = float(np.median(entropy(np.array([[BOS, *(PAIRS[0][0] + PAIRS[0][1]).encode()[:-1]]]))))
  patching = ml_collections.ConfigDict(dict(method=method, patch_size=4, threshold=threshold, max_patch_length=6))
  got = robustness.BLTScorer(tiny_blt, patching, row_len=ROW_LEN, entropy_model=entropy_lm, batch_size=8)(
      [c for c, _ in PAIRS], [x for _, x in PAIRS])

  @nnx.jit
  def forward(model, inputs, entropies):
    patches = patch(inputs, method=method, max_patches=inputs.shape[1], entropies=entropies, threshold=threshold,
                    max_patch_length=6)
    return model(inputs, patches.patch_ids, inputs.shape[1], next_patch_ids=patches.next_patch_ids), patches

  for (context, continuation), value in zip(PAIRS, got):
    x = list(continuation.encode())
    row = [BOS, *list(context.encode())[-(ROW_LEN - len(x)):], *x]
    inputs = jnp.asarray([row[:-1]])
    entropies = jnp.asarray(entropy(inputs)) if method == "entropy" else None
    _, patches = forward(tiny_blt, inputs, entropies)
    assert 2 < int(patches.num_patches[0]) < inputs.shape[1] - 2
    assert value == pytest.approx(_independent(lambda ids: forward(tiny_blt, ids, entropies)[0], row, len(x)),
                                  abs=1e-4)


# ------------------------------------------------------------------------------------------------ report


def _save_run(workdir, cfg, model):
  from common.train.checkpoint import Checkpointer
  from common.train.optim import make_optimizer
  from common.train.step import init_state
  checkpointer = Checkpointer(str(workdir / "checkpoints"), keep=1, async_save=False)
  checkpointer.save(1, init_state(nnx.split(model, nnx.Param)[1], make_optimizer(cfg.train)),
                    {"step": 1, "data_position": 8})
  checkpointer.close()
  (workdir / "config.json").write_text(cfg.to_json_best_effort())


def test_command_scores_saved_byte_and_blt_runs(tmp_path, byte_lm, tiny_blt):
  from common.configs.base import base_config
  text_dir = tmp_path / "text"
  text_dir.mkdir()
  for i, doc in enumerate(_corpus(n_docs=6, n_words=300)):
    (text_dir / f"doc{i}.txt").write_text(doc)
  runs = {}
  for name, model in (("byte", byte_lm), ("space", tiny_blt)):
    cfg = base_config()
    cfg.data.update(source="files", path=str(text_dir / "*.txt"), validation_fraction=0.5, seq_len=64)
    if name == "byte":
      cfg.model = dense_model(vocab_size=384, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
    else:
      cfg.model = blt_model(**BLT_MODEL)
      cfg.model.patching = dict(method="space", patch_size=4, max_patches=0, threshold=0.0, calibrate=False,
                                max_patch_length=6, entropy_model="", spm_model="")
    (tmp_path / name).mkdir()
    _save_run(tmp_path / name, cfg, model)
    runs[name] = str(tmp_path / name)
  # the loaded runs score as the models they were saved from
  contexts, continuations = [c for c, _ in PAIRS], [x for _, x in PAIRS]
  got = robustness.continuation_logprobs(runs["space"], contexts, continuations, batch_size=4)
  patching = ml_collections.ConfigDict(dict(method="space", patch_size=4, threshold=0.0, max_patch_length=6))
  want = robustness.BLTScorer(tiny_blt, patching, row_len=64, batch_size=4)(contexts, continuations)
  np.testing.assert_allclose(got, want, atol=1e-5)
  out = tmp_path / "out"
  argv = [f"--runs=byte={runs['byte']},space={runs['space']}", "--n=4", "--batch_size=4", f"--out={out}"]
  assert robustness.main(argv) == 0
  report = json.loads((out / "results.json").read_text())
  assert list(report["models"]) == ["byte", "space"]
  assert report["models"]["space"]["kind"] == "blt space" and report["models"]["byte"]["kind"] == "dense byte"
  for m in report["models"].values():
    assert set(m["continuation"]) == {"clean", *robustness.NOISES}
    assert all(0.0 <= m[p]["accuracy"] <= 1.0 for p in robustness.CHAR_PROBES)
  table = (out / "results.md").read_text()
  assert "| byte | dense byte |" in table and "| space | blt space |" in table
  with pytest.raises(ConfigError, match="--runs"):
    robustness.main(["--runs=byte"])


def _report(clean_bpb, noised_bpb, accuracy):
  continuation = {k: dict(accuracy=accuracy, bpb=b, n=4) for k, b in (("clean", clean_bpb), ("case", noised_bpb))}
  model = dict(continuation=continuation, mean_drop=0.0, **{p: dict(accuracy=accuracy) for p in robustness.CHAR_PROBES})
  return dict(n=4, seed=0, rates={"case": 0.5}, models={"space": model})


def test_combine_gives_the_mean_and_t_interval_over_seeds_of_paired_increases():
  combined = robustness.combine([_report(2.0, 2.3, 0.5), _report(1.0, 1.1, 0.25)])
  m = combined["models"]["space"]
  assert m["clean/bpb"][0] == pytest.approx(1.5)
  # increases 0.3 and 0.1: mean 0.2, half-width t(0.975, 1) x sd / sqrt(2) = 12.7062 x 0.1414 / 1.4142
  assert m["case/bpb_increase"][0] == pytest.approx(0.2)
  assert m["case/bpb_increase"][1] == pytest.approx(12.7062047 * 0.1, rel=1e-6)
  assert m["counting"][0] == pytest.approx(0.375)
  assert "| space | 1.500 ± 6.353 | +0.200 ± 1.271 |" in robustness.combined_markdown(combined)
  with pytest.raises(ConfigError, match="--combine"):
    robustness.combine([_report(2.0, 2.3, 0.5), dict(_report(2.0, 2.3, 0.5), n=5)])
