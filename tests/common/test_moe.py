"""The MoE layers (common.nn.moe) against slow per-token reference loops written here in numpy: which tokens
go to which expert, which are dropped, the gate values and the layer output; plus the identities between
modes, gradients and the balancing loss."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.nn import SwiGLU
from common.nn.moe import (MoE, MoESettings, assign_expert_choice, assign_token_choice, balance_loss,
                           dispatch_from_assignment, expert_capacity, moe_forward, pop_moe_aux, token_capacity)

D, FF = 8, 16


def _rng(seed=0):
  return np.random.default_rng(seed)


def _probs(s, e, seed=0, skew=2.0):
  """Softmax of random logits with experts 0 and 1 favoured, so that capacity overflows."""
  logits = _rng(seed).normal(size=(s, e)) * 2.0
  logits[:, :2] += skew
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def _swiglu_np(x, gate_up, down):
  h = x @ gate_up.reshape(gate_up.shape[0], -1)
  h = h.reshape(x.shape[0], 2, -1)
  g = h[:, 0]
  return ((g / (1 + np.exp(-g))) * h[:, 1]) @ down


# ------------------------------------------------------------------------------------- reference loops

def _token_choice_reference(probs, k, capacity):
  """Per token, its k best experts (lower index on ties); then first choices in token order, then second
  choices, each claims the next slot of its expert unless the expert is full (capacity None: never)."""
  s, e = probs.shape
  choices = np.array([np.argsort(-p, kind="stable")[:k] for p in probs])
  count = np.zeros(e, int)
  kept = np.zeros((s, k), bool)
  slots = {}
  for j in range(k):
    for t in range(s):
      ex = choices[t, j]
      if capacity is None or count[ex] < capacity:
        kept[t, j] = True
        slots[(ex, count[ex])] = t
        count[ex] += 1
  gates = np.zeros((s, k))
  for t in range(s):
    chosen = [probs[t, choices[t, j]] if kept[t, j] else 0.0 for j in range(k)]
    total = sum(chosen)
    for j in range(k):
      gates[t, j] = chosen[j] if k == 1 else (chosen[j] / total if total > 0 else 0.0)
  return choices, kept, gates, slots


def _layer_reference(x, probs, experts, choices, gates):
  """y[t] = sum over t's choices of gate * expert(x[t]), token by token."""
  gate_up, down = experts
  y = np.zeros_like(x, dtype=np.float64)
  for t in range(x.shape[0]):
    for j in range(choices.shape[1]):
      if gates[t, j] != 0:
        ex = choices[t, j]
        y[t] += gates[t, j] * _swiglu_np(x[t:t + 1], gate_up[ex], down[ex])[0]
  return y


_apply = nnx.jit(lambda layer, x: layer.apply(x))  # one compilation instead of op-by-op dispatch


def _layer(e, seed=0, **settings):
  return MoE(D, FF, MoESettings(e, **settings), rngs=nnx.Rngs(params=seed))


