"""Entropy patching as one Pallas (Triton) kernel that reads the entropy model's logits once.

BLT (Pagnoni et al. 2024, Sec. 2.3) needs, for every byte, the entropy of the next-byte prediction and
whether a patch starts there; `reference.py` states the rules. Here the grid is (batch rows, length
tiles); each program loads one [block_len, vocab] block of logits, computes the entropies with a stable
softmax in f32, and writes the entropies, the start flags and the patch count within its tile.

- The rules look back one (global) or two (monotonic) positions, across the tile boundary at the first
  positions of a tile: each program also loads the two rows before its tile and recomputes their entropies
  (2 / block_len extra reads). Triton cannot slice register tensors, so H(t-1) and H(t-2) are gathered by
  an exact masked sum over a [block_len, block_len] one-hot (one non-zero term per row).
- Patch ids are a prefix sum along the whole row: the kernel writes the inclusive count within each tile;
  the wrapper adds the running total of the earlier tiles (a [batch, tiles] cumsum).
- `max_patch_length` depends on the last start before each position, arbitrarily far back, so it is applied
  after the kernel by the reference's parallel rule (a running max over the length), ids then re-counted;
  so are `extra_starts` (document boundaries), which must count before the length limit.
- Triton wants power-of-two blocks: the vocab block is the next power of two, the missing columns and the
  rows past the end are masked on load (-inf) and on store.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from common.kernels.entropy_patching.reference import apply_max_patch_length

HALO = 2                     # positions before a tile that the monotonic rule looks at
MAX_BLOCK_ELEMENTS = 16_384  # logits per program (block_len x padded vocab), held in registers
NUM_WARPS = 8


def default_block_len(length: int, vocab: int) -> int:
  """The smallest power of two >= length, capped at 64 and at MAX_BLOCK_ELEMENTS / padded vocab (>= HALO).
  A whole vocab row sits in one block: made for byte vocabularies (BLT's 260); a 32k-token vocab would
  leave 2-row blocks that spill registers, where the reference is the better choice."""
  budget = max(HALO, MAX_BLOCK_ELEMENTS // pl.next_power_of_2(vocab))
  block_len = HALO
  while block_len * 2 <= min(64, budget) and block_len < length:
    block_len *= 2
  return block_len


def _entropies(x: jax.Array) -> jax.Array:
  """[rows, vocab_block] f32 with -inf in masked columns -> [rows]: H = log sum e^z - sum e^z z / sum e^z,
  z = x - max x (Sec. 2.3). Terms with e^z = 0 (masked or -inf logits) contribute 0, not 0 * -inf."""
  z = x - jnp.max(x, axis=1, keepdims=True)
  e = jnp.exp(z)
  total = jnp.sum(e, axis=1)
  return jnp.log(total) - jnp.sum(jnp.where(e > 0, e * z, 0.0), axis=1) / total


def _shifted(h: jax.Array, h_halo: jax.Array, shift: int) -> jax.Array:
  """H(t - shift) for every t of the tile, from the tile's [block_len] and the halo's [HALO] entropies."""
  block_len = h.shape[0]
  t = jax.lax.broadcasted_iota(jnp.int32, (block_len, block_len), 0)
  j = jax.lax.broadcasted_iota(jnp.int32, (block_len, block_len), 1)
  from_tile = jnp.sum(jnp.where(j == t - shift, h[None, :], 0.0), axis=1)
  t = jax.lax.broadcasted_iota(jnp.int32, (block_len, HALO), 0)
  m = jax.lax.broadcasted_iota(jnp.int32, (block_len, HALO), 1)
  from_halo = jnp.sum(jnp.where(m - HALO == t - shift, h_halo[None, :], 0.0), axis=1)
  return from_tile + from_halo


def _kernel(threshold_ref, logits_ref, halo_ref, entropies_ref, starts_ref, counts_ref, *,
            length: int, vocab: int, monotonic: bool):
  block_len, vocab_block = logits_ref.shape
  first = pl.program_id(1) * block_len
  column_ok = jax.lax.broadcasted_iota(jnp.int32, (1, vocab_block), 1) < vocab
  position = first + jax.lax.broadcasted_iota(jnp.int32, (block_len,), 0)
  in_row = position < length
  logits = pltriton.load(logits_ref, mask=in_row[:, None] & column_ok, other=-jnp.inf)
  h = jnp.where(in_row, _entropies(logits.astype(jnp.float32)), 0.0)          # [block_len]

  halo_position = first - HALO + jax.lax.broadcasted_iota(jnp.int32, (HALO,), 0)
  halo_ok = halo_position >= 0
  halo = pltriton.load(halo_ref, mask=halo_ok[:, None] & column_ok, other=-jnp.inf)
  h_halo = jnp.where(halo_ok, _entropies(halo.astype(jnp.float32)), 0.0)      # [HALO]

  threshold = threshold_ref[...]                                                # [1]
  if monotonic:
    starts = (_shifted(h, h_halo, 1) - _shifted(h, h_halo, 2) > threshold) & (position >= 2)
  else:
    starts = (_shifted(h, h_halo, 1) > threshold) & (position >= 1)
  starts = (starts | (position == 0)) & in_row
  pltriton.store(entropies_ref, h, mask=in_row)
  pltriton.store(starts_ref, starts, mask=in_row)
  pltriton.store(counts_ref, jnp.cumsum(starts.astype(jnp.int32)), mask=in_row)


@functools.partial(jax.jit, static_argnames=("monotonic", "max_patch_length", "block_len", "interpret"))
def entropy_patching(logits: jax.Array, threshold, *, monotonic: bool = False, max_patch_length: int = 0,
                     extra_starts: jax.Array | None = None, block_len: int = 0,
                     interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """logits [batch, length, vocab] (f32 or bf16) -> (entropies f32, starts bool, patch_ids int32), each
  [batch, length]; the semantics of `reference.entropy_patching`. `block_len` (a power of two >= 2; 0 picks
  one) sets the tile; `interpret` runs the kernel in the Pallas interpreter (any backend)."""
  batch, length, vocab = logits.shape
  block_len = block_len or default_block_len(length, vocab)
  if block_len < HALO or block_len & (block_len - 1):
    raise ValueError(f"block_len must be a power of two >= {HALO}, got {block_len}")
  vocab_block = pl.next_power_of_2(vocab)
  tiles = pl.cdiv(length, block_len)
  row_spec = pl.BlockSpec((None, block_len), lambda b, i: (b, i))
  kernel = functools.partial(_kernel, length=length, vocab=vocab, monotonic=monotonic)
  entropies, starts, counts = pl.pallas_call(
      kernel,
      grid=(batch, tiles),
      in_specs=[
          pl.BlockSpec((1,), lambda b, i: (0,)),
          pl.BlockSpec((None, block_len, vocab_block), lambda b, i: (b, i, 0)),
          # The HALO rows before tile i: block index i * block_len / HALO - 1 (unused for i = 0).
          pl.BlockSpec((None, HALO, vocab_block),
                       lambda b, i: (b, jnp.maximum(i * (block_len // HALO) - 1, 0), 0)),
      ],
      out_specs=[row_spec, row_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct((batch, length), jnp.float32),
                 jax.ShapeDtypeStruct((batch, length), jnp.bool_),
                 jax.ShapeDtypeStruct((batch, length), jnp.int32)],
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret,
      name="entropy_patching",
  )(jnp.asarray(threshold, jnp.float32).reshape(1), logits, logits)
  if extra_starts is not None or max_patch_length > 0:
    starts = apply_max_patch_length(starts if extra_starts is None else starts | extra_starts, max_patch_length)
    return entropies, starts, jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1
  # Patches counted in the earlier tiles: the inclusive count at each full tile's last position.
  tile_totals = counts[:, block_len - 1::block_len][:, :tiles - 1]                     # [batch, tiles - 1]
  earlier = jnp.pad(jnp.cumsum(tile_totals, axis=1), ((0, 0), (1, 0)))                  # [batch, tiles]
  return entropies, starts, counts + jnp.repeat(earlier, block_len, axis=1)[:, :length] - 1
