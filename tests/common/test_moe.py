"""The MoE layers (common.nn.moe) against slow per-token reference loops written here in numpy: which tokens
go to which expert, which are dropped, the gate values and the layer output, with and without padding; a
numpy port of fairseq's Gumbel second-expert rule; the evaluation capacity; plus the identities between
modes, gradients and the balancing loss."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.nn import SwiGLU
from common.nn.moe import (MoE, MoESettings, assign_expert_choice, assign_token_choice, balance_loss,
                           dispatch_from_assignment, eval_capacity, expert_capacity, moe_forward, pop_moe_aux,
                           token_capacity)
from common.nn.moe import experts as experts_lib
from common.nn.training_rng import in_training, training_rng

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

def _token_choice_reference(probs, k, capacity, mask=None, choices=None):
  """Per token, its k best experts (lower index on ties) unless `choices` are given; then first choices in
  token order, then second choices, each claims the next slot of its expert unless the expert is full
  (capacity None: never). Tokens where `mask` is False (padding) are skipped: no slot, gate 0."""
  s, e = probs.shape
  if choices is None:
    choices = np.array([np.argsort(-p, kind="stable")[:k] for p in probs])
  count = np.zeros(e, int)
  kept = np.zeros((s, k), bool)
  slots = {}
  for j in range(k):
    for t in range(s):
      if mask is not None and not mask[t]:
        continue
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
_apply_masked = nnx.jit(lambda layer, x, mask: layer.apply(x, mask=mask))


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


def _masked_stats_reference(probs, logits, choices, kept, mask):
  """The statistics as means over the real tokens only."""
  real = mask.astype(bool)
  e, k = probs.shape[1], choices.shape[1]
  first = np.bincount(choices[real, 0], minlength=e) / real.sum()
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return dict(balance_loss=e * e * np.mean(first * probs[real].mean(0)),
              z_loss=np.mean(lse[real] ** 2),
              router_entropy=np.mean(-(probs * np.log(probs)).sum(-1)[real]),
              fraction_dropped=1 - kept.sum() / (real.sum() * k),
              expert_load=np.bincount(choices[real].ravel(), minlength=e) / (real.sum() * k))


@pytest.mark.parametrize("k,capacity_factor,mode", [(2, 1.0, "capacity"), (1, 0.5, "capacity"),
                                                    (2, 1.0, "dropless")])
def test_padding_is_not_routed_and_not_counted(k, capacity_factor, mode, monkeypatch):
  """Padding first in the group (where it would claim slots before the real tokens): the output equals the
  reference over the real tokens only (capacity still from the whole group), zero on padding, statistics
  over real tokens, and nothing changes when the padding's content does. Dropless: no grouped-matmul row
  for padding."""
  s, e = 20, 4
  layer = _layer(e, top_k=k, capacity_factor=capacity_factor, mode=mode)
  x = _rng(15).normal(size=(s, D)).astype(np.float32)
  mask = np.ones(s, bool)
  mask[:6] = mask[13:15] = False
  rows, run_grouped = [], experts_lib.run_grouped

  def recording(rows_in, gate_up, down, group_sizes, **kw):
    rows.append(int(np.asarray(group_sizes).sum()))
    return run_grouped(rows_in, gate_up, down, group_sizes, **kw)

  monkeypatch.setattr(experts_lib, "run_grouped", recording)
  y, aux = layer.apply(jnp.asarray(x), mask=jnp.asarray(mask))  # eager: the group sizes are concrete
  probs = _probs_of(layer, x)
  capacity = None if mode == "dropless" else token_capacity(s, e, k, capacity_factor)
  choices, kept, gates, _ = _token_choice_reference(probs, k, capacity, mask)
  experts = (np.asarray(layer.experts.gate_up[...], np.float64), np.asarray(layer.experts.down[...], np.float64))
  np.testing.assert_allclose(np.asarray(y), _layer_reference(x, probs, experts, choices, gates), rtol=2e-4,
                             atol=2e-5)
  assert not np.asarray(y)[~mask].any()
  logits = np.asarray(x, np.float64) @ np.asarray(layer.router.kernel[...], np.float64)
  for key, value in _masked_stats_reference(probs, logits, choices, kept, mask).items():
    np.testing.assert_allclose(np.asarray(aux[key]), value, rtol=1e-5, atol=1e-6, err_msg=key)
  if mode == "dropless":
    assert rows == [kept.sum()] and kept.sum() == mask.sum() * k
  else:
    _, routed_padding, _, _ = _token_choice_reference(probs, k, capacity)  # padding routed like tokens
    assert (routed_padding[mask] != kept[mask]).any()  # ... would have taken real tokens' slots
  x2 = x.copy()
  x2[~mask] = 10 * _rng(16).normal(size=(int((~mask).sum()), D))
  y2, aux2 = layer.apply(jnp.asarray(x2), mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(y2), np.asarray(y), rtol=1e-6, atol=1e-7)
  for key in aux:
    np.testing.assert_allclose(np.asarray(aux2[key]), np.asarray(aux[key]), rtol=1e-6, err_msg=key)


def test_statistics_weight_groups_by_their_real_tokens():
  """Two groups, one all padding: the statistics are those of the real group alone; the aux loss of a batch
  of padding only is zero."""
  layer = _layer(4, num_groups=2, z_loss_weight=0.1)
  x = jnp.asarray(_rng(17).normal(size=(2, 8, D)), jnp.float32)
  mask = jnp.asarray([[True] * 8, [False] * 8])
  _, aux = _apply_masked(layer, x, mask)
  _, alone = _apply(_layer(4, num_groups=1, z_loss_weight=0.1), x[0])
  for key in aux:
    np.testing.assert_allclose(np.asarray(aux[key]), np.asarray(alone[key]), rtol=1e-6, err_msg=key)
  _, empty = _apply_masked(layer, x, jnp.zeros((2, 8), bool))
  assert float(empty["aux_loss"]) == 0.0


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


def test_second_expert_random_policy_keeps_every_first_choice_and_some_second_choices():
  probs = jnp.asarray(_probs(512, 4, seed=5, skew=0.0))
  a = assign_token_choice(probs, 2, None, second_policy="random", rng=jax.random.key(0))
  active = np.asarray(a.active)
  assert active[:, 0].all()
  p2 = np.sort(np.asarray(probs), axis=-1)[:, -2:]
  expected = np.minimum(1.0, 2 * p2[:, 0] / p2.sum(-1)).mean()  # GShard: kept with probability 2 * g2
  assert abs(active[:, 1].mean() - expected) < 0.06
  gate = np.asarray(a.gate)
  np.testing.assert_allclose(gate[~active[:, 1], 0], 1.0, rtol=1e-6)  # a lone first choice gets all weight
  everything = assign_token_choice(probs, 2, None, second_policy="random", rng=None)
  assert np.asarray(everything.active).all()  # no rng (evaluation): every choice is attempted


def _fairseq_top2_sampling(logits, gumbel):
  """numpy port of the choice of experts in fairseq's `top2gating` with second_expert_policy='sampling':
  first the argmax of the softmax, second the argmax of logits + Gumbel noise with the first masked out."""
  gates = np.exp(logits - logits.max(-1, keepdims=True))
  gates /= gates.sum(-1, keepdims=True)
  first = np.argmax(gates, axis=1)
  noisy = logits + gumbel
  noisy[np.arange(len(logits)), first] = -np.inf
  return np.stack([first, np.argmax(noisy, axis=1)], axis=1), gates


@pytest.mark.parametrize("capacity", [None, 6])
def test_second_expert_sampling_is_fairseqs_gumbel_rule(capacity):
  s, e = 48, 6
  logits = _rng(20).normal(size=(s, e)).astype(np.float32)
  logits[:, 0] += 1.0  # expert 0 overflows with capacity 6
  key = jax.random.key(3)
  gumbel = np.asarray(jax.random.gumbel(key, (s, e), jnp.float32))  # the draws the layer makes with this key
  choices, gates = _fairseq_top2_sampling(logits.astype(np.float64), gumbel.astype(np.float64))
  a = assign_token_choice(jax.nn.softmax(jnp.asarray(logits), -1), 2, capacity, second_policy="sampling", rng=key)
  np.testing.assert_array_equal(np.asarray(a.expert), choices)
  plain = np.argsort(-logits, axis=1, kind="stable")[:, 1]
  assert (choices[:, 1] != plain).sum() >= 5  # the noise does change the second choice
  assert np.asarray(a.active).all()  # every drawn choice is attempted (GShard's 'random' drops some)
  _, kept, ref_gates, _ = _token_choice_reference(gates, 2, capacity, choices=choices)  # noise-free gates
  np.testing.assert_array_equal(np.asarray(a.kept), kept)
  np.testing.assert_allclose(np.asarray(a.gate), ref_gates, rtol=1e-5, atol=1e-7)
  if capacity is not None:
    assert not kept.all()
  evaluation = assign_token_choice(jax.nn.softmax(jnp.asarray(logits), -1), 2, None, second_policy="sampling")
  np.testing.assert_array_equal(np.asarray(evaluation.expert)[:, 1], plain)  # no rng: the plain second best


def test_second_expert_sampling_draws_in_proportion_to_the_remaining_probabilities():
  """By hand: probabilities (0.5, 0.3, 0.2): the first choice is always 0; the second is 1 with probability
  0.3 / 0.5 = 0.6 and 2 with 0.4, gated 0.3 / 0.8 and 0.2 / 0.7 after renormalising over the pair."""
  probs = jnp.tile(jnp.asarray([[0.5, 0.3, 0.2]]), (4000, 1))
  a = assign_token_choice(probs, 2, None, second_policy="sampling", rng=jax.random.key(1))
  expert, gate = np.asarray(a.expert), np.asarray(a.gate)
  assert (expert[:, 0] == 0).all() and set(expert[:, 1]) == {1, 2}
  assert abs((expert[:, 1] == 1).mean() - 0.6) < 0.03
  np.testing.assert_allclose(gate[expert[:, 1] == 1], [[0.5 / 0.8, 0.3 / 0.8]] * int((expert[:, 1] == 1).sum()),
                             rtol=1e-6)
  np.testing.assert_allclose(gate[expert[:, 1] == 2, 1], 0.2 / 0.7, rtol=1e-6)


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


@pytest.mark.parametrize("n_real", [3, 12])
def test_expert_choice_never_picks_padding(n_real):
  """Padding scored -inf: each expert takes its best real tokens; with fewer real tokens than the capacity
  (3 < 6) the remaining slots are empty (token S, gate 0) and the output is the reference's."""
  s, e, cf = 16, 4, 1.5
  layer = _layer(e, routing="expert_choice", capacity_factor=cf)
  x = _rng(18).normal(size=(s, D)).astype(np.float32)
  mask = np.zeros(s, bool)
  mask[_rng(19).permutation(s)[:n_real]] = True
  y, aux = _apply_masked(layer, jnp.asarray(x), jnp.asarray(mask))
  probs = _probs_of(layer, x)
  capacity = expert_capacity(s, e, cf)
  d = assign_expert_choice(jnp.asarray(probs, jnp.float32), capacity, jnp.asarray(mask))
  slot_token, slot_gate = np.asarray(d.slot_token), np.asarray(d.slot_gate)
  gate_up, down = np.asarray(layer.experts.gate_up[...], np.float64), np.asarray(layer.experts.down[...], np.float64)
  ref = np.zeros((s, D))
  for ex in range(e):
    masked = np.where(mask, probs[:, ex], -np.inf)
    picks = np.argsort(-masked, kind="stable")[:min(capacity, n_real)]
    np.testing.assert_array_equal(slot_token[ex, :len(picks)], picks)
    np.testing.assert_array_equal(slot_token[ex, len(picks):], s)
    np.testing.assert_array_equal(slot_gate[ex, len(picks):], 0.0)
    for t in picks:
      ref[t] += probs[t, ex] * _swiglu_np(x[t:t + 1], gate_up[ex], down[ex])[0]
  np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-4, atol=2e-5)
  taken = {int(t) for t in slot_token.ravel() if t < s}
  np.testing.assert_allclose(float(aux["fraction_dropped"]), 1 - len(taken) / n_real, atol=1e-6)


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
  np.testing.assert_allclose(np.asarray(y), np.asarray(layer.apply(x, training=False)[0]), rtol=1e-6)
  auxes = pop_moe_aux(layer)
  assert len(auxes) == 1 and set(auxes[0]) >= {"aux_loss", "balance_loss", "fraction_dropped", "expert_load"}
  assert pop_moe_aux(layer) == []


