"""Mixture-of-Transformers (mot.model, common.nn.modality_routing): the modality grouping routes every token
exactly once, untied layers with one modality are the dense layers, the untied model equals a slow masking
reference, the post-norm block equals a hand-written float64 block and keeps modalities' gradients apart,
global attention is causal across modality boundaries (bidirectional within an image in the Transfusion
setting, whose loss weighs two means and whose caption dropout computes the empty-caption document), and
one training step does not depend on the mesh."""
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
from common.nn.training_rng import training_rng
from mot import transfusion as transfusion_module
from mot.model import AttentionInputs, MoTLM
from mot.train import build_mot_model
from mot.transfusion import TransfusionLM, drop_captions, transfusion_loss, transfusion_mask

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


def _post_norm_block_reference(blk, x, modality, eps, rope_theta):
  """One post-norm MoT layer in float64 numpy (Chameleon sec. 2.3, MoT Algorithm 1): h = x + norm_m(attn(x)),
  out = h + norm_m(ffn(h)), the weights and norm scales of each token's modality m, QK-norm, RoPE over
  half-split pairs, grouped-query causal attention over the whole mixed sequence."""
  m = np.asarray(modality)
  w = lambda p: np.asarray(p[...], np.float64)
  b, length, _ = x.shape

  def rms(v, scale):  # scale [M, dim]: each token's modality's row
    s = scale[m] if v.ndim == 3 else scale[m][:, :, None]
    return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + eps) * s

  lin = lambda v, kernel: np.einsum("bli,bli...->bl...", v, kernel[m])
  q, k, v = lin(x, w(blk.q.kernel)), lin(x, w(blk.k.kernel)), lin(x, w(blk.v.kernel))  # [B, L, heads, hd]
  q, k = rms(q, w(blk.q_norm.scale)), rms(k, w(blk.k_norm.scale))
  hd = q.shape[-1]
  angles = np.arange(length)[:, None] * (1.0 / rope_theta ** (np.arange(0, hd, 2) / hd))  # [L, hd / 2]
  cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
  rot = lambda t: np.concatenate([t[..., :hd // 2] * cos - t[..., hd // 2:] * sin,
                                  t[..., hd // 2:] * cos + t[..., :hd // 2] * sin], -1)
  q, k = rot(q), rot(k)
  group = q.shape[2] // k.shape[2]  # query head i reads key/value head i // group
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
  scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  attn = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, -1)
  h = x + rms(lin(attn, w(blk.o.kernel)), w(blk.attn_norm.scale))
  gate, up = lin(h, w(blk.gate.kernel)), lin(h, w(blk.up.kernel))
  return h + rms(lin(gate / (1 + np.exp(-gate)) * up, w(blk.down.kernel)), w(blk.ffn_norm.scale))


def _randomize_norm_scales(model, seed):
  """Norm scales start at 1 for every modality; random ones make a wrong modality's scale visible."""
  rng = np.random.default_rng(seed)
  for path, param in nnx.iter_graph(model):
    if path and path[-1] == "scale" and isinstance(param, nnx.Param):
      param[...] = jnp.asarray(rng.uniform(0.5, 1.5, param[...].shape), jnp.float32)


def test_post_norm_block_equals_a_hand_written_reference_block():
  cfg = mot_model(**dict(SHAPES, n_layers=1), n_modalities=3, norm_placement="post")
  mot = MoTLM(cfg, rngs=nnx.Rngs(params=11))
  _randomize_norm_scales(mot, 12)
  blk = mot.transformer.blocks[0]
  rng = np.random.default_rng(13)
  x = rng.normal(size=(B, L, cfg.d_model)).astype(np.float32)
  modality = jnp.asarray(rng.integers(0, 3, (B, L)), jnp.int32)
  groups = group_by_modality(modality, 3)
  ctx = AttentionInputs(jnp.broadcast_to(jnp.arange(L), (B, L)), jnp.ones((B, L), jnp.int32), None)
  run = jax.jit(lambda x: from_groups(blk(to_groups(x, groups), groups, ctx), groups, (B, L)))
  want = _post_norm_block_reference(blk, np.asarray(x, np.float64), modality, cfg.norm_eps, cfg.rope_theta)
  np.testing.assert_allclose(run(jnp.asarray(x)), want, rtol=1e-4, atol=1e-4)
  blk.post_norm = False  # the same weights as pre-norms: another function
  assert not np.allclose(jax.jit(lambda x: from_groups(blk(to_groups(x, groups), groups, ctx), groups, (B, L)))(
      jnp.asarray(x)), want, atol=1e-2)


def test_post_norm_mot_on_a_pure_text_batch_equals_the_dense_model_of_its_text_weights():
  """The post-norm dense baseline is MoT with one weight group; untied MoT on text alone must be it."""
  shapes = dict(SHAPES, n_layers=1)
  mot = MoTLM(mot_model(**shapes, n_modalities=3, norm_placement="post"), rngs=nnx.Rngs(params=14))
  _randomize_norm_scales(mot, 15)
  dense = MoTLM(mot_model(**shapes, untied=False, norm_placement="post"), rngs=nnx.Rngs(params=16))
  mot_state, dense_state = nnx.state(mot, nnx.Param), nnx.state(dense, nnx.Param)
  nnx.update(dense, jax.tree.map(lambda d, m: m if m.shape == d.shape else m[:1], dense_state, mot_state))
  tokens, _ = _tokens(4)
  text = jnp.zeros((B, L), jnp.int32)
  want = jax.jit(lambda t: dense(t, None, None, text))(tokens)
  np.testing.assert_allclose(_compiled_forward(mot)(mot, tokens, text), want, rtol=1e-5, atol=1e-5)
  _, modality = _tokens(4)
  assert not np.allclose(_compiled_forward(mot)(mot, tokens, modality), want, atol=1e-3)


def test_post_norm_keeps_each_modality_s_weights_out_of_other_modalities_gradients():
  mot = MoTLM(mot_model(**dict(SHAPES, n_layers=1), n_modalities=3, norm_placement="post"), rngs=nnx.Rngs(params=17))
  tokens, _ = _tokens(5)
  text = jnp.zeros((B, L), jnp.int32)
  loss = lambda model: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      model(tokens[:, :-1], None, None, text[:, :-1]), tokens[:, 1:]))
  grads = nnx.jit(nnx.grad(loss))(mot)
  untied = {".".join(map(str, path)): g[...] for path, g in nnx.iter_graph(grads)
            if isinstance(g, nnx.Variable) and path[0] == "transformer" and path[1] == "blocks"}
  assert len(untied) == 11  # q k v o, q/k norms, the two norms, gate up down
  for name, g in untied.items():
    assert float(jnp.sum(jnp.abs(g[1:]))) == 0.0, name  # image and audio slices: untouched by text
    assert float(jnp.sum(jnp.abs(g[0]))) > 0.0, name


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


def _fixed_noise(schedule, patches, image_ids, key):
  """`noise_images` with noise and timesteps that are functions of each row alone (a duplicated row gets its
  original's), so that batches of duplicated rows can be compared exactly."""
  noise = jnp.sin(3.0 * patches + 1.0)
  timesteps = jnp.where(image_ids > 0, 300 + 50 * image_ids, 0)
  return transfusion_module.diffusion.q_sample(patches, timesteps, noise, schedule), timesteps, noise


def test_transfusion_loss_is_the_text_mean_plus_lambda_times_the_image_mean_whatever_the_image_share(
    transfusion, monkeypatch):
  """Transfusion sec. 3.3: L = L_LM + lambda L_DDPM, each its own mean. A batch of a text row (all the text
  targets) and an image row (all the patches; its text is context only): duplicating either changes the
  image share but neither mean nor L; the old sum over both divided by all tokens moves with the share."""
  monkeypatch.setattr(transfusion_module, "noise_images", _fixed_noise)
  model, b = transfusion, _transfusion_batch()
  b = dict(b, targets=np.roll(b["inputs"], -1, axis=1), loss_mask=np.zeros((1, 16), np.float32))
  text_row = dict(b, image_ids=np.zeros_like(b["image_ids"]), modality=np.zeros_like(b["modality"]),
                  loss_mask=np.ones((1, 16), np.float32))
  batch_of = lambda rows: {k: np.concatenate([r[k] for r in rows]) for k in b}

  loss = jax.jit(lambda batch: transfusion_loss(model, batch))
  forward = jax.jit(lambda batch: model(batch["inputs"], batch["positions"], batch["segment_ids"], batch["modality"],
                                        batch["image_ids"], *_fixed_noise(model.schedule, batch["patches"],
                                                                          batch["image_ids"], None)[:2]))
  objectives, old = [], []
  for rows in ([text_row, text_row, b, b], [text_row, b, b, b], [text_row, text_row, text_row, b]):  # one shape
    batch = batch_of(rows)
    total, weight, sums = loss(batch)
    logits, eps = (np.asarray(a, np.float64) for a in forward(batch))  # the two means by hand
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    ce_mean = np.sum(nll * batch["loss_mask"]) / batch["loss_mask"].sum()
    image = batch["image_ids"] > 0
    mse_mean = np.mean((eps - np.sin(3.0 * batch["patches"] + 1.0))[image] ** 2)
    np.testing.assert_allclose(float(total) / float(weight), ce_mean + 3.0 * mse_mean, rtol=1e-5)
    assert float(weight) == batch["loss_mask"].sum() + image.sum()
    objectives.append(float(total) / float(weight))
    old.append(float(sums["nll/text"] + 3.0 * sums["mse/image"]) / float(weight))
  np.testing.assert_allclose(objectives, objectives[0], rtol=1e-5)
  assert max(old) - min(old) > 0.05 * abs(old[0])  # the old formula's lambda follows the image share
  assert 0.3 < mse_mean < 3.0  # an untrained noise predictor: MSE of order 1


def _caption_rows(caption_len: int):
  """One packed row: a text document, then `BOS caption <boi> image(4) <eoi>` (segment 2), then padding; the
  caption's ids, the image's patches and its timestep are fixed, so two rows differ only in the caption."""
  length, rng = 24, np.random.default_rng(18)
  doc1 = rng.integers(3, VOCAB, 4)
  doc2 = np.concatenate([[0], rng.integers(3, VOCAB, caption_len), [100], np.full(4, 120), [101]])
  inputs = np.zeros((1, length), np.int32)
  inputs[0, :4], inputs[0, 4:4 + len(doc2)] = doc1, doc2
  segment_ids = np.zeros((1, length), np.int32)
  segment_ids[0, :4], segment_ids[0, 4:4 + len(doc2)] = 1, 2
  positions = np.zeros((1, length), np.int32)
  positions[0, :4], positions[0, 4:4 + len(doc2)] = np.arange(4), np.arange(len(doc2))
  image_ids = np.zeros((1, length), np.int32)
  first = 4 + caption_len + 2
  image_ids[0, first:first + 4] = 1
  patches = np.zeros((1, length, 12), np.float32)
  patches[0, first:first + 4] = np.random.default_rng(19).normal(size=(4, 12))
  return dict(inputs=inputs, positions=positions, segment_ids=segment_ids, modality=(image_ids > 0).astype(np.int32),
              image_ids=image_ids, patches=patches, timesteps=np.where(image_ids > 0, 400, 0).astype(np.int32)), first


def test_a_dropped_caption_computes_the_empty_caption_document_exactly(transfusion):
  """Caption dropout (classifier-free guidance): the image of `BOS caption <boi> image` with its caption
  dropped gets the noise prediction of `BOS <boi> image`, and what follows it the same logits; the text
  document before it is untouched."""
  model = transfusion
  run = jax.jit(lambda r, positions, hidden: model(r["inputs"], positions, r["segment_ids"], r["modality"],
                                                   r["image_ids"], r["patches"], r["timesteps"], hidden))
  with_caption, first = _caption_rows(5)
  empty, first_empty = _caption_rows(0)
  dropped = jnp.ones((1, 25), bool)
  positions, hidden = drop_captions(with_caption["positions"], with_caption["segment_ids"], with_caption["image_ids"],
                                    dropped)
  np.testing.assert_array_equal(positions[0, first - 1:first + 5], np.arange(1, 7))  # <boi> at 1, as if empty
  logits, eps = run(with_caption, positions, hidden)
  want_logits, want_eps = run(empty, jnp.asarray(empty["positions"]), None)
  span, span_empty = slice(first - 1, first + 5), slice(first_empty - 1, first_empty + 5)  # <boi> .. <eoi>
  np.testing.assert_allclose(eps[0, span], want_eps[0, span_empty], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[0, span], want_logits[0, span_empty], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[0, :4], want_logits[0, :4], rtol=1e-5, atol=1e-5)
  kept, kept_eps = run(with_caption, jnp.asarray(with_caption["positions"]), None)  # the conditional image
  assert not np.allclose(kept_eps[0, first:first + 4], eps[0, first:first + 4], atol=1e-4)
  keep = drop_captions(with_caption["positions"], with_caption["segment_ids"], with_caption["image_ids"],
                       jnp.zeros((1, 25), bool))
  np.testing.assert_array_equal(keep[0], with_caption["positions"])
  assert not bool(jnp.any(keep[1]))


def test_caption_dropout_draws_per_document_in_training_only(transfusion, monkeypatch):
  """With caption_dropout 1, training (a training key) computes the image with its caption dropped and at 0
  with it kept, evaluation (no key) never drops; a draw of each document's decision moves all of that
  document's positions or none."""
  monkeypatch.setattr(transfusion_module, "noise_images", _fixed_noise)  # the same noise whatever the key
  model = transfusion
  rows, _ = _caption_rows(5)
  batch = dict(rows, targets=np.roll(rows["inputs"], -1, axis=1), loss_mask=(rows["segment_ids"] > 0) & (
      rows["image_ids"] == 0))
  train = {}
  for rate in (0.0, 1.0):  # the config is read while tracing: one trace per rate
    monkeypatch.setitem(model.cfg.diffusion, "caption_dropout", rate)
    train[rate] = jax.jit(lambda b: _with_key(jax.random.PRNGKey(3), lambda: transfusion_loss(model, b)))(batch)[2]

  @jax.jit
  def image_mse(positions, hidden):
    noisy, timesteps, noise = _fixed_noise(model.schedule, rows["patches"], rows["image_ids"], None)
    _, eps = model(rows["inputs"], positions, rows["segment_ids"], rows["modality"], rows["image_ids"], noisy,
                   timesteps, hidden)
    return jnp.sum(jnp.mean((eps - noise) ** 2, -1) * (rows["image_ids"] > 0))

  dropped = drop_captions(rows["positions"], rows["segment_ids"], rows["image_ids"], jnp.ones((1, 25), bool))
  np.testing.assert_allclose(train[1.0]["mse/image"], image_mse(*dropped), rtol=1e-5)
  np.testing.assert_allclose(train[0.0]["mse/image"], image_mse(jnp.asarray(rows["positions"]),
                                                                jnp.zeros((1, 24, 24), bool)), rtol=1e-5)
  assert abs(float(train[1.0]["mse/image"]) - float(train[0.0]["mse/image"])) > 1e-4
  monkeypatch.setattr(transfusion_module, "drop_captions", lambda *a: pytest.fail("evaluation dropped a caption"))
  jax.eval_shape(lambda b: transfusion_loss(model, b), batch)
  dropped_docs = jax.random.uniform(jax.random.PRNGKey(21), (4, 25)) < 0.5
  segment_ids = jnp.asarray(np.repeat(np.arange(1, 5), 6)[None].repeat(4, 0), jnp.int32)
  image_ids = jnp.asarray(np.tile([0, 0, 0, 1, 1, 0], (4, 4)), jnp.int32)
  positions = jnp.asarray(np.tile(np.arange(6), (4, 4)), jnp.int32)
  moved, _ = drop_captions(positions, segment_ids, image_ids, dropped_docs)
  doc_moved = np.asarray(moved != positions).reshape(4, 4, 6).any(-1)
  np.testing.assert_array_equal(doc_moved, np.asarray(dropped_docs)[:, 1:5])


def _with_key(key, fn):
  with training_rng(key):
    return fn()


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
