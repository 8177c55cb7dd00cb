"""The encoder's own-patch cross-attention (CrossAttention with `key_owner`) equals the dense masked
attention it replaces, forward and backward, including empty patch slots and bytes without a slot."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blt.model import CrossAttention


def _setup(seed=0):
  rng = np.random.default_rng(seed)
  cross = CrossAttention(16, 16, 4, rngs=nnx.Rngs(params=seed))
  batch, length, max_patches = 2, 23, 9
  # Row 0: space-like patches (sizes vary); row 1 has more patches than slots, so its last bytes own no slot
  # and, in row 0, the slots past its last patch own no byte.
  starts = np.zeros((batch, length), bool)
  starts[0, [0, 3, 4, 9, 15]] = True
  starts[1, ::2] = True
  patch_ids = jnp.asarray(np.cumsum(starts, axis=1) - 1, jnp.int32)
  queries = jnp.asarray(rng.normal(size=(batch, max_patches, 16)), jnp.float32)
  bytes_ = jnp.asarray(rng.normal(size=(batch, length, 16)), jnp.float32)
  mask = (patch_ids[:, None, :] == jnp.arange(max_patches)[None, :, None])[:, None]
  return cross, queries, bytes_, patch_ids, mask


def test_own_patch_attention_equals_dense_masked_attention():
  cross, queries, bytes_, patch_ids, mask = _setup()
  dense = np.asarray(cross(queries, bytes_, mask))
  own = np.asarray(cross(queries, bytes_, key_owner=patch_ids))
  np.testing.assert_allclose(own, dense, rtol=1e-5, atol=1e-6)
  assert np.all(own[0, 5:] == 0)  # slots past row 0's last patch stay 0


def test_own_patch_attention_gradients_equal_dense():
  cross, queries, bytes_, patch_ids, mask = _setup(1)
  graphdef, params = nnx.split(cross, nnx.Param)
  cot = jnp.asarray(np.random.default_rng(2).normal(size=queries.shape), jnp.float32)

  def loss(p, q, x, **kw):
    return jnp.sum(nnx.merge(graphdef, p)(q, x, **kw) * cot)

  grad = jax.grad(loss, argnums=(0, 1, 2))
  g_dense = grad(params, queries, bytes_, mask=mask)
  g_own = grad(params, queries, bytes_, key_owner=patch_ids)
  for a, b in zip(jax.tree.leaves(g_own), jax.tree.leaves(g_dense)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