def _probs_of(layer, x):
  logits = np.asarray(x, np.float64) @ np.asarray(layer.router.kernel[...], np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------------------- token choice

@pytest.mark.parametrize("k,capacity_factor", [(1, 1.0), (2, 1.0), (2, 0.5), (1, 0.25)])
def test_token_choice_assignment_matches_reference_loop(k, capacity_factor):
  s, e = 24, 4
  probs = _probs(s, e, seed=k)
  capacity = token_capacity(s, e, k, capacity_factor)
  a = assign_token_choice(jnp.asarray(probs), k, capacity)
  choices, kept, gates, slots = _token_choice_reference(probs, k, capacity)
  np.testing.assert_array_equal(np.asarray(a.expert), choices)
  np.testing.assert_array_equal(np.asarray(a.kept), kept)
  np.testing.assert_allclose(np.asarray(a.gate), gates, rtol=1e-6, atol=1e-7)
  assert not kept.all()  # the skewed router overflows experts 0 and 1
  d = dispatch_from_assignment(a, e, capacity)
  slot_token = np.asarray(d.slot_token)
  for ex in range(e):
    for c in range(capacity):
      assert slot_token[ex, c] == slots.get((ex, c), s)  # s marks an empty slot


def test_capacity_is_cf_times_k_times_ceil_tokens_per_expert():
  assert token_capacity(10, 4, 2, 1.0) == 2 * 3
  assert token_capacity(10, 4, 1, 1.5) == 5  # ceil(1.5 * 3)
  assert expert_capacity(16, 4, 2.0) == 8


@pytest.mark.parametrize("k,capacity_factor,mode", [(2, 1.0, "capacity"), (1, 0.5, "capacity"),
                                                    (2, 1.0, "dropless")])
def test_token_choice_layer_output_matches_reference_loop(k, capacity_factor, mode):
  s, e = 20, 4
  layer = _layer(e, top_k=k, capacity_factor=capacity_factor, mode=mode)
  x = _rng(3).normal(size=(s, D)).astype(np.float32)
  y, aux = _apply(layer, jnp.asarray(x))
  probs = _probs_of(layer, x)
  capacity = None if mode == "dropless" else token_capacity(s, e, k, capacity_factor)
  choices, kept, gates, _ = _token_choice_reference(probs, k, capacity)
  experts = (np.asarray(layer.experts.gate_up[...], np.float64), np.asarray(layer.experts.down[...], np.float64))
  np.testing.assert_allclose(np.asarray(y), _layer_reference(x, probs, experts, choices, gates),
                             rtol=2e-4, atol=2e-5)
  attempted = s * k
  np.testing.assert_allclose(float(aux["fraction_dropped"]), 1 - kept.sum() / attempted, atol=1e-6)
  load = np.bincount(choices.ravel(), minlength=e) / attempted
  np.testing.assert_allclose(np.asarray(aux["expert_load"]), load, atol=1e-6)


def test_groups_route_independently():
  """num_groups=2 is the layer applied to each half of the tokens on its own (capacity per group, the
  statistics averaged)."""
  x = jnp.asarray(_rng(4).normal(size=(2, 12, D)), jnp.float32)
  grouped = _layer(4, num_groups=2, capacity_factor=0.5)
  y, aux = _apply(grouped, x)
  single = _layer(4, num_groups=1, capacity_factor=0.5)
  halves = [_apply(single, x[i]) for i in range(2)]
  np.testing.assert_allclose(np.asarray(y), np.stack([np.asarray(h[0]) for h in halves]), rtol=1e-5, atol=1e-6)
  for key in ("balance_loss", "fraction_dropped", "router_entropy", "z_loss"):
    np.testing.assert_allclose(float(aux[key]), np.mean([float(h[1][key]) for h in halves]), rtol=1e-5)


def test_second_expert_sampling_keeps_every_first_choice_and_some_second_choices():
  probs = jnp.asarray(_probs(512, 4, seed=5, skew=0.0))
  a = assign_token_choice(probs, 2, None, second_policy="sampling", rng=jax.random.key(0))
  active = np.asarray(a.active)
  assert active[:, 0].all()
  p2 = np.sort(np.asarray(probs), axis=-1)[:, -2:]
  expected = np.minimum(1.0, 2 * p2[:, 0] / p2.sum(-1)).mean()  # GShard: kept with probability 2 * g2
  assert abs(active[:, 1].mean() - expected) < 0.06
  gate = np.asarray(a.gate)
  np.testing.assert_allclose(gate[~active[:, 1], 0], 1.0, rtol=1e-6)  # a lone first choice gets all weight
  everything = assign_token_choice(probs, 2, None, second_policy="sampling", rng=None)
  assert np.asarray(everything.active).all()  # no rng (evaluation): every choice is attempted


# ---------------------------------------------------------------------------------------- expert choice

def _expert_choice_reference(probs, capacity):
  """Each expert, independently, takes the `capacity` tokens with the highest scores (lower index first)."""
  s, e = probs.shape
  picks = [np.argsort(-probs[:, ex], kind="stable")[:capacity] for ex in range(e)]
  return np.array(picks), np.array([probs[p, ex] for ex, p in enumerate(picks)])


def test_expert_choice_matches_reference_loop():
  s, e, cf = 16, 4, 1.5
  layer = _layer(e, routing="expert_choice", capacity_factor=cf)
  x = _rng(6).normal(size=(s, D)).astype(np.float32)
  y, aux = _apply(layer, jnp.asarray(x))
  probs = _probs_of(layer, x)
  capacity = expert_capacity(s, e, cf)
  picks, gates = _expert_choice_reference(probs, capacity)
  d = assign_expert_choice(jnp.asarray(probs, jnp.float32), capacity)
  np.testing.assert_array_equal(np.asarray(d.slot_token), picks)
  np.testing.assert_allclose(np.asarray(d.slot_gate), gates, rtol=1e-5)
  gate_up, down = np.asarray(layer.experts.gate_up[...], np.float64), np.asarray(layer.experts.down[...], np.float64)
  ref = np.zeros((s, D))
  for ex in range(e):
    for t, g in zip(picks[ex], gates[ex]):
      ref[t] += g * _swiglu_np(x[t:t + 1], gate_up[ex], down[ex])[0]
  np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-4, atol=2e-5)
  untouched = 1 - len(set(picks.ravel())) / s
  np.testing.assert_allclose(float(aux["fraction_dropped"]), untouched, atol=1e-6)


# ------------------------------------------------------------------------------------------- identities

