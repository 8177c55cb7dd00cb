"""Modality-grouped expert choice (common.nn.moe.modality_groups) against slow numpy loops written here: which
expert takes which token, exact capacities, modality isolation, the layer output; the grouped-matmul kernel
against its reference forward and backward; experts split over an `expert` mesh axis against the unsharded
layer."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common import sharding
from common.nn.moe import pop_moe_aux
from common.nn.moe.modality_groups import GroupSettings, ModalityExperts, expert_choice_in_groups, selection_rows
from tests.mesh_invariance import assert_sharded_layer_matches

D, FF = 8, 16


def _swiglu_np(x, gate_up, down):
  h = x @ gate_up.reshape(gate_up.shape[0], -1)
  h = h.reshape(x.shape[0], 2, -1)
  g = h[:, 0]
  return ((g / (1 + np.exp(-g))) * h[:, 1]) @ down


def _reference_selection(logits, modality, experts_per_group, capacity_factor):
  """Per expert, the tokens of its group sorted by descending score (lower index first on ties), the first
  min(N_m, ceil(cf * N_m / E_m)) of them; a single group takes every token, a modality without a group none."""
  s, e = logits.shape
  expert_group = [g for g, n in enumerate(experts_per_group) for _ in range(n)]
  groups = [0 if len(experts_per_group) == 1 else int(m) for m in modality]
  selected = np.zeros((s, e), bool)
  for ex in range(e):
    g = expert_group[ex]
    tokens = [t for t in range(s) if groups[t] == g]
    cap = min(len(tokens), math.ceil(capacity_factor * len(tokens) / experts_per_group[g]))
    for t in sorted(tokens, key=lambda t: (-logits[t, ex], t))[:cap]:
      selected[t, ex] = True
  return selected


_apply = nnx.jit(lambda layer, x, modality, rng=None, selected=None: layer.apply(x, modality, rng, selected))


def _layer(experts, **kw):
  return ModalityExperts(D, FF, GroupSettings(experts, **kw), rngs=nnx.Rngs(params=0))


def _inputs(b, l, n_modalities, seed=1):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(b, l, D)), jnp.float32)
  return x, jnp.asarray(rng.integers(0, n_modalities, size=(b, l)), jnp.int32)


@pytest.mark.parametrize("experts,capacity_factor", [((4, 4), 1.0), ((3, 1), 1.0), ((6,), 1.0), ((2, 2, 1), 1.0),
                                                     ((2, 3), 2.0), ((3, 2), 0.5), ((2, 2), 7.0)],
                         ids=["4t4i", "one_image_expert", "mixed_modal", "with_audio", "cf2", "cf_half", "cf_all"])
def test_expert_choice_matches_slow_reference(experts, capacity_factor):
  settings = GroupSettings(experts, capacity_factor=capacity_factor)
  rng = np.random.default_rng(0)
  for seed in range(3):
    s = 13 + seed
    logits = np.round(rng.normal(size=(s, sum(experts))), 1).astype(np.float32)  # rounding makes ties
    modality = rng.integers(0, 3, size=s)
    got = expert_choice_in_groups(jnp.asarray(logits), settings.token_group(jnp.asarray(modality)), settings)
    want = _reference_selection(logits, modality if len(experts) > 1 else modality * 0,
                                experts, capacity_factor)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_capacity_is_exact_and_fits_the_row_budget():
  settings = GroupSettings((4, 4))
  modality = jnp.asarray([0] * 11 + [1] * 3)  # N_text 11, N_image 3: caps ceil(11/4) = 3 and ceil(3/4) = 1
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(14, 8)), jnp.float32)
  selected = np.asarray(expert_choice_in_groups(logits, settings.token_group(modality), settings))
  np.testing.assert_array_equal(selected.sum(0), [3, 3, 3, 3, 1, 1, 1, 1])
  assert selected.sum() <= settings.rows_per_group(14) == 14 + 8
  token, expert, sizes = selection_rows(jnp.asarray(selected), settings.rows_per_group(14))
  n = int(selected.sum())
  np.testing.assert_array_equal(np.asarray(sizes), selected.sum(0))
  assert np.all(np.diff(np.asarray(expert)[:n]) >= 0) and np.all(np.asarray(expert)[n:] == 8)
  assert all(selected[t, e] for t, e in zip(np.asarray(token)[:n], np.asarray(expert)[:n]))


def test_modality_isolation_text_never_reaches_an_image_expert():
  layer = _layer((2, 2))
  x, modality = _inputs(4, 6, 3)
  _, _, selected = _apply(layer, x, modality)
  selected, modality = np.asarray(selected), np.asarray(modality)
  assert not selected[modality == 0][:, 2:].any()  # text -> image experts
  assert not selected[modality == 1][:, :2].any()  # image -> text experts
  assert not selected[modality == 2].any()         # audio has no group in a text+image model
  assert selected[modality == 0][:, :2].any() and selected[modality == 1][:, 2:].any()


@pytest.mark.parametrize("experts,routing_groups", [((2, 3), 1), ((1, 2), 2), ((4,), 2)])
def test_layer_output_matches_loop_reference(experts, routing_groups):
  layer = _layer(experts, routing_groups=routing_groups)
  x, modality = _inputs(2, 8, len(experts))
  y, aux, selected = _apply(layer, x, modality)
  p = {k: np.asarray(v, np.float64) for k, v in layer.params().items()}
  tokens, sel = np.asarray(x, np.float64).reshape(-1, D), np.asarray(selected).reshape(-1, sum(experts))
  mods = np.asarray(modality).reshape(-1)
  per_group = tokens.shape[0] // routing_groups
  want = np.zeros_like(tokens)
  for g in range(routing_groups):
    rows = slice(g * per_group, (g + 1) * per_group)
    logits = tokens[rows] @ p["router"]
    ref = _reference_selection(logits, mods[rows] if len(experts) > 1 else mods[rows] * 0, experts, 1.0)
    np.testing.assert_array_equal(sel[rows], ref)
    for t in range(per_group):
      for e in np.flatnonzero(ref[t]):
        gate = 1 / (1 + np.exp(-logits[t, e]))
        want[g * per_group + t] += gate * _swiglu_np(tokens[rows][t:t + 1], p["gate_up"][e], p["down"][e])[0]
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=1e-4, atol=1e-5)
  taken = sel.any(-1)
  assert float(aux["fraction_dropped"]) == pytest.approx(
      np.mean([1 - taken[g * per_group:(g + 1) * per_group].mean() for g in range(routing_groups)]), abs=1e-6)
  np.testing.assert_allclose(float(jnp.sum(aux["expert_load"])), 1.0, rtol=1e-6)


def test_supplied_selection_is_run_as_given_within_each_group():
  layer = _layer((2, 2))
  x, modality = _inputs(1, 6, 2)
  chosen = np.zeros((1, 6, 4), bool)
  chosen[0, :, :] = True  # every expert for every token: cross-modal entries must be ignored
  y, _, selected = _apply(layer, x, modality, selected=jnp.asarray(chosen))
  mods = np.asarray(modality)[0]
  np.testing.assert_array_equal(np.asarray(selected)[0], np.stack([mods == 0] * 2 + [mods == 1] * 2, axis=1))
  p = {k: np.asarray(v, np.float64) for k, v in layer.params().items()}
  tokens = np.asarray(x, np.float64)[0]
  logits = tokens @ p["router"]
  for t in range(6):
    experts = (0, 1) if mods[t] == 0 else (2, 3)
    want = sum(1 / (1 + np.exp(-logits[t, e])) * _swiglu_np(tokens[t:t + 1], p["gate_up"][e], p["down"][e])[0]
               for e in experts)
    np.testing.assert_allclose(np.asarray(y)[0, t], want, rtol=1e-4, atol=1e-5)


def test_negative_modality_is_invisible_to_the_routing_and_its_statistics():
  """Tokens of modality -1 (padding) among real ones: the real tokens' outputs, selections and every statistic
  equal those of the real tokens routed alone; the padded ones get no expert and a zero output."""
  layer = _layer((2, 2), routing_groups=2)
  x, modality = _inputs(2, 10, 2)
  pad = np.zeros((2, 10), bool)
  pad[0, 7:], pad[1, ::3] = True, True
  y, aux, selected = _apply(layer, x, jnp.where(jnp.asarray(pad), -1, modality))
  assert not np.asarray(selected)[pad].any() and not np.asarray(y)[pad].any()
  alone = _layer((2, 2))  # the same parameters, one routing group
  outs = [_apply(alone, x[r:r + 1, ~pad[r]], modality[r:r + 1, ~pad[r]]) for r in range(2)]
  for r, (y_r, _, sel_r) in enumerate(outs):
    np.testing.assert_array_equal(np.asarray(selected)[r, ~pad[r]], np.asarray(sel_r)[0])
    np.testing.assert_allclose(np.asarray(y)[r, ~pad[r]], np.asarray(y_r)[0], rtol=1e-6, atol=1e-6)
  n_real = (~pad).sum(1)
  for key in ("z_loss", "router_entropy", "fraction_dropped", "expert_load"):  # groups weighed by real tokens
    want = sum(n * np.asarray(o[1][key]) for n, o in zip(n_real, outs)) / n_real.sum()
    np.testing.assert_allclose(np.asarray(aux[key]), want, rtol=1e-5, atol=1e-7, err_msg=key)


def test_routing_groups_zero_routes_each_sequence_alone():
  """routing_groups=0 = one routing group per row: equal to routing_groups=B, and a row's routing does not
  depend on the other rows (with one group for the batch it does)."""
  x, modality = _inputs(4, 6, 2)
  per_row = _apply(_layer((2, 2), routing_groups=0), x, modality)
  np.testing.assert_array_equal(np.asarray(per_row[2]), np.asarray(_apply(_layer((2, 2), routing_groups=4), x,
                                                                          modality)[2]))
  other = x.at[1:].set(-x[1:])
  np.testing.assert_array_equal(np.asarray(_apply(_layer((2, 2), routing_groups=0), other, modality)[0][0]),
                                np.asarray(per_row[0][0]))
  batch_wide = [_apply(_layer((2, 2)), a, modality)[0][0] for a in (x, other)]
  assert not np.allclose(np.asarray(batch_wide[0]), np.asarray(batch_wide[1]))


def test_router_noise_only_with_a_key_and_fixed_by_it():
  layer = _layer((3, 3), router_noise=2.0)
  x, modality = _inputs(2, 8, 2)
  clean = _apply(layer, x, modality)[2]
  np.testing.assert_array_equal(np.asarray(_apply(layer, x, modality, None)[2]), np.asarray(clean))
  a = _apply(layer, x, modality, jax.random.key(3))[2]
  b = _apply(layer, x, modality, jax.random.key(3))[2]
  c = _apply(layer, x, modality, jax.random.key(4))[2]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (np.asarray(a) != np.asarray(clean)).any() or (np.asarray(c) != np.asarray(clean)).any()


def _loss(layer, x, modality):
  y, aux, _ = layer.apply(x, modality)
  return jnp.sum(y * jnp.cos(x)) + aux["z_loss"], (y, aux)


_value_and_grad = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))


def test_kernel_matches_reference_forward_and_backward():
  """The Pallas kernel (interpret mode) and the XLA:CPU tiles against ragged_dot, values and gradients."""
  x, modality = _inputs(2, 8, 2)
  results = {}
  for impl in ("reference", "interpret", "xla_tiles"):
    layer = _layer((2, 2), grouped_impl=impl)
    (loss, (y, _)), grads = _value_and_grad(layer, x, modality)
    results[impl] = (y, grads)
  y_ref, g_ref = results["reference"]
  for impl in ("interpret", "xla_tiles"):
    y, g = results[impl]
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  leaves = jax.tree.leaves(g_ref)
  assert all(np.isfinite(np.asarray(v)).all() for v in leaves)
  assert float(jnp.max(jnp.abs(g_ref["router"]["kernel"][...]))) > 0  # the sigmoid gate trains the router


@pytest.mark.parametrize("mesh_shape,mesh_axes", [((8,), ("expert",)), ((2, 4), ("data", "expert"))])
def test_expert_sharded_layer_equals_unsharded(mesh_shape, mesh_axes):
  layer = _layer((4, 4), routing_groups=8, z_loss_weight=1e-3)
  x, modality = _inputs(8, 6, 2)
  modality = modality.at[0].set(-1).at[3, 2:].set(-1)  # padding: a whole routing group, and part of one
  (loss, (y, aux)), grads = _value_and_grad(layer, x, modality)

  mesh = sharding.make_mesh(mesh_shape, mesh_axes)
  state = nnx.state(layer)
  nnx.update(layer, jax.device_put(state, sharding.state_shardings(state, mesh)))
  x_s = jax.device_put(x, sharding.batch_sharding(mesh, 3))
  modality_s = jax.device_put(modality, sharding.batch_sharding(mesh, 2))
  with jax.set_mesh(mesh):
    (loss_s, (y_s, aux_s)), grads_s = _value_and_grad(layer, x_s, modality_s)
    program = str(jax.make_jaxpr(lambda x, m: layer.apply(x, m)[0])(x_s, modality_s))
  assert "shard_map" in program and "all_to_all" in program
  assert_sharded_layer_matches(layer, (y, aux, grads), (y_s, aux_s, grads_s))


def test_module_call_sows_the_moe_aux_keys():
  layer = _layer((2, 2))
  x, modality = _inputs(2, 4, 2)
  layer(x, modality)
  (aux,) = pop_moe_aux(layer)
  assert set(aux) == {"aux_loss", "balance_loss", "z_loss", "router_entropy", "fraction_dropped", "expert_load"}
  assert aux["expert_load"].shape == (4,)
