"""mot.evaluate and the arithmetic of mot.reproduce: the attribute classifier learns rendered scenes, captions
parse back into the attributes they were written from, decoding follows a model whose next token is known,
and the FLOP fraction at equal loss on synthetic curves matches the hand-computed value."""
import math

import jax
import numpy as np
import pytest
from flax import nnx

from common.data.mixed_modal import MixedVocab, scenes
from mot import evaluate, reproduce


@pytest.fixture(scope="module")
def small_classifier():
  return evaluate.train_classifier(32, steps=150, n_train=1500, n_heldout=300, channels=(8, 16, 16), hidden=64)


def test_classifier_learns_rendered_scenes(small_classifier):
  model, heldout = small_classifier
  # 150 steps of a small net: the grid position is learnt almost at once; the rest is well above chance
  # (chance: shape 1/4, colour 1/8, size 1/2, position 1/9 -- the default classifier trains 2000 steps).
  assert heldout["position"] > 0.9
  assert heldout["colour"] > 0.4 and heldout["size"] > 0.6 and heldout["shape"] > 0.3
  sample = scenes.sample_scenes(40, 3, 32)
  images = scenes.render_batch(sample, 32)
  predicted = evaluate.predict_attributes(model, images)
  assert predicted.shape == (40, 4)
  by_hand = {a: float(np.mean(predicted[:, i] == evaluate.first_shape_labels(sample)[:, i]))
             for i, a in enumerate(evaluate.ATTRIBUTES)}
  assert evaluate.classifier_accuracy(model, images, evaluate.first_shape_labels(sample)) == by_hand
  assert evaluate.image_accuracy(images, sample, model) == by_hand


def test_cached_classifier_trains_once_then_reads_the_run_back(tmp_path):
  small = dict(steps=3, n_train=64, n_heldout=32, channels=(4, 4), hidden=8, batch_size=16)
  model, accuracy = evaluate.cached_classifier(str(tmp_path), 32, **small)
  again, accuracy_again = evaluate.cached_classifier(str(tmp_path), 32, **small)
  assert accuracy_again == accuracy
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
    np.testing.assert_array_equal(a, b)


def test_parse_caption_round_trips_generated_captions():
  for scene in scenes.sample_scenes(300, 11, 32):
    first = scene.shapes[0]
    assert evaluate.parse_caption(scenes.caption(scene)) == dict(
        shape=first.shape, colour=first.colour, size=first.size, position=first.position)


def test_parse_caption_of_malformed_text():
  assert evaluate.parse_caption("") == dict(shape=None, colour=None, size=None, position=None)
  assert evaluate.parse_caption("a large red blob at the top left") == dict(
      shape=None, colour="red", size="large", position="top left")
  assert evaluate.parse_caption("a small blue circle on the l")["position"] is None
  # 'at the top' must not swallow 'at the top right'
  assert evaluate.parse_caption("a small blue circle at the top right")["position"] == "top right"
  assert evaluate.parse_caption("a small blue circle at the top")["position"] == "top"


def test_caption_accuracy_counts_each_attribute():
  sample = scenes.sample_scenes(4, 5, 32)
  texts = [scenes.caption(s) for s in sample]
  assert evaluate.caption_accuracy(texts, sample) == {a: 1.0 for a in evaluate.ATTRIBUTES}
  first = sample[0].shapes[0]
  other_colour = next(c for c in scenes.COLOUR_NAMES if c != first.colour)
  texts[0] = f"a {first.size} {other_colour} {first.shape} and more"  # wrong colour, no position
  texts[1] = "nothing"
  acc = evaluate.caption_accuracy(texts, sample)
  assert acc == dict(shape=0.75, colour=0.5, size=0.75, position=0.5)


class NextIdModel(nnx.Module):
  """Logits that make id (input + 1) mod V the most likely next token, and record the modality they saw."""

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def __call__(self, tokens, positions, segment_ids, modality):
    return 10.0 * jax.nn.one_hot((tokens + 1) % self.vocab_size, self.vocab_size) + 0.0 * modality[..., None]