def test_dropless_single_expert_equals_dense_swiglu():
  layer = _layer(1, top_k=1, mode="dropless")
  dense = SwiGLU(D, FF, rngs=nnx.Rngs(params=1))
  layer.experts.gate_up[...] = jnp.stack([dense.gate.kernel[...], dense.up.kernel[...]], axis=1)[None]
  layer.experts.down[...] = dense.down.kernel[...][None]
  x = jnp.asarray(_rng(7).normal(size=(3, 5, D)), jnp.float32)
  np.testing.assert_allclose(np.asarray(_apply(layer, x)[0]), np.asarray(dense(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_capacity_and_dropless_agree_when_nothing_is_dropped(k):
  x = jnp.asarray(_rng(8).normal(size=(2, 8, D)), jnp.float32)
  capacity = _layer(4, top_k=k, capacity_factor=4.0 / k, mode="capacity")  # capacity >= every token
  dropless = _layer(4, top_k=k, mode="dropless")
  y_c, aux_c = _apply(capacity, x)
  y_d, aux_d = _apply(dropless, x)
  assert float(aux_c["fraction_dropped"]) == 0.0
  np.testing.assert_allclose(np.asarray(y_c), np.asarray(y_d), rtol=1e-5, atol=1e-6)
  for key in ("balance_loss", "z_loss", "router_entropy"):
    np.testing.assert_allclose(float(aux_c[key]), float(aux_d[key]), rtol=1e-6)


@pytest.mark.parametrize("settings", [dict(mode="capacity", capacity_factor=0.75), dict(mode="dropless"),
                                      dict(routing="expert_choice", capacity_factor=1.0)])
def test_gradients_are_finite_and_match_finite_differences(settings):
  """Directional derivative of a scalar of (y, aux_loss) w.r.t. all parameters and x, against central
  differences in float64 (routing decisions do not flip for so small a step)."""
  with jax.enable_x64(True):
    layer = _layer(4, z_loss_weight=1e-2, **settings)
    st = layer.settings
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), layer.params())
    x = jnp.asarray(_rng(9).normal(size=(1, 12, D)), jnp.float64)
    w = jnp.asarray(_rng(10).normal(size=(1, 12, D)), jnp.float64)

    @jax.jit
    def f(p, x):
      y, aux = moe_forward(st, p, x)
      return jnp.sum(y * w) + 10.0 * aux["aux_loss"]

    grads = jax.jit(jax.grad(f, argnums=(0, 1)))(params, x)
    chex.assert_tree_all_finite(grads)
    rng = _rng(11)
    direction = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), (params, x))
    eps = 1e-5
    plus = jax.tree.map(lambda a, d: a + eps * d, (params, x), direction)
    minus = jax.tree.map(lambda a, d: a - eps * d, (params, x), direction)
    numeric = (f(*plus) - f(*minus)) / (2 * eps)
    analytic = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-5)


# ------------------------------------------------------------------------------------------ aux losses

def test_balance_loss_is_one_for_a_uniform_router_and_grows_as_routing_concentrates():
  s, e = 64, 8
  base = _rng(12).normal(size=(s, e)) * 1e-3  # ties broken at random: first choices spread evenly
  first = np.argmax(base, -1)
  uniform = jnp.full((s, e), 1.0 / e)
  flat = float(balance_loss(uniform, jnp.asarray(np.arange(s) % e)))
  np.testing.assert_allclose(flat, 1.0, rtol=1e-6)
  previous = flat
  for skew in (0.5, 1.0, 2.0, 4.0):
    logits = base.copy()
    logits[:, 0] += skew
    probs = jax.nn.softmax(jnp.asarray(logits), -1)
    loss = float(balance_loss(probs, jnp.argmax(probs, -1)))
    assert loss > previous
    previous = loss
  np.testing.assert_allclose(previous, e * float(jax.nn.softmax(jnp.asarray(logits), -1)[:, 0].mean()), rtol=1e-5)
  del first


def test_uniform_router_has_entropy_log_e_and_balanced_load():
  layer = _layer(4, mode="dropless")
  layer.router.kernel[...] = jnp.zeros_like(layer.router.kernel[...])
  _, aux = _apply(layer, jnp.asarray(_rng(13).normal(size=(8, D)), jnp.float32))
  np.testing.assert_allclose(float(aux["router_entropy"]), np.log(4), rtol=1e-6)
  np.testing.assert_allclose(float(aux["z_loss"]), np.log(4) ** 2, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(aux["expert_load"]).sum(), 1.0, rtol=1e-6)


def test_module_call_sows_aux_that_pop_collects_once():
  layer = _layer(4)
  x = jnp.asarray(_rng(14).normal(size=(2, 4, D)), jnp.float32)
  y = layer(x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(layer.apply(x)[0]), rtol=1e-6)
  auxes = pop_moe_aux(layer)
  assert len(auxes) == 1 and set(auxes[0]) >= {"aux_loss", "balance_loss", "fraction_dropped", "expert_load"}
  assert pop_moe_aux(layer) == []
