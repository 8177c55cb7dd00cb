"""The BLT's architecture switches (blt.model.Ablations): each changes the parameters by exactly what its
modules hold, the decoder's patch scope and the encoder's k query slots attend where the paper and the
official code say (against dense masked references), the model stays causal under each, cached generation
equals recompute with every non-default switch on, and blt_flops moves by the hand-computed amount."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from blt.generate import Generator
from blt.hash_embed import HASH_BASES, HashNGramEmbed
from blt.model import BLT, Ablations, LocalDecoder, LocalEncoder, blt_model
from blt.patcher import patch
from common.config import ConfigError
from common.flops import blt_flops
from tests.blt.test_generate import _completed, _prompt_ids, _recompute, _rule

DL, DG, HEADS, N_ENC, N_DEC, TABLE, NS = 16, 32, 2, 2, 2, 31, 3  # NS: n-gram sizes 3..5
TINY = dict(d_local=DL, n_heads_local=HEADS, local_window=6, n_layers_encoder=N_ENC, n_layers_decoder=N_DEC,
            n_heads_cross=HEADS, d_global=DG, n_heads_global=HEADS, n_layers_global=1, hash_n_min=3, hash_n_max=5,
            hash_table_size=TABLE)
LENGTH = 32


def _model(seed=0, **switches):
  return BLT(blt_model(**TINY, **switches), rngs=nnx.Rngs(params=seed))


def _shapes(m) -> dict:
  """{parameter path: shape} of the BLT of config m, without computing any parameter."""
  state = nnx.state(nnx.eval_shape(lambda: BLT(m, rngs=nnx.Rngs(params=0))), nnx.Param)
  return {path: leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def _n_params(**switches) -> int:
  return sum(int(np.prod(shape)) for shape in _shapes(blt_model(**TINY, **switches)).values())


def test_missing_keys_read_as_todays_model():
  """A config written before the switches existed builds today's model: the same parameter paths and shapes,
  so its checkpoints load."""
  old = ml_collections.ConfigDict({k: v for k, v in blt_model(**TINY).items() if k not in Ablations._fields})
  assert Ablations.from_config(old) == Ablations()
  assert _shapes(old) == _shapes(blt_model(**TINY))


def test_parameter_counts_follow_each_switch():
  enc_cross = 2 * DL + 4 * DL * DL  # q_norm, kv_norm, wq, wk, wv, wo (d_l wide)

  def dec_cross(d_kv):  # q_norm (d_l), kv_norm (d_kv), wq and wo (d_l x d_l), wk and wv (d_kv x d_l)
    return DL + d_kv + 2 * DL * DL + 2 * d_kv * DL

  table = TABLE * DL
  base = _n_params()
  assert _n_params(encoder_cross="none") == base - enc_cross
  assert _n_params(encoder_cross="every") == base + (N_ENC - 1) * enc_cross
  for where in ("first", "last"):
    assert _n_params(decoder_cross=where) == base - (N_DEC - 1) * dec_cross(DG)
  for k in (0, 3):
    tables = {path[:4] for path in _shapes(blt_model(**TINY, hash_functions=k)) if "hash_embed" in str(path)}
    assert len(tables) == k * NS
    assert _n_params(hash_functions=k) == base + (k - 1) * NS * table
  k = 3  # to_slots d_l -> k d_l, to_global from k d_l, from_global d_g -> k d_l; decoder slots d_l wide
  extra = DL * k * DL + (k - 1) * DL * DG + DG * k * DL + N_DEC * (dec_cross(DL) - dec_cross(DG))
  assert _n_params(cross_attn_k=k) == base + extra
  # pooling only has no query slots: k shapes the decoder alone
  assert (_n_params(cross_attn_k=k, encoder_cross="none")
          == base - enc_cross + DG * k * DL + N_DEC * (dec_cross(DL) - dec_cross(DG)))
  assert _n_params(decoder_patch_scope="own") == base


@pytest.mark.parametrize("key, value, match", [
    ("cross_attn_k", 0, "model.cross_attn_k"), ("encoder_cross", "first", "model.encoder_cross"),
    ("decoder_cross", "none", "only path from the global model"), ("hash_functions", len(HASH_BASES) + 1,
                                                                    "model.hash_functions"),
    ("decoder_patch_scope", "previous", "model.decoder_patch_scope"), ("cross_attn_k", "two", "model.cross_attn_k")])
def test_bad_switches_name_their_key(key, value, match):
  m = ml_collections.ConfigDict({**blt_model(**TINY).to_dict(), key: value})
  with pytest.raises(ConfigError, match=match):
    Ablations.from_config(m)


def _python_hash(grams, base, size):
  """The paper's RollPolyHash (newest byte times a^0) in Python integers, then mod 2^32 and the table size."""
  return sum(b * base ** j for j, b in enumerate(reversed(grams))) % 2 ** 32 % size


