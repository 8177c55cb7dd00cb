"""moma.aux_routers: the causal routing rules, the BCE against expert-choice decisions, training that lowers
it on the decisions of a tiny MoMa model, and causality of the routed model (a later token never changes an
earlier token's routing or logits)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moma import aux_routers
from moma.aux_routers import ExpertGroup, RoutedLayer

TEXT, IMAGE = 0, 1
TWO_GROUPS = RoutedLayer(block=1, kind="experts", groups=(ExpertGroup((TEXT,), 0, 2), ExpertGroup((IMAGE,), 2, 3)))
MOD = RoutedLayer(block=0, kind="mod")


def test_top1_picks_the_best_expert_of_the_tokens_own_group():
  routers = aux_routers.AuxRouters([TWO_GROUPS], d_model=8, hidden=16, rngs=nnx.Rngs(params=0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 8))
  modality = jnp.array([[0, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
  logits = routers.logits(0, x, modality)
  assert logits.shape == (2, 6, 5)
  chosen = aux_routers.causal_decisions(TWO_GROUPS, logits, "top1")
  np.testing.assert_array_equal(chosen.sum(-1), 1)  # exactly one expert per token
  expert = np.argmax(np.asarray(chosen), -1)
  np.testing.assert_array_equal(expert >= 2, np.asarray(modality) == IMAGE)  # never another modality's expert
  finite = np.asarray(logits)
  for b in range(2):
    for t in range(6):
      cols = slice(0, 2) if modality[b, t] == TEXT else slice(2, 5)
      assert expert[b, t] == cols.start + np.argmax(finite[b, t, cols])
      assert np.all(np.isneginf(np.delete(finite[b, t], np.arange(5)[cols])))


def test_threshold_rule_and_mod_rule_are_probability_above_one_half():
  logits = jnp.array([[[0.3, -0.1, -jnp.inf, -jnp.inf, -jnp.inf]]])
  np.testing.assert_array_equal(aux_routers.causal_decisions(TWO_GROUPS, logits, "threshold"),
                                [[[True, False, False, False, False]]])
  mod_logits = jnp.array([[[0.2], [-0.2], [0.0]]])
  np.testing.assert_array_equal(aux_routers.causal_decisions(MOD, mod_logits)[..., 0], [[True, False, False]])
  with pytest.raises(ValueError, match="rule"):
    aux_routers.causal_decisions(TWO_GROUPS, logits, "top2")


def test_bce_sums_match_a_hand_computation_over_eligible_real_tokens():
  logits = jnp.array([[[2.0, -1.0, -jnp.inf], [-jnp.inf, -jnp.inf, 0.5]]])
  targets = jnp.array([[[1, 0, 1], [0, 0, 1]]], bool)
  valid = jnp.isfinite(logits)
  sums = aux_routers.bce_sums(logits, targets, valid)
  sig = lambda z: 1 / (1 + math.exp(-z))
  expected = -math.log(sig(2.0)) - math.log(1 - sig(-1.0)) - math.log(sig(0.5))
  assert float(sums["bce"]) == pytest.approx(expected, rel=1e-6)
  assert float(sums["count"]) == 3 and float(sums["correct"]) == 3
  # Padding tokens (token_mask 0) and other groups' experts do not count.
  layer = RoutedLayer(block=0, kind="experts", groups=(ExpertGroup((TEXT,), 0, 2), ExpertGroup((IMAGE,), 2, 1)))
  routers = aux_routers.AuxRouters([layer], d_model=4, hidden=16, rngs=nnx.Rngs(params=0))
  x = jnp.ones((1, 3, 4))
  modality = jnp.array([[TEXT, IMAGE, TEXT]])
  out = aux_routers.routing_bce(routers, [x], [jnp.zeros((1, 3, 3), bool)], modality, [jnp.array([[1, 1, 0]]) > 0])
  assert float(out["count"]) == 2 + 1


# --------------------------------------------------------------------------- with a tiny MoMa + MoD model

D_MODEL, LENGTH, BATCH = 32, 16, 4


def _tiny_model(variant="moma_mod", abstract=False):
  from moma.configs.base import moma_model
  from moma.model import build_moma_model
  cfg = moma_model(variant, d_model=D_MODEL, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, vocab_size=128,
                   text_experts=2, image_experts=2)
  build = lambda: build_moma_model(cfg, seed=0)
  return nnx.eval_shape(build) if abstract else build()


@pytest.fixture(scope="module")
def model():
  return _tiny_model()


class RandomRows:
  """Rows of random ids, ids >= 64 standing for image tokens: the `train_batch` interface of the data."""

  def train_batch(self, position):
    rng = np.random.default_rng(position)
    inputs = rng.integers(3, 128, (BATCH, LENGTH)).astype(np.int32)
    modality = (inputs >= 64).astype(np.int32)
    return dict(inputs=inputs, targets=np.roll(inputs, -1, axis=1), loss_mask=np.ones((BATCH, LENGTH), np.float32),
                positions=np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH)).copy(),
                segment_ids=np.ones((BATCH, LENGTH), np.int32), modality=modality,
                target_modality=np.roll(modality, -1, axis=1))


def _as_jnp(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()}


def test_routed_layers_of_moma_with_mod_follow_the_blocks():
  layers = aux_routers.routed_layers(_tiny_model(abstract=True))
  # 2 layers, experts in both, MoD on layer 1 (decided before that layer's experts).
  assert [(l.block, l.kind) for l in layers] == [(0, "experts"), (1, "mod"), (1, "experts")]
  assert layers[0].groups == (ExpertGroup((TEXT,), 0, 2), ExpertGroup((IMAGE,), 2, 2))
  mixed = aux_routers.routed_layers(_tiny_model("moe", abstract=True))
  assert [g.size for g in mixed[0].groups] == [4] and TEXT in mixed[0].groups[0].modalities
  assert aux_routers.routed_layers(_tiny_model("dense", abstract=True)) == []


def test_training_reduces_the_bce_against_expert_choice_decisions(model, tmp_path):
  from moma import train_aux_routers
  layers = aux_routers.routed_layers(model)
  routers = aux_routers.AuxRouters(layers, D_MODEL, 32, rngs=nnx.Rngs(params=0))
  held_out = _as_jnp(RandomRows().train_batch(10_000))

  @nnx.jit
  def bce(model, routers, batch):
    inputs, decisions, masks = aux_routers.routing_targets(model, layers, batch)
    sums = aux_routers.routing_bce(routers, inputs, decisions, batch["modality"], masks)
    return sums["bce"] / sums["count"]

  before = float(bce(model, routers, held_out))
  history = train_aux_routers.train_routers(model, RandomRows(), routers, steps=40, learning_rate=1e-2,
                                            out_dir=str(tmp_path))
  after = float(bce(model, routers, held_out))
  assert after < 0.8 * before, (before, after)
  assert history[-1]["bce"] < history[0]["bce"]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["40"]


@pytest.mark.parametrize("rule", aux_routers.RULES)
def test_causal_routing_never_lets_a_later_token_change_an_earlier_one(model, rule):
  """Positions >= cut change (a padded row's padding with them): under the aux routers no logit or decision
  before cut moves; under the model's own expert choice and MoD top-k they do."""
  routers = aux_routers.AuxRouters(aux_routers.routed_layers(model), D_MODEL, 32, rngs=nnx.Rngs(params=1))
  a = RandomRows().train_batch(0)
  a["segment_ids"][3, 12:] = 0  # padding at the end of the last row
  b = {k: v.copy() for k, v in a.items()}
  cut = 9
  b["inputs"][:, cut:] = RandomRows().train_batch(1)["inputs"][:, cut:]
  b["modality"] = (b["inputs"] >= 64).astype(np.int32)
  a, b = _as_jnp(a), _as_jnp(b)
  causal = nnx.jit(aux_routers.causal_forward, static_argnames="rule")
  logits_a, decided_a, _ = causal(model, routers, a, rule=rule)
  logits_b, decided_b, _ = causal(model, routers, b, rule=rule)
  np.testing.assert_allclose(logits_a[:, :cut], logits_b[:, :cut], atol=1e-5, rtol=1e-5)
  assert not np.allclose(logits_a[:, cut:], logits_b[:, cut:])
  for da, db in zip(decided_a, decided_b):
    assert da.keys() == db.keys()
    for key in da:
      np.testing.assert_array_equal(da[key][:, :cut], db[key][:, :cut])
  # Teacher-forced expert choice and MoD top-k are not causal: the same change moves earlier logits.
  forward = nnx.jit(lambda m, batch: m(batch["inputs"], batch["positions"], batch["segment_ids"], batch["modality"]))
  tf_a, tf_b = forward(model, a), forward(model, b)
  assert not np.allclose(tf_a[:, :cut], tf_b[:, :cut], atol=1e-5)
