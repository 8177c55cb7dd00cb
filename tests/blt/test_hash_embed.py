"""Hash n-gram embeddings (blt.hash_embed) against a pure-Python reference of the paper's formula."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blt.hash_embed import HASH_BASE, HASH_PAD, HashNGramEmbed, ngram_hash_ids, rolling_poly_hash


def _reference_hash(seq, i, n):
  """RollPolyHash(g_{i,n}) = sum_j b_{i-j+1} a^(j-1) with Python integers, then wrapped to 32 bits."""
  total = 0
  for j in range(1, n + 1):
    k = i - j + 1
    total += (int(seq[k]) if k >= 0 else HASH_PAD) * HASH_BASE ** (j - 1)
  return total & 0xFFFFFFFF


def test_hash_matches_python_reference_with_wraparound():
  seq = np.random.default_rng(0).integers(0, 260, (2, 40))
  for n in (1, 3, 5, 8):
    got = np.asarray(rolling_poly_hash(jnp.asarray(seq, jnp.int32), n))
    assert got.dtype == np.uint32
    ref = [[_reference_hash(row, i, n) for i in range(seq.shape[1])] for row in seq]
    np.testing.assert_array_equal(got, ref)
  ids = ngram_hash_ids(jnp.asarray(seq, jnp.int32), 4, 1000)
  np.testing.assert_array_equal(ids, [[_reference_hash(r, i, 4) % 1000 for i in range(40)] for r in seq])


def test_hash_is_deterministic_and_jit_equals_eager():
  x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (3, 25)), jnp.int32)
  eager = ngram_hash_ids(x, 6, 50_000)
  np.testing.assert_array_equal(eager, ngram_hash_ids(x, 6, 50_000))
  np.testing.assert_array_equal(eager, jax.jit(ngram_hash_ids, static_argnums=(1, 2))(x, 6, 50_000))


def test_ngram_hash_depends_only_on_its_n_bytes():
  rng = np.random.default_rng(2)
  x = rng.integers(0, 256, (1, 30))
  y = x.copy()
  y[0, :10] = rng.integers(0, 256, 10)   # change bytes before the 5-gram ending at 20..29
  y[0, 25:] = (y[0, 25:] + 1) % 256      # and after position 20..24
  hx = np.asarray(rolling_poly_hash(jnp.asarray(x, jnp.int32), 5))
  hy = np.asarray(rolling_poly_hash(jnp.asarray(y, jnp.int32), 5))
  np.testing.assert_array_equal(hx[0, 14:25], hy[0, 14:25])
  assert (hx[0, 25:] != hy[0, 25:]).all()


def test_same_ngram_same_hash_anywhere_and_padding_at_start():
  x = jnp.asarray([list(b"abcXabc")], jnp.int32)
  h = np.asarray(rolling_poly_hash(x, 3))
  assert h[0, 2] == h[0, 6]
  assert h[0, 1] != h[0, 5]  # "ab" after the start (padded) differs from "cab"


def test_segment_ids_pad_across_documents():
  x = jnp.asarray([list(b"xyzabc")], jnp.int32)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2]])
  got = np.asarray(rolling_poly_hash(x, 3, seg))[0, 3:]
  np.testing.assert_array_equal(got, np.asarray(rolling_poly_hash(jnp.asarray([list(b"abc")]), 3))[0])


def test_embedding_sums_one_table_per_n():
  emb = HashNGramEmbed(8, n_min=3, n_max=5, table_size=97, rngs=nnx.Rngs(params=0))
  assert len(emb.tables) == 3
  x = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 9)), jnp.int32)
  ref = sum(np.asarray(t[...])[np.asarray(ngram_hash_ids(x, n, 97))] for n, t in zip((3, 4, 5), emb.tables))
  np.testing.assert_allclose(emb(x), ref, rtol=1e-6)
