"""Patchers (blt.patcher) against hand-computed cases (the official patcher's rules: forced first starts, the
space rule on runs of space-like bytes with UTF-8 lead bytes) and a slow per-byte reference loop, with the
patch of each next byte that the decoder groups by."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blt.patcher import (bpe_starts, enforce_max_length, entropy_starts, is_space_like, patch, patches_from_starts,
                         space_starts)
from tests.file_helpers import toy_bpe_model


def _bytes(text: str) -> jnp.ndarray:
  return jnp.asarray([list(text.encode())], jnp.int32)


def test_static_patches_of_four():
  p = patch(jnp.zeros((2, 10), jnp.int32), method="static", patch_size=4, max_patches=4)
  np.testing.assert_array_equal(p.patch_ids[0], [0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(p.bytes_per_patch, [[4, 4, 2, 0]] * 2)
  np.testing.assert_array_equal(p.num_patches, [3, 3])


def test_space_like_set_is_ascii_non_alphanumerics_and_utf8_lead_bytes():
  expected = [(v < 128 and not (48 <= v <= 57 or 65 <= v <= 90 or 97 <= v <= 122)) or v >= 0xC0 for v in range(256)]
  got = is_space_like(jnp.arange(260))
  np.testing.assert_array_equal(got[:256], expected)
  assert got[ord(" ")] and got[ord("\n")] and got[ord("\t")] and got[ord(",")]
  assert not got[256:].any()  # special ids


def test_space_patching_the_first_space_like_byte_closes_the_word():
  # h0 e1 l2 l3 o4 ,5 _6 w7 o8 r9 l10 d11 .12 _13 o14 k15: bytes 0 and 1 always open patches; "," (the first
  # space-like byte after "ello") closes its patch, so " world" opens at 6; "." closes it, " ok" opens at 13.
  p = patch(_bytes("hello, world. ok"), method="space", max_patches=8)
  assert np.flatnonzero(p.patch_starts[0]).tolist() == [0, 1, 6, 13]
  np.testing.assert_array_equal(p.bytes_per_patch[0, :5], [1, 5, 7, 3, 0])
  # the decoder's grouping: byte t reads the patches before the one of byte t+1 (the last byte: by the rule)
  np.testing.assert_array_equal(p.next_patch_ids[0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3])


def test_space_patching_tabs_newlines_and_utf8():
  assert np.flatnonzero(space_starts(_bytes("a\tb\nc"))[0]).tolist() == [0, 2, 4]
  # "é" is 0xC3 0xA9: its lead byte counts as space-like (as in the official patcher), so it closes "caf"'s
  # patch and the space after the continuation byte closes the next.
  assert np.flatnonzero(space_starts(_bytes("café au"))[0]).tolist() == [0, 4, 6]
  # a special id (BOS) always closes its patch
  assert np.flatnonzero(space_starts(jnp.asarray([[256, *b"ab"]]))[0]).tolist() == [0, 1]


ENTROPIES = jnp.asarray([[0.1, 2.0, 0.5, 3.0, 3.0, 0.2]])


def test_entropy_global_threshold_opens_the_next_byte():
  # H(t) > 1 at t = 1, 3, 4, so bytes 2, 4, 5 open patches, and bytes 0 and 1 always do; H(5) = 0.2 says
  # the byte after the row would not, so byte 5 reads the patches before its own.
  p = patch(jnp.zeros((1, 6), jnp.int32), method="entropy", entropies=ENTROPIES, threshold=1.0, max_patches=6)
  np.testing.assert_array_equal(p.patch_starts[0], [1, 1, 1, 0, 1, 1])
  np.testing.assert_array_equal(p.patch_ids[0], [0, 1, 2, 2, 3, 4])
  np.testing.assert_array_equal(p.next_patch_ids[0], [1, 2, 2, 3, 4, 4])
  np.testing.assert_array_equal(p.bytes_per_patch[0], [1, 1, 2, 1, 1, 0])
  last = patch(jnp.zeros((1, 6), jnp.int32), method="entropy", entropies=ENTROPIES.at[0, 5].set(5.0),
               threshold=1.0, max_patches=6)
  assert int(last.next_patch_ids[0, 5]) == 5  # the last entropy decides the byte after the row


def test_entropy_monotonic_rule_uses_the_increase():
  # H(t) - H(t-1) for t = 1..4: 1.9, -1.5, 2.5, 0.0 -> bytes 2 and 4 open patches (not 5: no increase).
  starts = entropy_starts(ENTROPIES, 1.0, monotonic=True)
  np.testing.assert_array_equal(starts[0], [1, 0, 1, 0, 1, 0])


def test_entropy_monotonic_never_opens_byte_one():
  starts = entropy_starts(jnp.asarray([[9.0, 0.0, 0.0]]), 0.0, monotonic=True)
  np.testing.assert_array_equal(starts[0], [1, 0, 0])
  assert entropy_starts(jnp.asarray([[9.0, 9.0]]), 0.0, monotonic=True).shape == (1, 2)


def test_last_entropy_is_ignored():
  starts = entropy_starts(jnp.asarray([[0.0, 0.0, 0.0, 5.0]]), 1.0)
  np.testing.assert_array_equal(starts[0], [1, 0, 0, 0])


def test_max_length_forces_starts_and_resets_on_rule_starts():
  rule = jnp.asarray([[1, 0, 0, 1, 0, 0, 0]], bool)
  np.testing.assert_array_equal(enforce_max_length(rule, 2)[0], [1, 0, 1, 1, 0, 1, 0])
  no_rule = jnp.zeros((1, 10), bool)
  np.testing.assert_array_equal(np.flatnonzero(enforce_max_length(no_rule, 4)[0]), [0, 4, 8])


def _reference_entropy_patching(h, theta, monotonic, max_len):
  """Per-byte loop: the patch id of every byte and of the byte after it (one past the row included)."""
  ids, run, current = [], 0, -1
  for t in range(len(h) + 1):
    if t < (3 if monotonic else 2):
      start = True
    elif monotonic:
      start = h[t - 1] - h[t - 2] > theta
    else:
      start = h[t - 1] > theta
    if max_len and run >= max_len:
      start = True
    run = 1 if start else run + 1
    current += start
    ids.append(current)
  return ids[:-1], ids[1:]


@pytest.mark.parametrize("monotonic", [False, True])
@pytest.mark.parametrize("max_len", [0, 3])
def test_entropy_patching_matches_loop_under_jit(monotonic, max_len):
  h = np.random.default_rng(0).exponential(1.0, (3, 37)).astype(np.float32)
  method = "entropy_monotonic" if monotonic else "entropy"
  fn = jax.jit(lambda x, e: patch(x, method=method, entropies=e, threshold=0.8, max_patches=40,
                                  max_patch_length=max_len))
  p = fn(jnp.zeros(h.shape, jnp.int32), jnp.asarray(h))
  for row in range(3):
    ref, ref_next = _reference_entropy_patching(h[row], 0.8, monotonic, max_len)
    np.testing.assert_array_equal(p.patch_ids[row], ref)
    np.testing.assert_array_equal(p.next_patch_ids[row], ref_next)
    counts = np.bincount(ref, minlength=40)
    np.testing.assert_array_equal(p.bytes_per_patch[row], counts)
    if max_len:
      assert counts.max() <= max_len


def test_patches_past_max_patches_join_the_last_slot():
  p = patches_from_starts(jnp.ones((1, 6), bool), max_patches=4)
  np.testing.assert_array_equal(p.patch_ids[0], [0, 1, 2, 3, 3, 3])
  np.testing.assert_array_equal(p.next_patch_ids[0], [1, 2, 3, 3, 3, 3])  # never past the last slot
  np.testing.assert_array_equal(p.bytes_per_patch[0], [1, 1, 1, 3])
  assert int(p.num_patches[0]) == 6  # the caller can detect the overflow


def test_unknown_method_and_missing_entropies_raise():
  with pytest.raises(ValueError, match="unknown"):
    patch(jnp.zeros((1, 4), jnp.int32), method="wordpiece", max_patches=4)
  with pytest.raises(ValueError, match="patch_starts"):
    patch(jnp.zeros((1, 4), jnp.int32), method="bpe", max_patches=4)
  with pytest.raises(ValueError, match="entropies"):
    patch(jnp.zeros((1, 4), jnp.int32), method="entropy", max_patches=4)


# Two documents and padding in one row: segment 1 at 0..4, segment 2 at 5..9, padding at 10..11.
SEGMENTS = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0]])
POSITIONS = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0]])


@pytest.mark.parametrize("method, forced", [("static", []), ("space", [1, 6]), ("entropy", [1, 6]),
                                            ("entropy_monotonic", [1, 2, 6, 7]), ("bpe", [])])
def test_segment_starts_always_open_a_patch(method, forced):
  # No rule would open a patch at byte 5 (letters only, flat low entropy, 8-byte static patches, no BPE start):
  # only the segment does, and the first bytes of each segment are forced (space and entropy rules). Byte 10
  # opens the padding's own patch, the only one there (its special ids end no patch).
  byte_ids = jnp.concatenate([_bytes("abcdefghij"), jnp.full((1, 2), 258)], axis=1)
  p = patch(byte_ids, method=method, max_patches=12, patch_size=8, entropies=jnp.zeros((1, 12)), threshold=1.0,
            patch_starts=jnp.zeros((1, 12), bool).at[:, 0].set(True), segment_ids=jnp.asarray(SEGMENTS),
            positions=jnp.asarray(POSITIONS))
  assert np.flatnonzero(p.patch_starts[0]).tolist() == sorted([0, 5, 10, *forced])
  unsegmented = patch(byte_ids, method=method, max_patches=12, patch_size=8, entropies=jnp.zeros((1, 12)),
                      threshold=1.0, patch_starts=jnp.zeros((1, 12), bool).at[:, 0].set(True))
  assert not unsegmented.patch_starts[0, 5]


def test_max_length_counts_from_a_segment_start():
  p = patch(jnp.zeros((1, 12), jnp.int32), method="entropy", entropies=jnp.zeros((1, 12)), threshold=1.0,
            max_patches=12, max_patch_length=3, segment_ids=jnp.asarray(SEGMENTS), positions=jnp.asarray(POSITIONS))
  # forced 0, 1 and 5, 6; three bytes from 1 and from 6 force 4 and 9; the padding opens at 10
  assert np.flatnonzero(p.patch_starts[0]).tolist() == [0, 1, 4, 5, 6, 9, 10]


def test_a_document_patches_the_same_wherever_it_ends():
  # Document 1 (bytes 0..4) ends where document 2 begins in row 0, at the row's end in row 1: the patch of the
  # byte after its last (what the decoder reads there) follows the rule alike, not document 2's start.
  x = jnp.asarray([[*b"ab cd", *b"efghijk"], [*b"zzzzzzz", *b"ab cd"]], jnp.int32)
  segs = jnp.asarray([[1] * 5 + [2] * 7, [1] * 7 + [2] * 5])
  pos = jnp.asarray([[*range(5), *range(7)], [*range(7), *range(5)]])
  p = patch(x, method="space", max_patches=12, segment_ids=segs, positions=pos)
  np.testing.assert_array_equal(p.next_patch_ids[0, :5] - p.patch_ids[0, :5],
                                p.next_patch_ids[1, 7:] - p.patch_ids[1, 7:])


@pytest.fixture(scope="module")
def toy_bpe():
  """The toy BPE model (tests/file_helpers.py), its merges checked."""
  pytest.importorskip("sentencepiece")
  sp = toy_bpe_model()
  assert sp.encode("the cat sat on the mat", out_type=str) == ["the", "▁cat", "▁sat", "▁on", "▁the", "▁mat"]
  return sp


def test_bpe_starts_where_tokens_start(toy_bpe):
  #        the| cat| sat| on| the| mat
  text = b"the cat sat on the mat"
  starts = bpe_starts(np.frombuffer(text, np.uint8)[None].astype(np.int32), np.ones((1, len(text)), np.int32),
                      toy_bpe)
  assert np.flatnonzero(starts[0]).tolist() == [0, 3, 7, 11, 14, 18]


def test_bpe_starts_respect_segments_specials_and_invalid_utf8(toy_bpe):
  # BOS "cat" | BOS "the" 0xFF "cat" | PAD PAD: "cat" alone is c|at; 0xFF (not UTF-8) is a patch of its own;
  # the padding is one patch.
  ids = np.array([[256, *b"cat", 256, *b"the", 0xFF, *b"cat", 258, 258]])
  segments = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0]])
  starts = bpe_starts(ids, segments, toy_bpe)
  assert np.flatnonzero(starts[0]).tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 12]


def test_static_patches_restart_at_each_segment():
  segments = jnp.asarray([[1] * 6 + [2] * 6 + [0] * 4])
  positions = jnp.asarray([[*range(6), *range(6), 0, 0, 0, 0]])
  p = patch(jnp.zeros((1, 16), jnp.int32), method="static", patch_size=4, max_patches=8, segment_ids=segments,
            positions=positions)
  assert np.flatnonzero(p.patch_starts[0]).tolist() == [0, 4, 6, 10, 12]  # the padding is one patch
  # the byte after a document's last continues its count: byte 5 (position 5) is not followed by a start
  np.testing.assert_array_equal(p.next_patch_ids[0, :12] - p.patch_ids[0, :12], [0, 0, 0, 1, 0, 0] * 2)