# ------------------------------------------------------------------------------------ evaluation capacity

def test_evaluation_capacity_is_a_fraction_of_the_group_or_none():
  assert eval_capacity(20, 0.1) == 2 and eval_capacity(20, 0.26) == 6
  assert eval_capacity(20, 0.0) is None and eval_capacity(20, -1.0) is None


@pytest.mark.parametrize("fraction", [0.1, 0.0])
def test_evaluation_uses_the_evaluation_capacity(fraction):
  """training=False: ceil(f * S) slots per expert (f = 0.1: 2 of 20), or dropless (f = 0), against the
  reference loop; training=True keeps cf * k * ceil(S / E) (here 0.5 * 2 * 5 = 5)."""
  s, e = 20, 4
  layer = _layer(e, capacity_factor=0.5, eval_capacity_token_fraction=fraction)
  x = _rng(21).normal(size=(s, D)).astype(np.float32)
  probs = _probs_of(layer, x)
  experts = (np.asarray(layer.experts.gate_up[...], np.float64), np.asarray(layer.experts.down[...], np.float64))
  for training, capacity in ((False, eval_capacity(s, fraction)), (True, token_capacity(s, e, 2, 0.5))):
    y, aux = layer.apply(jnp.asarray(x), training=training)
    choices, kept, gates, _ = _token_choice_reference(probs, 2, capacity)
    np.testing.assert_allclose(np.asarray(y), _layer_reference(x, probs, experts, choices, gates), rtol=2e-4,
                               atol=2e-5)
    np.testing.assert_allclose(float(aux["fraction_dropped"]), 1 - kept.sum() / kept.size, atol=1e-6)
    assert kept.all() == (capacity is None)


def test_train_step_context_not_the_rng_decides_the_capacity():
  """Inside `training_rng` (a train step), even without a key, the layer uses its training capacity; outside
  it, the evaluation one (dropless by default)."""
  layer = _layer(4, capacity_factor=0.5)
  x = jnp.asarray(_rng(22).normal(size=(16, D)), jnp.float32)
  jitted = lambda: nnx.jit(lambda layer, x: (layer(x), pop_moe_aux(layer)[0]))  # a fresh trace in each context
  assert not in_training()
  with training_rng(None):
    assert in_training()
    y_train, train_aux = jitted()(layer, x)
  assert not in_training()
  y_eval, eval_aux = jitted()(layer, x)
  for y, training in ((y_train, True), (y_eval, False)):
    expected = nnx.jit(lambda layer, x: layer.apply(x, training=training)[0])(layer, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-6)
  assert float(train_aux["fraction_dropped"]) > 0 and float(eval_aux["fraction_dropped"]) == 0
