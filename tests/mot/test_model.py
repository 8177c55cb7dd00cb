"""Mixture-of-Transformers (mot.model, common.nn.modality_routing): the modality grouping routes every token
exactly once, untied layers with one modality are the dense layers, the untied model equals a slow masking
reference, global attention is causal across modality boundaries (bidirectional within an image in the
Transfusion setting), and one training step does not depend on the mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from common.models.dense_lm import DenseLM
from tests.mesh_invariance import assert_train_step_mesh_invariant
from common.nn.modality_routing import (ModalityLinear, from_groups, group_by_modality, per_row, to_groups)
from mot.configs.base import mot_model
from mot.model import MoTLM
from mot.train import build_mot_model
from mot.transfusion import TransfusionLM, transfusion_loss, transfusion_mask

VOCAB, B, L = 128, 2, 24
SHAPES = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, grouped_impl="xla_tiles")


CFG3 = mot_model(**SHAPES, n_modalities=3)  # untied, text + image + audio


def _compiled_forward(model):
  """fn(any model with `model`'s structure, tokens, modality) -> logits, compiled once for all of them."""
  graphdef = nnx.graphdef(model)
  forward = jax.jit(lambda state, tokens, modality: nnx.merge(graphdef, state)(tokens, None, None, modality))
  return lambda m, tokens, modality: forward(nnx.state(m), tokens, modality)


@pytest.fixture(scope="module")
def forward3():
  return _compiled_forward(MoTLM(CFG3, rngs=nnx.Rngs(params=0)))


@pytest.fixture(scope="module")
def dense_logits():
  """(the dense LM of CFG3's shapes, its logits of `_tokens(0)`)."""
  dense = DenseLM(CFG3.copy_and_resolve_references(), rngs=nnx.Rngs(params=1))
  return dense, jax.jit(lambda t: dense(t))(_tokens(0)[0])


def _tokens(seed=0, n_modalities=3):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, (B, L)).astype(np.int32)
  modality = rng.integers(0, n_modalities, (B, L)).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(modality)


# ------------------------------------------------------------------------------------------ the grouping


def test_grouping_is_a_stable_sort_that_routes_every_token_exactly_once():
  modality = jnp.asarray(np.random.default_rng(1).integers(0, 3, (3, 17)), jnp.int32)
  g = group_by_modality(modality, 3)
  flat = np.asarray(modality).reshape(-1)
  np.testing.assert_array_equal(g.order, np.argsort(flat, kind="stable"))
  np.testing.assert_array_equal(np.sort(g.order), np.arange(flat.size))  # a permutation: each token once
  np.testing.assert_array_equal(np.asarray(g.inverse)[np.asarray(g.order)], np.arange(flat.size))
  np.testing.assert_array_equal(g.sizes, np.bincount(flat, minlength=3))
  np.testing.assert_array_equal(g.modality, np.sort(flat))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 17, 5)), jnp.float32)
  rows = to_groups(x, g)
  np.testing.assert_array_equal(rows, np.asarray(x).reshape(-1, 5)[np.argsort(flat, kind="stable")])
  np.testing.assert_array_equal(from_groups(rows, g, (3, 17)), x)


def test_an_absent_modality_gets_an_empty_group():
  g = group_by_modality(jnp.asarray([[2, 0, 2, 0]]), 3)
  np.testing.assert_array_equal(g.sizes, [2, 0, 2])
  np.testing.assert_array_equal(g.order, [1, 3, 0, 2])


def test_moving_rows_has_the_gradient_of_a_gather():
  modality = jnp.asarray(np.random.default_rng(3).integers(0, 3, (2, 9)), jnp.int32)
  g = group_by_modality(modality, 3)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 9, 4)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(5).normal(size=(18, 4)), jnp.float32)
  ours = jax.grad(lambda x: jnp.sum(jnp.sin(to_groups(x, g)) * w))(x)
  plain = jax.grad(lambda x: jnp.sum(jnp.sin(x.reshape(-1, 4)[g.order]) * w))(x)
  np.testing.assert_allclose(ours, plain, rtol=1e-6)
  back = jax.grad(lambda r: jnp.sum(jnp.cos(from_groups(r, g, (2, 9))) * x))(w)
  back_plain = jax.grad(lambda r: jnp.sum(jnp.cos(r[g.inverse].reshape(2, 9, 4)) * x))(w)
  np.testing.assert_allclose(back, back_plain, rtol=1e-6)