def test_hash_functions_sum_their_own_tables():
  x = np.random.default_rng(0).integers(0, 256, (1, 9))
  emb = HashNGramEmbed(4, n_min=2, n_max=3, table_size=TABLE, n_functions=3, rngs=nnx.Rngs(params=0))
  tables = [np.asarray(t[...]) for t in emb.tables]
  out = np.asarray(emb(jnp.asarray(x, jnp.int32)))
  for i in range(2, 9):
    ref = sum(tables[f * 2 + j][_python_hash(x[0, i - n + 1:i + 1].tolist(), HASH_BASES[f], TABLE)]
              for f in range(3) for j, n in enumerate((2, 3)))
    np.testing.assert_allclose(out[0, i], ref, rtol=1e-6, atol=1e-6)
  none = HashNGramEmbed(4, n_min=2, n_max=3, table_size=TABLE, n_functions=0, rngs=nnx.Rngs(params=0))
  assert len(none.tables) == 0 and not np.asarray(none(jnp.asarray(x, jnp.int32))).any()


def test_encoder_slots_and_every_layer_cross_equal_dense_reference():
  """k = 2 query slots per patch and a cross-attention after each of 2 layers, against the official
  formulation: the slots as k x the queries, each with its patch's mask row repeated, over dense attention."""
  k, n_patches = 2, 5
  enc = LocalEncoder(blt_model(**TINY, cross_attn_k=k, encoder_cross="every"), rngs=nnx.Rngs(params=0))
  rng = np.random.default_rng(0)
  owner = jnp.asarray(np.sort(rng.integers(0, n_patches - 1, (2, 12)), axis=1))  # the last patch stays empty
  states = [jnp.asarray(rng.normal(size=(2, 12, DL)), jnp.float32) for _ in range(N_ENC)]

  def reference(enc, states, owner):
    mask = owner[:, None, :] == jnp.arange(n_patches)[None, :, None]  # [batch, patches, bytes]
    pooled = jnp.where(mask[..., None], states[0][:, None], -jnp.inf).max(2)
    x = enc.to_slots(jnp.where(mask.any(-1)[..., None], pooled, 0.0)).reshape(2, n_patches * k, DL)
    slot_mask = jnp.repeat(mask, k, axis=1)[:, None]  # [batch, 1, patches * k, bytes]
    for cross, h in zip([*enc.early_cross, enc.cross], states):
      x = x + cross(x, h, slot_mask)
    return enc.to_global(x.reshape(2, n_patches, k * DL))

  got = nnx.jit(lambda enc, states, owner: enc.patches(states, owner, n_patches))(enc, states, owner)
  np.testing.assert_allclose(got, nnx.jit(reference)(enc, states, owner), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scope, k", [("all", 1), ("own", 1), ("own", 2)])
def test_decoder_reads_the_patches_its_scope_allows(scope, k):
  """Perturbing the global output of patch j changes byte t's logits iff byte t reads patch j: j < readable
  (all earlier patches) or j == readable - 1 (its own, under 'own'; the official decoder mask). A local window
  of 1 keeps the decoder's self-attention from carrying what earlier bytes read."""
  m = blt_model(**{**TINY, "local_window": 1}, cross_attn_k=k, decoder_patch_scope=scope)
  dec = LocalDecoder(m, rngs=nnx.Rngs(params=0))
  rng = np.random.default_rng(0)
  n_patches, length = 6, 20
  rows = 1 + n_patches  # row 0 as drawn, row j + 1 with patch j's global output moved
  readable = (np.arange(length) + 1) // 4  # static patches of 4, official grouping
  global_out = np.repeat(rng.normal(size=(1, n_patches, DG)), rows, 0)
  global_out[np.arange(1, rows), np.arange(n_patches)] += 1.0
  h = jnp.broadcast_to(jnp.asarray(rng.normal(size=(1, length, DL)), jnp.float32), (rows, length, DL))
  positions = jnp.broadcast_to(jnp.arange(length), (rows, length))
  logits = nnx.jit(lambda dec, g, r, pos: dec(h, g, r, pos, jnp.ones_like(pos)))(
      dec, jnp.asarray(global_out, jnp.float32), jnp.broadcast_to(jnp.asarray(readable), (rows, length)), positions)
  for j in range(n_patches):
    moved = np.abs(np.asarray(logits[j + 1] - logits[0])).max(-1) > 1e-6
    reads = readable - 1 == j if scope == "own" else j < readable
    np.testing.assert_array_equal(moved, reads, err_msg=f"patch {j}")


def test_encoder_cross_every_changes_outputs_vs_last():
  """The same weights (the 'every' encoder has the early cross-attention besides): the patches differ, the
  byte states do not."""
  x = jnp.asarray(np.random.default_rng(0).integers(97, 123, (2, LENGTH)), jnp.int32)
  patch_ids = jnp.broadcast_to(jnp.arange(LENGTH) // 4, x.shape)
  positions, segs = jnp.broadcast_to(jnp.arange(LENGTH), x.shape), jnp.ones_like(x)
  last, every = (LocalEncoder(blt_model(**TINY, encoder_cross=c), rngs=nnx.Rngs(params=0)) for c in ("last", "every"))
  nnx.update(every, nnx.state(last, nnx.Param))
  run = nnx.jit(lambda enc: enc(x, patch_ids, LENGTH // 4, positions, segs))
  (h_last, p_last), (h_every, p_every) = run(last), run(every)
  np.testing.assert_array_equal(h_last, h_every)
  assert np.isfinite(p_every).all() and np.abs(np.asarray(p_last - p_every)).max() > 1e-3


# Every switch off its default, in two models (one compile each): a leak under any of them would show.
SWITCHES = [dict(cross_attn_k=2, encoder_cross="every", decoder_cross="first", hash_functions=3,
                 decoder_patch_scope="own"),
            dict(cross_attn_k=3, encoder_cross="none", decoder_cross="last", hash_functions=0)]


@pytest.mark.parametrize("switches", SWITCHES, ids=("slots-every-first-hash3-own", "slots-none-last-nohash"))
def test_changing_later_bytes_never_changes_earlier_logits(switches):
  """Row 0 is a text; row i + 1 changes its byte at cuts[i]: the logits before the cut stay, and those at the cut
  move (space patching, so the patch boundaries after the cut move too)."""
  cuts = (5, 14, 23)
  model = _model(**switches)
  rng = np.random.default_rng(1)
  text = rng.choice(np.frombuffer(b"abcdefgh  ,.", np.uint8), LENGTH)
  rows = np.repeat(text[None], 1 + len(cuts), 0).astype(np.int32)
  for i, cut in enumerate(cuts):
    rows[i + 1, cut] = ord(" ") if rows[0, cut] != ord(" ") else ord("z")
  x = jnp.asarray(rows)
  p = patch(x, method="space", max_patches=LENGTH, max_patch_length=6)
  logits = np.asarray(nnx.jit(lambda m, x, p: m(x, p.patch_ids, LENGTH, next_patch_ids=p.next_patch_ids))(model, x, p))
  for i, cut in enumerate(cuts):
    np.testing.assert_array_equal(logits[i + 1, :cut], logits[0, :cut])
    assert np.abs(logits[i + 1, cut] - logits[0, cut]).max() > 1e-4


def test_cached_generation_equals_recompute_with_every_switch_on():
  """k = 2 slots, cross-attention after every encoder layer, one decoder cross-attention, 2 hash functions
  and the 'own' patch scope at once (the cases of tests/blt/test_generate.py, one compile)."""
  model = BLT(blt_model(d_local=32, n_heads_local=2, local_window=6, n_layers_encoder=2, n_heads_cross=2,
                        d_global=48, n_heads_global=2, n_layers_global=2, hash_n_max=5, hash_table_size=101,
                        cross_attn_k=2, encoder_cross="every", decoder_cross="last", hash_functions=2,
                        decoder_patch_scope="own"), rngs=nnx.Rngs(params=0))
  rule, prompt, n_new = _rule("space", None), _prompt_ids(), 17
  ref_ids, ref_logits, ref_starts = _recompute(model, rule, None, prompt, n_new)
  gen = Generator(model, rule, max_len=prompt.shape[1] + n_new).run(prompt, n_new)
  np.testing.assert_array_equal(gen.patch_starts, ref_starts[:, :-1])
  np.testing.assert_array_equal(gen.byte_ids, ref_ids)
  np.testing.assert_allclose(gen.logits, ref_logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(gen.global_steps, _completed(model, ref_starts))


def _flops_cfg(**switches):
  m = blt_model(d_local=8, n_heads_local=2, local_window=0, n_layers_encoder=1, n_layers_decoder=1, n_heads_cross=2,
                d_global=16, n_layers_global=1, n_heads_global=2, **switches)
  m.patching = ml_collections.ConfigDict(dict(method="static", patch_size=4, max_patches=0, threshold=0.0,
                                              max_patch_length=0))
  return m


def test_flops_follow_slots_scope_and_pooling():
  """The toy of tests/blt/test_flops.py (d_l 8, d_g 16, L 16, P 4: N = 4 patches, 1/4 per byte), 11736 by
  default."""
  base = blt_flops(_flops_cfg(), 16).forward
  assert base == pytest.approx(11736)
  # k = 2, encoder: slots 2*8*16/4, q and o 2*64*(2-1)/4 each, to_global 2*8*16*(2-1)/4, attention 4*8*(2-1);
  # decoder: d_g -> 2 d_l once per patch 2*16*16/4, k and v unchanged (2*8*8*2/4 = 2*16*8/4), attention
  # 4*8*(2-1)*(4-1)/2.
  assert blt_flops(_flops_cfg(cross_attn_k=2), 16).forward == pytest.approx(base + 64 + 32 + 32 + 64 + 32 + 128 + 48)
  # own patch: 4*8*1 attention instead of 4*8*(4-1)/2
  assert blt_flops(_flops_cfg(decoder_patch_scope="own"), 16).forward == pytest.approx(base - 16)
  # pooling only: no q (2*64/4), k, v (2*64 each), o (2*64/4), attention (4*8)
  assert blt_flops(_flops_cfg(encoder_cross="none"), 16).forward == pytest.approx(base - 352)
  assert blt_flops(_flops_cfg(hash_functions=3), 16).forward == base  # lookups
