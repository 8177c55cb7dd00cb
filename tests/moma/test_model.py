"""The MoMa model (moma.model, moma.mod): every variant runs and trains, FLOPs per token against hand counts,
mixture-of-depths capacity and skip path against the block run by hand on the chosen tokens, replayed routing
decisions, padding that takes no expert or MoD slot, and causality under fixed routing (learned expert-choice
and MoD top-k over a row are not causal: a later token can change which earlier tokens are chosen, which is why
MoMa trains auxiliary routers)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common import sharding
from common.config import ConfigError
from common.configs.base import dense_model
from common.flops import dense_lm_flops, flops_for
from common.models.dense_lm import block_spec
from moma.configs.base import moma_model
from moma.mod import MixtureOfDepths
from moma.model import MoMaBlock, MoMaLM, build_moma_model, moma_loss_terms

V, L = 64, 8
SHAPE = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=48, vocab_size=V)


def _cfg(variant, **kw):
  return moma_model(variant, text_experts=2, image_experts=2, **SHAPE, **kw)


def _batch(seed=0, b=2):
  rng = np.random.default_rng(seed)
  inputs = jnp.asarray(rng.integers(0, V, (b, L)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(L), (b, L))
  segment_ids = jnp.ones((b, L), jnp.int32)
  modality = jnp.asarray(rng.integers(0, 2, (b, L)), jnp.int32)
  return inputs, positions, segment_ids, modality


@pytest.mark.parametrize("variant", ["dense", "moe", "moma", "moma_mod"])
def test_every_variant_gives_logits_and_finite_gradients(variant):
  model = build_moma_model(_cfg(variant), seed=0)
  batch = _batch()

  def loss(m):
    logits = m(*batch)
    nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[0][..., None], -1))
    term, sums = moma_loss_terms(m, jnp.ones(()))
    return nll + term, (logits, sums)

  (value, (logits, sums)), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
  assert logits.shape == (2, L, V) and logits.dtype == jnp.float32
  assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert ("moe/fraction_dropped" in sums) == (variant != "dense")
  assert ("mod/selected_fraction" in sums) == (variant == "moma_mod")
  if variant == "moma_mod":
    assert float(sums["mod/selected_fraction"]) == pytest.approx(math.ceil(0.25 * L) / L)


def test_flops_match_the_dense_ffn_up_to_the_router():
  dense = flops_for(_cfg("dense"), L)
  reference = dense_lm_flops(dense_model(**SHAPE), L)
  assert dense.forward == pytest.approx(reference.forward)
  d, n, e = SHAPE["d_model"], SHAPE["n_layers"], 4
  for variant in ("moe", "moma"):
    f = flops_for(_cfg(variant), L)
    assert f.mlp == pytest.approx(dense.mlp)
    assert f.router == pytest.approx(n * 2 * d * e)
    assert f.forward == pytest.approx(dense.forward + n * 2 * d * e)


def test_mod_flops_count_the_chosen_share_by_hand():
  cfg = _cfg("moma_mod")  # layer 1 routed, 2 of 8 tokens (ceil(0.25 * 8))
  d, h, kv, hd, ff = 32, 2, 1, 16, 48
  proj = 2 * d * h * hd * 2 + 2 * d * kv * hd * 2  # q, o, k, v
  layer0 = proj + 4 * h * hd * (L + 1) / 2 + 6 * d * ff + 2 * d * 4
  layer1 = 0.25 * (proj + 4 * h * hd * (2 + 1) / 2 + 6 * d * ff + 2 * d * 4) + 2 * d
  assert flops_for(cfg, L).forward == pytest.approx(layer0 + layer1 + 2 * d * V)
  assert flops_for(cfg, L).forward < flops_for(_cfg("moma"), L).forward


def test_mod_takes_the_top_share_per_row_and_skipped_tokens_keep_their_state():
  cfg = _cfg("moma")
  rngs = nnx.Rngs(params=0)
  block = MoMaBlock(block_spec(cfg), rngs=rngs, ffn=None)
  layer = MixtureOfDepths(block, cfg.d_model, 0.375, rngs=rngs)  # ceil(0.375 * 8) = 3 tokens per row
  _, positions, segment_ids, modality = _batch()
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, L, cfg.d_model)), jnp.float32)
  out, info = nnx.jit(lambda m, *a: m(*a))(layer, x, positions, segment_ids, modality)
  r = np.asarray(x, np.float64) @ np.asarray(layer.router.kernel[...], np.float64)
  for row in range(2):
    chosen = np.sort(np.argsort(-r[row], kind="stable")[:3])
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(info["mod_selected"][row])), chosen)
    skipped = np.setdiff1d(np.arange(L), chosen)
    np.testing.assert_array_equal(np.asarray(out[row, skipped]), np.asarray(x[row, skipped]))
    xs = x[row:row + 1, chosen]
    ran, _ = block(xs, positions[row:row + 1, chosen], segment_ids[row:row + 1, chosen],
                   modality[row:row + 1, chosen])
    w = 1 / (1 + np.exp(-r[row, chosen]))[None, :, None]
    np.testing.assert_allclose(np.asarray(out[row:row + 1, chosen]), np.asarray(xs + w * (ran - xs)),
                               rtol=1e-5, atol=1e-5)


_trace = nnx.jit(lambda model, *batch: model.trace_routing(*batch))
_replay = nnx.jit(lambda model, routing, *batch: model(*batch, routing=routing))


def _decisions(records):
  return [dict(mod_selected=r["mod_selected"], expert_selected=r["expert_selected"]) for r in records]


def test_trace_records_and_replayed_decisions_reproduce_the_logits():
  model = build_moma_model(_cfg("moma_mod"), seed=0)
  batch = _batch()
  logits, records = _trace(model, *batch)
  modality = np.asarray(batch[3])
  routed = records[1]
  assert routed["mod_input"].shape == (2, L, 32) and routed["mod_selected"].shape == (2, L)
  mod_sel, expert_sel = np.asarray(routed["mod_selected"]), np.asarray(routed["expert_selected"])
  assert not expert_sel[~mod_sel].any()  # skipped tokens reach no expert
  assert not np.asarray(routed["expert_input"])[~mod_sel].any()
  for layer in records:
    sel = np.asarray(layer["expert_selected"])
    assert not sel[modality == 0][:, 2:].any() and not sel[modality == 1][:, :2].any()
  assert records[0]["mod_selected"] is None
  replayed = _replay(model, _decisions(records), *batch)
  np.testing.assert_allclose(np.asarray(replayed), np.asarray(logits), rtol=1e-5, atol=1e-5)


def test_fixed_routing_is_causal():
  """With the decisions fixed (as auxiliary routers fix them), changing the last tokens never changes the
  logits of earlier positions."""
  model = build_moma_model(_cfg("moma_mod"), seed=0)
  inputs, positions, segment_ids, modality = _batch()
  _, records = _trace(model, inputs, positions, segment_ids, modality)
  routing = _decisions(records)
  before = _replay(model, routing, inputs, positions, segment_ids, modality)
  changed = inputs.at[:, L - 2:].set((inputs[:, L - 2:] + 7) % V)
  after = _replay(model, routing, changed, positions, segment_ids, modality)
  np.testing.assert_allclose(np.asarray(after[:, :L - 2]), np.asarray(before[:, :L - 2]), rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(after[:, L - 2:]), np.asarray(before[:, L - 2:]))


def test_expert_sharded_model_equals_unsharded():
  """MoMa + MoD with experts split over an `expert` axis of 8 devices (one routing group per shard, in the
  full layers and among the tokens a MoD layer keeps; a padded row and an all-padding one) gives the unsharded
  logits."""
  model = build_moma_model(_cfg("moma_mod", moma=dict(experts=(4, 4), routing_groups=8)), seed=0)
  inputs, positions, segment_ids, modality = _batch(b=8)
  batch = inputs, positions, segment_ids.at[2, 5:].set(0).at[7].set(0), modality  # with padding
  forward = nnx.jit(lambda m, *b: m(*b))
  logits = forward(model, *batch)
  nnx.pop(model, nnx.Intermediate)
  mesh = sharding.make_mesh((8,), ("expert",))
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh)))
  placed = [jax.device_put(a, sharding.batch_sharding(mesh, 2)) for a in batch]
  with jax.set_mesh(mesh):
    logits_s = forward(model, *placed)
  assert model.blocks[1].block.ffn.experts.gate_up[...].sharding.spec[0] == "expert"
  np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits), rtol=1e-5, atol=1e-5)


def _padded_batch(lengths, width, pad_seed):
  """Rows of `width` whose first lengths[r] positions are fixed real tokens (two documents in row 0) and whose
  other positions are padding (segment 0) with ids, modalities and positions drawn from `pad_seed`."""
  real = np.random.default_rng(0)
  ids, mods = real.integers(0, V, (4, 32)), real.integers(0, 2, (4, 32))
  pad = np.random.default_rng(pad_seed)
  inputs, modality = pad.integers(0, V, (len(lengths), width)), pad.integers(0, 2, (len(lengths), width))
  positions, segment_ids = pad.integers(0, width, (len(lengths), width)), np.zeros((len(lengths), width), int)
  for r, n in enumerate(lengths):
    inputs[r, :n], modality[r, :n], positions[r, :n], segment_ids[r, :n] = ids[r, :n], mods[r, :n], np.arange(n), 1
  positions[0, 10:lengths[0]] -= 10
  segment_ids[0, 10:lengths[0]] = 2
  return tuple(jnp.asarray(a, jnp.int32) for a in (inputs, positions, segment_ids, modality))


def test_padding_takes_no_expert_or_mod_slot():
  """Real tokens get the same logits whatever the padding after them (more of it, other contents, an extra
  all-padding row); no expert and no MoD layer picks a padding token; capacities count real tokens only."""
  model = build_moma_model(_cfg("moma_mod"), seed=0)  # experts 2 + 2 in both layers, MoD on layer 1
  lengths = (16, 11)
  small = _padded_batch(lengths, 16, pad_seed=1)
  large = _padded_batch(lengths + (0,), 24, pad_seed=2)
  logits_small, records_small = _trace(model, *small)
  logits_large, records_large = _trace(model, *large)
  real = np.asarray(small[2]) > 0
  np.testing.assert_allclose(np.asarray(logits_large)[:2, :16][real], np.asarray(logits_small)[real],
                             rtol=1e-5, atol=1e-5)
  for batch, records in ((small, records_small), (large, records_large)):
    pad = np.asarray(batch[2]) == 0
    for layer in records:
      assert not np.asarray(layer["expert_selected"])[pad].any()
    mod_selected = np.asarray(records[1]["mod_selected"])
    assert not mod_selected[pad].any()
    # MoD lets ceil(0.25 n) of a row's n real tokens through (none of an all-padding row).
    np.testing.assert_array_equal(mod_selected.sum(1), [math.ceil(0.25 * n) for n in lengths + (0,)][:len(pad)])
    # Layer 0's experts (no MoD): expert e of group m takes ceil(N_m / 2) of the N_m real tokens of modality m.
    modality = np.asarray(batch[3])
    n_real = [int(np.sum(~pad & (modality == m))) for m in (0, 1)]
    np.testing.assert_array_equal(np.asarray(records[0]["expert_selected"]).sum((0, 1)),
                                  [math.ceil(n_real[m] / 2) for m in (0, 0, 1, 1)])
  # The masked full-length form of MoD, fed the gathered form's decisions, agrees on the real tokens.
  replayed = np.asarray(_replay(model, _decisions(records_large), *large))[:2, :16][real]
  np.testing.assert_allclose(replayed, np.asarray(logits_small)[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key,moma,override", [
    ("model.moma.mod_layers", dict(mod_layers=(2,)), {}), ("model.moma.mod_capacity", dict(mod_capacity=0.0), {}),
    ("model.moma.experts", dict(experts=(2, 0)), {}), ("model.window", {}, dict(window=4))])
def test_bad_config_names_the_key(key, moma, override):
  cfg = _cfg("moma_mod", moma=moma, **override)
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    MoMaLM(cfg, rngs=nnx.Rngs(params=0))