def test_greedy_decoding_of_left_padded_prompts():
  vocab = MixedVocab(image_codebook=16)
  model = NextIdModel(vocab.size)
  rows = evaluate.left_padded([np.array([0, 5]), np.array([0, 3, 4, 9])], 3)
  np.testing.assert_array_equal(rows["segment_ids"][0], [0, 0, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(rows["positions"][0, 2:], np.arange(5))
  out = evaluate.sample_continuations(model, vocab, rows, 3, lo=0, hi=vocab.size)
  np.testing.assert_array_equal(out, [[6, 7, 8], [10, 11, 12]])
  # Restricted to the image codes: first the favourite id is outside, so the allowed ids tie and argmax takes
  # the first; after it, its successor is allowed.
  out = evaluate.sample_continuations(model, vocab, rows, 2, lo=vocab.image_offset, hi=vocab.size)
  np.testing.assert_array_equal(out, [[vocab.image_offset, vocab.image_offset + 1]] * 2)
  # Sampling with top_k=1 is greedy whatever the temperature.
  out = evaluate.sample_continuations(model, vocab, rows, 3, lo=0, hi=vocab.size, temperature=2.0, top_k=1, seed=3)
  np.testing.assert_array_equal(out, [[6, 7, 8], [10, 11, 12]])


def _record(model: str, seed: int, flops, losses, seconds=None) -> dict:
  seconds = seconds if seconds is not None else [f / 1e9 for f in flops]
  return dict(setting="chameleon", model=model, seed=seed,
              curves={"image": dict(flops=flops, seconds=seconds, values=losses)},
              image_accuracy={a: 0.5 for a in evaluate.ATTRIBUTES},
              caption_accuracy={a: 1.0 for a in evaluate.ATTRIBUTES})


def test_flop_fraction_on_synthetic_curves():
  flops = [1e9, 2e9, 4e9, 8e9]
  dense = _record("dense", 0, flops, [4.0, 3.0, 2.5, 2.0])
  # MoT reaches 2.0 exactly at its third point: 4e9 / 8e9 of the dense FLOPs.
  mot = _record("mot", 0, flops, [3.5, 2.5, 2.0, 1.5], seconds=[2.0, 4.0, 8.0, 16.0])
  fraction, time_fraction = reproduce.matched_fractions(dense, mot, "image")
  assert fraction == pytest.approx(0.5)
  assert time_fraction == pytest.approx(8.0 / 8.0)
  # Between eval points the crossing is interpolated in log-FLOPs: 2.0 lies halfway from 2.5 (2e9) to 1.5
  # (4e9), so at sqrt(2e9 * 4e9).
  mot = _record("mot", 0, flops, [3.0, 2.5, 1.5, 1.4])
  assert reproduce.matched_fractions(dense, mot, "image")[0] == pytest.approx(math.sqrt(8e18) / 8e9)
  never = _record("mot", 0, flops, [4.0, 3.5, 3.0, 2.5])
  assert math.isnan(reproduce.matched_fractions(dense, never, "image")[0])


def test_summary_over_seeds_and_table():
  flops = [1e9, 2e9, 4e9, 8e9]
  records = [_record("dense", 0, flops, [4.0, 3.0, 2.5, 2.0]), _record("mot", 0, flops, [3.5, 2.5, 2.0, 1.5]),
             _record("dense", 1, flops, [4.0, 3.0, 2.5, 2.0]), _record("mot", 1, flops, [3.0, 2.0, 1.8, 1.5])]
  (row,) = reproduce.summarize(records)
  # seed 0: 4e9 / 8e9 = 0.5; seed 1: reaches 2.0 at its second point, 2e9 / 8e9 = 0.25.
  assert row["reached"] == 2 and row["flops_fraction"] == pytest.approx(0.375)
  assert row["flops_fraction_ci95"] == pytest.approx(12.706205 * 0.125, rel=1e-5)  # t_{.975,1} s / sqrt(2)
  assert row["dense_loss"] == 2.0 and row["mot_loss"] == 1.5
  generation = reproduce.generation_rows(records)
  assert [(g["model"], g["seeds"]) for g in generation] == [("dense", 2), ("mot", 2)]
  table = reproduce.markdown([row], generation, {"shape": 0.99}, "header")
  assert "| chameleon | image | 2.0000 ± 0.0000 | 1.5000 ± 0.0000 | 37.5 ± 158.8% |" in table
  assert "| chameleon | mot | 0.50 / 0.50 / 0.50 / 0.50 | 1.00 / 1.00 / 1.00 / 1.00 | 2 |" in table
  records[1] = _record("mot", 0, flops, [4.0, 3.5, 3.0, 2.5])
  records[3] = _record("mot", 1, flops, [4.0, 3.5, 3.0, 2.5])
  (row,) = reproduce.summarize(records)
  assert row["reached"] == 0 and "not reached" in reproduce.markdown([row], [], {}, "")
