"""common.nn.moe.exchange on 8 simulated devices: rows sent to their experts' shards with the bounded
all-to-all, or with the gather fallback when a buffer would overflow, against a slow per-row numpy loop
(outputs) and the single-device run (gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from common import sharding
from common.nn.moe import exchange

D, FF, E, T, K = 4, 8, 8, 6, 2  # T tokens and T * K rows per shard
EP = 8


def _weights():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(E, D, 2, FF)).astype(np.float32) / 2, rng.normal(size=(E, FF, D)).astype(np.float32) / 3)


def _slow(x, token, expert, gate_up, down):
  """Row by row in float64: expert[r]'s SwiGLU of x[token[r]], zeros for expert >= E."""
  out = np.zeros((len(token), D))
  for r, (t, e) in enumerate(zip(token, expert)):
    if e < E:
      h = np.einsum("d,dgf->gf", x[t].astype(np.float64), gate_up[e].astype(np.float64))
      out[r] = (h[0] / (1 + np.exp(-h[0])) * h[1]) @ down[e].astype(np.float64)
  return out


def _rows(case):
  """Per shard: local token indices [EP, R] and experts [EP, R] (E: executed nowhere)."""
  rng = np.random.default_rng(1)
  token = np.repeat(np.arange(T), K)[None].repeat(EP, 0)
  expert = rng.integers(0, E + 1, size=(EP, T * K))  # about one row in nine executed nowhere
  if case == "one_hot_expert":
    expert = np.where(expert < E, 3, E)  # nearly every row to expert 3's shard: overflows any buffer < R
  return token, expert


def _run_rows(slack):
  return lambda x, t, e, gu, dn: exchange.run_rows(x, t, e, gu, dn, expert_axis="expert", slack=slack)


def _overflows(expert, slack):
  """Whether some shard sends more rows to some shard than the buffers of `run_rows` hold."""
  per_dest = int(np.ceil(slack * T * K / EP))
  return max(np.bincount(np.minimum(e // (E // EP), EP), minlength=EP + 1)[:EP].max() for e in expert) > per_dest


# Each branch alone, then `run_rows` choosing: (rows, run, slack of run_rows: the branch it must take).
CASES = {
    "all_to_all_branch": ("random", lambda x, t, e, gu, dn: exchange._all_to_all_rows(x, t, e, gu, dn, "auto",
                                                                                      "expert", T * K // 2), None),
    "gather_branch": ("random", lambda x, t, e, gu, dn: exchange._gathered_rows(x, t, e, gu, dn, "auto", "expert"),
                      None),
    "run_rows_fitting": ("random", _run_rows(4.0), 4.0),
    "run_rows_overflowing": ("one_hot_expert", _run_rows(2.0), 2.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_exchange_equals_per_row_loop_and_one_device(name):
  case, run, slack = CASES[name]
  token, expert = _rows(case)
  assert not _overflows(expert, 4.0) if case == "random" else _overflows(expert, slack)  # the intended branch
  gate_up, down = _weights()
  x = np.random.default_rng(2).normal(size=(EP * T, D)).astype(np.float32)
  global_token = (token + np.arange(EP)[:, None] * T).reshape(-1)
  probe = np.random.default_rng(3).normal(size=(EP * T * K, D)).astype(np.float32)

  mesh = sharding.make_mesh((EP,), ("expert",))
  sharded = jax.shard_map(
      lambda x, t, e, gu, dn: run(x, t.reshape(-1), e.reshape(-1), gu, dn),
      mesh=mesh, in_specs=(P("expert"),) * 5, out_specs=P("expert"))

  def loss_sharded(x, gu, dn):
    return jnp.sum(sharded(x, jnp.asarray(token), jnp.asarray(expert), gu, dn) * probe)

  def loss_one(x, gu, dn):
    return jnp.sum(exchange.run_rows(x, jnp.asarray(global_token), jnp.asarray(expert.reshape(-1)), gu, dn) * probe)

  out = jax.jit(sharded)(x, token, expert, gate_up, down)
  if slack is not None:
    program = str(jax.make_jaxpr(sharded)(x, token, expert, gate_up, down))
    assert "all_to_all" in program and "cond" in program
  np.testing.assert_allclose(np.asarray(out), _slow(x, global_token, expert.reshape(-1), gate_up, down),
                             rtol=1e-4, atol=1e-5)
  grads = jax.jit(jax.grad(loss_sharded, argnums=(0, 1, 2)))(x, gate_up, down)
  want = jax.jit(jax.grad(loss_one, argnums=(0, 1, 2)))(x, gate_up, down)
  for got, ref in zip(grads, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(want[1])).max() > 0  # the rows did reach the experts