@pytest.mark.parametrize("impl", ["xla_tiles", "reference"])
def test_modality_linear_multiplies_each_row_by_its_own_modality_weight(impl):
  modality = jnp.asarray(np.random.default_rng(6).integers(0, 3, (2, 40)), jnp.int32)
  g = group_by_modality(modality, 3)
  layer = ModalityLinear(3, 8, (2, 3), axes=("embed", "heads", "head_dim"), rngs=nnx.Rngs(params=0))
  x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 40, 8)), jnp.float32)
  got = from_groups(layer(to_groups(x, g), g, impl=impl), g, (2, 40))
  w = np.asarray(layer.kernel[...], np.float64)
  want = np.einsum("bld,bldhe->blhe", np.asarray(x, np.float64), w[np.asarray(modality)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(per_row(jnp.asarray(w[:, 0, :, 0]), g), w[np.sort(np.asarray(modality).ravel()), 0, :, 0])


# ------------------------------------------------------------------------------------------ the model


def _dense_weights_into_mot(dense: DenseLM, mot: MoTLM) -> None:
  """Every modality's weights of `mot` := the dense model's (norm scales, projections, FFN, embeddings)."""
  def copy(target, source):
    target[...] = jnp.broadcast_to(source[...], target[...].shape)
  copy(mot.embed.embedding, dense.embed.embedding)
  copy(mot.transformer.final_norm.scale, dense.final_norm.scale)
  for ours, theirs in zip(mot.transformer.blocks, dense.blocks):
    for name in ("attn_norm", "ffn_norm"):
      copy(getattr(ours, name).scale, getattr(theirs, name).scale)
    for name in ("q_norm", "k_norm"):
      copy(getattr(ours, name).scale, getattr(theirs.attn, name).scale)
    for name in ("q", "k", "v", "o"):
      copy(getattr(ours, name).kernel, getattr(theirs.attn, name).kernel)
    for name in ("gate", "up", "down"):
      copy(getattr(ours, name).kernel, getattr(theirs.ffn, name).kernel)


@pytest.mark.parametrize("n_modalities,untied", [(1, True), (3, False)])
def test_untied_layers_with_one_modality_equal_the_dense_layers(n_modalities, untied, dense_logits):
  dense, want = dense_logits
  mot = MoTLM(mot_model(**SHAPES, n_modalities=n_modalities, untied=untied), rngs=nnx.Rngs(params=2))
  _dense_weights_into_mot(dense, mot)
  tokens, modality = _tokens(0)
  np.testing.assert_allclose(_compiled_forward(mot)(mot, tokens, modality), want, rtol=1e-5, atol=1e-5)


def test_untied_model_with_every_modality_given_the_dense_weights_equals_the_dense_model(dense_logits, forward3):
  """Sorting, grouped products and putting rows back must be invisible when the weights agree."""
  dense, want = dense_logits
  mot = MoTLM(CFG3, rngs=nnx.Rngs(params=2))
  _dense_weights_into_mot(dense, mot)
  tokens, modality = _tokens(0)
  np.testing.assert_allclose(forward3(mot, tokens, modality), want, rtol=1e-5, atol=1e-5)


def _masking_reference(mot: MoTLM, tokens, modality):
  """The MoT forward pass without any sorting: every modality's weights on every token, then each token
  keeps its own modality's result (n_modalities x the FLOPs)."""
  from common.nn.attention import attention_mask, dot_product_attention
  from common.nn.rope import apply_rope, rope_frequencies
  cfg = mot.cfg
  hd = cfg.d_model // cfg.n_heads
  onehot = jax.nn.one_hot(modality, cfg.n_modalities)  # [B, L, M]
  pick = lambda y: jnp.einsum("blm...,blm->bl...", y, onehot)

  def norm(x, scale):  # scale [M, dim]
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)
    scale = jnp.einsum("blm,md->bld", onehot, scale)
    return x * (scale[:, :, None] if x.ndim == 4 else scale)

  lin = lambda x, w: pick(jnp.einsum("bld,md...->blm...", x, w))
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  seg = jnp.ones((B, L), jnp.int32)
  inv = rope_frequencies(hd, cfg.rope_theta)
  x = mot.embed(tokens)
  for blk in mot.transformer.blocks:
    h = norm(x, blk.attn_norm.scale[...])
    q, k, v = lin(h, blk.q.kernel[...]), lin(h, blk.k.kernel[...]), lin(h, blk.v.kernel[...])
    q, k = norm(q, blk.q_norm.scale[...]), norm(k, blk.k_norm.scale[...])
    q, k = apply_rope(q, positions, inv), apply_rope(k, positions, inv)
    out = dot_product_attention(q, k, v, attention_mask(seg, seg)).reshape(B, L, -1)
    x = x + lin(out, blk.o.kernel[...])
    h = norm(x, blk.ffn_norm.scale[...])
    x = x + lin(jax.nn.silu(lin(h, blk.gate.kernel[...])) * lin(h, blk.up.kernel[...]), blk.down.kernel[...])
  return mot.embed.attend(mot.transformer.final_norm(x))


def test_untied_model_equals_a_masking_reference(forward3):
  mot = MoTLM(CFG3, rngs=nnx.Rngs(params=3))
  tokens, modality = _tokens(2)
  want = jax.jit(lambda t, m: _masking_reference(mot, t, m))(tokens, modality)
  np.testing.assert_allclose(forward3(mot, tokens, modality), want, rtol=2e-5, atol=2e-5)


def test_modality_weights_matter(forward3):
  mot = MoTLM(CFG3, rngs=nnx.Rngs(params=4))
  tokens, modality = _tokens(3)
  flipped = modality.at[0, 5].set((modality[0, 5] + 1) % 3)
  a, b = forward3(mot, tokens, modality), forward3(mot, tokens, flipped)
  assert not np.allclose(a[0, 5], b[0, 5], atol=1e-4)
  np.testing.assert_allclose(a[0, :5], b[0, :5], rtol=1e-5, atol=1e-6)  # earlier positions: causal


def test_global_attention_is_causal_across_modality_boundaries_and_reaches_other_modalities(forward3):
  mot = MoTLM(CFG3, rngs=nnx.Rngs(params=5))
  tokens = jnp.asarray(np.random.default_rng(8).integers(3, VOCAB, (B, L)), jnp.int32)
  modality = jnp.asarray([[0] * 6 + [1] * 8 + [2] * 4 + [0] * 6] * B, jnp.int32)  # text, image, audio, text
  run = lambda t: forward3(mot, t, modality)
  base = run(tokens)
  later = run(tokens.at[0, 10].set(7))  # an image token changes
  np.testing.assert_allclose(later[0, :10], base[0, :10], rtol=1e-5, atol=1e-6)
  assert not np.allclose(later[0, 14:], base[0, 14:], atol=1e-4)  # later audio and text see the image
  earlier = run(tokens.at[0, 2].set(7))  # a text token changes
  assert not np.allclose(earlier[0, 6:14], base[0, 6:14], atol=1e-4)  # image tokens see the earlier text


# ------------------------------------------------------------------------------------------ Transfusion


def test_transfusion_mask_is_causal_or_same_image():
  seg = jnp.asarray([[1, 1, 1, 1, 1, 1, 2, 2]])
  img = jnp.asarray([[0, 1, 1, 1, 0, 0, 1, 1]])  # image 1 of document 1; image 1 of document 2
  got = np.asarray(transfusion_mask(seg, img))[0, 0]
  want = np.zeros((8, 8), bool)
  for q in range(8):
    for k in range(8):
      same_doc = seg[0, q] == seg[0, k]
      want[q, k] = same_doc and (k <= q or (img[0, q] > 0 and img[0, q] == img[0, k]))
  np.testing.assert_array_equal(got, want)


def _transfusion_batch(length=16):
  rng = np.random.default_rng(9)
  image_ids = np.zeros((1, length), np.int32)
  image_ids[0, 5:9] = 1
  image_ids[0, 11:14] = 2
  tokens = rng.integers(3, VOCAB, (1, length)).astype(np.int32)
  return dict(inputs=tokens, positions=np.arange(length)[None].astype(np.int32),
              segment_ids=np.ones((1, length), np.int32), modality=(image_ids > 0).astype(np.int32),
              image_ids=image_ids, patches=rng.normal(size=(1, length, 12)).astype(np.float32),
              timesteps=np.where(image_ids > 0, 500, 0).astype(np.int32))


@pytest.fixture(scope="module")
def transfusion():
  cfg = mot_model(**SHAPES, setting="transfusion", patch_dim=12, patches_per_image=4,
                  diffusion=dict(loss_weight=3.0))
  return TransfusionLM(cfg, rngs=nnx.Rngs(params=6))


def test_transfusion_attention_is_bidirectional_within_an_image_and_causal_elsewhere(transfusion):
  model = transfusion
  b = _transfusion_batch()
  forward = jax.jit(lambda patches, tokens: model(tokens, b["positions"], b["segment_ids"], b["modality"],
                                                   b["image_ids"], patches, b["timesteps"]))
  run = lambda patches, tokens=b["inputs"]: forward(patches, tokens)
  base_logits, base_eps = run(b["patches"])
  logits, eps = run(_with(b["patches"], (0, 8), 1.0))  # the last patch of image 1 changes
  assert not np.allclose(eps[0, 5:8], base_eps[0, 5:8], atol=1e-5)  # earlier patches of the image see it
  np.testing.assert_allclose(eps[0, :5], base_eps[0, :5], rtol=1e-5, atol=1e-6)  # text before: causal
  np.testing.assert_allclose(logits[0, :5], base_logits[0, :5], rtol=1e-5, atol=1e-6)
  assert not np.allclose(eps[0, 11:14], base_eps[0, 11:14], atol=1e-5)  # the later image sees it
  _, eps = run(b["patches"], _with(b["inputs"], (0, 10), 7))  # a text token between the images changes
  np.testing.assert_allclose(eps[0, :10], base_eps[0, :10], rtol=1e-5, atol=1e-6)  # image 1 is before it
  _, eps = run(_with(b["patches"], (0, 12), 1.0))
  np.testing.assert_allclose(eps[0, :11], base_eps[0, :11], rtol=1e-5, atol=1e-6)  # image 2 is not image 1
  assert not np.allclose(eps[0, 11], base_eps[0, 11], atol=1e-5)


def _with(array, index, value):
  out = np.array(array)
  out[index] = value
  return out


def test_transfusion_loss_is_text_nll_plus_lambda_times_noise_mse(transfusion):
  model = transfusion
  b = _transfusion_batch()
  text = (b["image_ids"] == 0) & (np.roll(b["image_ids"], -1, axis=1) == 0)
  batch = dict(b, targets=np.roll(b["inputs"], -1, axis=1), loss_mask=text.astype(np.float32))
  total, weight, sums = jax.jit(lambda batch: transfusion_loss(model, batch))(batch)
  np.testing.assert_allclose(total, sums["nll/text"] + 3.0 * sums["mse/image"], rtol=1e-6)
  assert float(sums["weight/image"]) == 7 and float(weight) == text.sum() + 7
  assert 0.3 < float(sums["mse/image"]) / 7 < 3.0  # an untrained noise predictor: MSE of order 1


# ------------------------------------------------------------------------------------------ mesh invariance


def test_one_mot_training_step_is_the_same_on_every_mesh():
  """The shared train step of an untied 3-modality MoT on 1 device and on data 2 x fsdp 2 x tensor 2:
  placement only, never the loss or the updated parameters (beyond float rounding)."""
  from common.configs.base import base_config
  from common.tasks.base import Task
  cfg = base_config()
  cfg.model = mot_model(**dict(SHAPES, n_layers=1), n_modalities=3)  # one layer: compiling 8 devices is slow
  cfg.train.update(batch_size=8, warmup_steps=1)
  rng = np.random.default_rng(10)
  tokens = rng.integers(3, VOCAB, (8, L + 1)).astype(np.int32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones((8, L), np.float32),
               positions=np.tile(np.arange(L), (8, 1)).astype(np.int32), segment_ids=np.ones((8, L), np.int32),
               modality=rng.integers(0, 3, (8, L)).astype(np.int32))

  def loss_fn(model, batch):
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"], batch["modality"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * batch["loss_mask"]
    return jnp.sum(nll), jnp.sum(batch["loss_mask"]), {}

  task = Task(build_model=lambda: build_mot_model(cfg.model, seed=0), loss_fn=loss_fn, data=None,
              train_flops_per_example=1.0, units_per_example=L)
  assert_train_step_mesh_invariant(task, cfg.train, batch)


# ------------------------------------------------------------------------------------------ FLOPs


def test_mot_flops_are_the_dense_flops_and_transfusion_adds_its_patch_and_timestep_products():
  from common import flops
  cfg = mot_model(**SHAPES, n_modalities=3)
  dense = flops.dense_lm_flops(cfg, 64)
  assert flops.flops_for(cfg, 64).forward == dense.forward
  tf = mot_model(**SHAPES, setting="transfusion", patch_dim=12)
  d = SHAPES["d_model"]
  assert flops.flops_for(tf, 64).forward - dense.forward == 4 * d * 12 + 4 * d * d


def test_transfusion_flop_count_matches_xla():
  """The dense Transfusion backbone (one weight group: plain products, which XLA counts) at d 256: the
  analytic non-causal count (what the masked attention executes) within 5% of XLA's, which also counts the
  element-wise work."""
  from common import flops
  cfg = mot_model(vocab_size=384, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=1024, untied=False,
                  setting="transfusion", patch_dim=48)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: TransfusionLM(cfg, rngs=nnx.Rngs(params=0))))
  batch, length = 2, 64
  ints = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  args = (ints,) * 5 + (jax.ShapeDtypeStruct((batch, length, 48), jnp.float32), ints)
  cost = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a)).lower(params, *args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = flops.flops_for(cfg, length, causal=False).forward * batch * length
  assert abs(float(cost["flops"]) - analytic) / analytic < 0.05, (cost["flops"], analytic)
