"""Entropy patching: the jnp reference against blt's patcher, and the Pallas kernel (interpreted on the CPU)
against the reference at awkward shapes, under a mesh of 8 simulated devices."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blt import entropy as blt_entropy, patcher as blt_patcher
from common import sharding
from common.kernels.entropy_patching import entropy_patching, kernel, reference, resolve_impl

VOCAB = 260  # the BLT vocabulary: 256 bytes and 4 special ids


def random_logits(key, batch: int, length: int, vocab: int = VOCAB, dtype=jnp.float32) -> jax.Array:
  """Logits whose entropies spread over most of [0, log vocab]: a random temperature per position."""
  k_logits, k_scale = jax.random.split(key)
  scale = jax.random.uniform(k_scale, (batch, length, 1), minval=0.2, maxval=6.0)
  return (jax.random.normal(k_logits, (batch, length, vocab)) * scale).astype(dtype)


def median_threshold(logits, monotonic: bool) -> float:
  """A threshold that about half of the positions pass (the median entropy, or entropy difference)."""
  h = np.asarray(reference.entropies_from_logits(logits))
  values = np.diff(h, axis=1) if monotonic else h
  return float(np.median(values)) if values.size else 0.0


def blt_patches(logits, threshold, *, monotonic, max_patch_length=0):
  h = blt_entropy.entropy_from_logits(logits)
  starts = blt_patcher.entropy_starts(h, threshold, monotonic=monotonic)
  p = blt_patcher.patches_from_starts(starts, max_patches=logits.shape[1], max_patch_length=max_patch_length)
  return h, p.patch_starts, p.patch_ids


def assert_same(actual, expected, atol=2e-5):
  (h, starts, ids), (h_ref, starts_ref, ids_ref) = actual, expected
  np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), atol=atol, rtol=0)
  np.testing.assert_array_equal(np.asarray(starts), np.asarray(starts_ref))
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_ref))
  assert h.dtype == jnp.float32 and starts.dtype == jnp.bool_ and ids.dtype == jnp.int32


# ------------------------------------------------------------------------------ reference vs blt


@pytest.mark.parametrize("monotonic", [False, True])
@pytest.mark.parametrize("max_patch_length", [0, 3])
def test_reference_matches_blt_patcher(monotonic, max_patch_length):
  logits = random_logits(jax.random.key(0), 3, 50)
  threshold = median_threshold(logits, monotonic)
  got = reference.entropy_patching(logits, threshold, monotonic=monotonic, max_patch_length=max_patch_length)
  assert_same(got, blt_patches(logits, threshold, monotonic=monotonic, max_patch_length=max_patch_length))


def test_extra_starts_count_before_the_length_limit_as_blt_segments_do():
  logits = random_logits(jax.random.key(7), 2, 40)
  segment_ids = jnp.asarray([[1] * 13 + [2] * 20 + [0] * 7, [1] * 40])
  threshold = float(np.quantile(np.asarray(reference.entropies_from_logits(logits)), 0.8))
  h = blt_entropy.entropy_from_logits(logits)
  expected = blt_patcher.patch(jnp.zeros((2, 40), jnp.int32), method="entropy", max_patches=40, entropies=h,
                               threshold=threshold, max_patch_length=5, segment_ids=segment_ids)
  # the forced first starts (bytes 0 and 1 of the row: no positions given) count as extra starts too
  extra = blt_patcher.segment_starts(segment_ids) | (jnp.arange(40) < 2)
  for impl in ("reference", "interpret"):
    got = entropy_patching(logits, threshold, max_patch_length=5, extra_starts=extra, impl=impl)
    assert_same(got, (h, expected.patch_starts, expected.patch_ids))


def test_parallel_max_patch_length_equals_the_sequential_rule():
  starts = jax.random.bernoulli(jax.random.key(1), 0.15, (4, 97))
  for max_len in (1, 2, 5, 200):
    expected = blt_patcher.enforce_max_length(starts, max_len)
    np.testing.assert_array_equal(reference.apply_max_patch_length(starts, max_len), expected)


def peaked_or_uniform(pattern: str) -> jax.Array:
  """[1, len(pattern), 4] logits: 'u' uniform (H = log 4), 'p' one value 30 above the rest (H ~ 0)."""
  rows = [[0.0] * 4 if c == "u" else [30.0, 0.0, 0.0, 0.0] for c in pattern]
  return jnp.asarray([rows], jnp.float32)


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_hand_computed_global_and_monotonic(impl):
  logits = peaked_or_uniform("puupup")            # H ~ [0, ln4, ln4, 0, ln4, 0]
  h, starts, ids = entropy_patching(logits, 1.0, impl=impl)
  np.testing.assert_allclose(h[0], [0, math.log(4), math.log(4), 0, math.log(4), 0], atol=1e-5)
  # start[t+1] = H(t) > 1: t = 1, 2, 4 open patches at 2, 3, 5.
  assert starts[0].tolist() == [True, False, True, True, False, True]
  assert ids[0].tolist() == [0, 0, 1, 2, 2, 3]
  # Monotonic: H(t) - H(t-1) > 1 only at t = 1 and t = 4 (rises from ~0 to ln 4): starts at 2 and 5.
  _, starts, ids = entropy_patching(logits, 1.0, monotonic=True, impl=impl)
  assert starts[0].tolist() == [True, False, True, False, False, True]
  assert ids[0].tolist() == [0, 0, 1, 1, 1, 2]
  # At most 2 bytes a patch: the 3-byte patch [2, 5) splits at 4.
  _, starts, ids = entropy_patching(logits, 1.0, monotonic=True, max_patch_length=2, impl=impl)
  assert ids[0].tolist() == [0, 0, 1, 1, 2, 3]


# ------------------------------------------------------------------------ kernel vs reference


@pytest.mark.parametrize("batch,length,vocab,block_len,dtype,monotonic", [
    (1, 1, VOCAB, 0, jnp.float32, True),         # a single position: one tile, mostly masked
    (2, 7, VOCAB, 4, jnp.float32, False),        # two tiles, the last one partial
    (2, 130, VOCAB, 32, jnp.bfloat16, True),     # 5 tiles; halo across every boundary
    (2, 300, VOCAB, 0, jnp.bfloat16, False),     # default tile
    (1, 130, 37, 16, jnp.float32, True),         # a vocab far from a power of two
])
def test_kernel_matches_reference(batch, length, vocab, block_len, dtype, monotonic):
  logits = random_logits(jax.random.key(length), batch, length, vocab, dtype)
  threshold = median_threshold(logits, monotonic)
  got = kernel.entropy_patching(logits, threshold, monotonic=monotonic, block_len=block_len, interpret=True)
  assert_same(got, reference.entropy_patching(logits, threshold, monotonic=monotonic))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_minus_infinity_logits_are_ids_of_probability_zero_in_kernel_and_reference(dtype):
  """A padded vocabulary masked to -inf (BLT's entropy model: 259 real ids of 384), and -inf ids inside it:
  no NaN, the same entropies and patches from kernel and reference, and the entropies of the finite ids alone."""
  logits = random_logits(jax.random.key(9), 2, 37, 384, dtype)
  dead = (jnp.arange(384) >= 259) | (jnp.arange(384) % 7 == 3)
  masked = jnp.where(dead, -jnp.inf, logits)
  threshold = median_threshold(logits[..., :259], False)
  expected = reference.entropy_patching(masked, threshold)
  assert np.isfinite(np.asarray(expected[0])).all()
  assert_same(kernel.entropy_patching(masked, threshold, block_len=16, interpret=True), expected)
  alive = np.flatnonzero(~np.asarray(dead))
  np.testing.assert_allclose(expected[0], reference.entropies_from_logits(logits[..., alive]), atol=2e-5, rtol=0)


@pytest.mark.parametrize("monotonic", [False, True])
def test_thresholds_where_no_or_every_position_starts(monotonic):
  """Also: the threshold is traced (one compilation serves both)."""
  logits = random_logits(jax.random.key(3), 2, 21)
  _, starts, ids = kernel.entropy_patching(logits, 1e9, monotonic=monotonic, block_len=8, interpret=True)
  assert starts[:, 0].all() and not starts[:, 1:].any() and (ids == 0).all()
  _, starts, ids = kernel.entropy_patching(logits, -1e9, monotonic=monotonic, block_len=8, interpret=True)
  first_by_rule = 2 if monotonic else 1       # the monotonic rule never opens position 1
  assert starts[:, first_by_rule:].all() and starts[:, 0].all()
  np.testing.assert_array_equal(ids[0, first_by_rule:], np.arange(first_by_rule, 21) - first_by_rule + 1)


def test_kernel_max_patch_length_matches_blt():
  logits = random_logits(jax.random.key(4), 2, 75)
  threshold = float(np.quantile(np.asarray(reference.entropies_from_logits(logits)), 0.9))  # long patches
  got = kernel.entropy_patching(logits, threshold, max_patch_length=4, block_len=16, interpret=True)
  assert_same(got, blt_patches(logits, threshold, monotonic=False, max_patch_length=4))
  assert int(jnp.max(jnp.sum(jax.nn.one_hot(got[2], 75), axis=1))) <= 4


# ------------------------------------------------------------------------------------ dispatch


def test_impl_resolution():
  assert resolve_impl("auto", "cpu") == "reference" and resolve_impl("auto", "gpu") == "pallas"
  with pytest.raises(ValueError, match="Triton kernel for GPU"):
    resolve_impl("pallas", "cpu")
  with pytest.raises(ValueError, match="unknown entropy-patching impl"):
    resolve_impl("cuda")


@pytest.mark.parametrize("impl", ["interpret", "reference"])
def test_batch_sharded_over_eight_devices_equals_one_device(impl):
  mesh = sharding.make_mesh((8,), ("data",))
  logits = random_logits(jax.random.key(5), 8, 33)
  extra = jax.random.bernoulli(jax.random.key(8), 0.05, (8, 33))
  threshold = median_threshold(logits, True)
  options = dict(monotonic=True, max_patch_length=6)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda x, e: entropy_patching(x, threshold, extra_starts=e, impl=impl, **options))(logits, extra)
  assert got[0].sharding.spec[0] in ("data", ("data",))  # rows stay split, nothing gathered
  assert_same(got, reference.entropy_patching(logits, threshold, extra_starts=extra, **options))


def test_no_gradient_flows_through_patching():
  logits = random_logits(jax.random.key(6), 1, 9)
  grad = jax.grad(lambda x: entropy_patching(x, 0.0, impl="reference")[0].sum())(logits)
  assert not np.asarray(grad).any()


@pytest.mark.parametrize("dtype,monotonic", [(jnp.float32, False), (jnp.bfloat16, True)])
def test_kernel_lowers_to_triton_for_cuda_without_a_gpu(dtype, monotonic):
  """The Pallas -> Triton IR lowering (every primitive supported, power-of-two blocks) runs on the CPU, so a
  kernel the compiled GPU path cannot lower fails here rather than on a lent accelerator."""
  op = jax.jit(lambda x, th: kernel.entropy_patching(x, th, monotonic=monotonic, max_patch_length=4))
  lowered = op.trace(jax.ShapeDtypeStruct((2, 130, VOCAB), dtype),
                     jax.ShapeDtypeStruct((), jnp.float32)).lower(lowering_platforms=("cuda",))
  assert "__gpu$xla.gpu.triton" in lowered.as_text()
