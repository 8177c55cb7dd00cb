"""Scale options of the dense LM: scanned layers against the unrolled stack, remat policies against no remat,
bf16 parameters and Adam moments, and the planner's bytes under them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common import plan
from common.config import ConfigError
from common.configs.base import base_config, dense_model
from common.models.dense_lm import DenseLM
from common.sharding import make_abstract_mesh, spec_for
from common.tasks.lm import next_token_loss
from common.train.optim import make_optimizer
from common.train.step import init_state, make_train_step

VOCAB, BATCH, SEQ = 64, 2, 8


def tiny(**overrides):
  return dense_model(**{**dict(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48,
                               qk_norm=True), **overrides})


def tokens(seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (BATCH, SEQ), 0, VOCAB)


def forward_jaxpr(model) -> str:
  return str(jax.make_jaxpr(lambda m: m(tokens()))(model))


@nnx.jit
def logits_and_grads(model, toks):
  """(logits, gradient of weighted_logit_sum) in one compiled program."""
  def loss(m):
    logits = m(toks)
    return jnp.sum(logits * jax.random.normal(jax.random.PRNGKey(7), logits.shape)), logits
  grads, logits = nnx.grad(loss, has_aux=True)(model)
  return logits, nnx.state(grads, nnx.Param)


def named_arrays(state) -> dict[str, np.ndarray]:
  """{"['attn']['q']['kernel']": array} of a state."""
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def stacked_by_hand(unrolled_blocks_state, n_layers) -> dict[str, np.ndarray]:
  """The unrolled layers' arrays stacked with numpy on a leading axis: the scanned layout."""
  per_layer = [named_arrays(unrolled_blocks_state[i]) for i in range(n_layers)]
  return {name: np.stack([layer[name] for layer in per_layer]) for name in per_layer[0]}


def assert_close(got, want, name=""):
  """Equal to float32 rounding relative to the array's scale (the scan sums in another order)."""
  want = np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max())), err_msg=name)


def rest_arrays(state) -> dict[str, np.ndarray]:
  return named_arrays({k: v for k, v in state.items() if k != "blocks"})


def test_scanned_model_matches_unrolled_logits_and_gradients():
  unrolled = DenseLM(tiny(), rngs=nnx.Rngs(params=0))
  scanned = DenseLM(tiny(scan_layers=True), rngs=nnx.Rngs(params=0))
  # The same weights, in the other layout.
  want = stacked_by_hand(nnx.state(unrolled, nnx.Param)["blocks"], 3)
  got = named_arrays(nnx.state(scanned, nnx.Param)["blocks"])
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])
  (logits_unrolled, g_unrolled), (logits_scanned, g_scanned) = (logits_and_grads(m, tokens())
                                                                 for m in (unrolled, scanned))
  assert_close(logits_scanned, logits_unrolled)
  want = stacked_by_hand(g_unrolled["blocks"], 3)
  got = named_arrays(g_scanned["blocks"])
  for name in want:
    assert_close(got[name], want[name], name)
  for name, value in rest_arrays(g_unrolled).items():
    assert_close(rest_arrays(g_scanned)[name], value, name)


def _dot_generals(n_layers: int, scan: bool) -> tuple[int, int]:
  """(dot_generals in the lowered forward pass, its text length) of an n_layers model."""
  model = DenseLM(tiny(n_layers=n_layers, d_model=16, d_ff=16, scan_layers=scan), rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(model)
  text = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)).lower(params, tokens()).as_text()
  return text.count("dot_general"), len(text)


def test_scanned_program_does_not_grow_with_depth():
  dots_2, text_2 = _dot_generals(2, scan=True)
  dots_24, text_24 = _dot_generals(24, scan=True)
  assert dots_24 == dots_2 > 0
  assert text_24 < 1.1 * text_2
  unrolled_2, _ = _dot_generals(2, scan=False)
  unrolled_24, _ = _dot_generals(24, scan=False)
  assert unrolled_24 > 8 * unrolled_2  # the count does see the depth when the blocks are unrolled


def test_stacked_axis_is_replicated_and_the_rest_sharded_as_unrolled():
  mesh = make_abstract_mesh((2, 2, 2, 2), ("data", "fsdp", "tensor", "expert"), 16)
  unrolled = nnx.eval_shape(lambda: DenseLM(tiny(d_model=64, d_ff=64), rngs=nnx.Rngs(params=0)))
  scanned = nnx.eval_shape(lambda: DenseLM(tiny(d_model=64, d_ff=64, scan_layers=True), rngs=nnx.Rngs(params=0)))
  layer = {path: var for path, var in nnx.iter_graph(unrolled.blocks[0]) if isinstance(var, nnx.Param)}
  stacked = {path: var for path, var in nnx.iter_graph(scanned.blocks) if isinstance(var, nnx.Param)}
  assert sorted(layer) == sorted(stacked) and layer
  for path, var in stacked.items():
    axes, one = var.get_metadata()["axes"], layer[path]
    assert axes == ("layers", *one.get_metadata()["axes"])
    spec = spec_for(axes, var.get_value().shape, mesh)
    assert spec[0] is None
    assert tuple(spec[1:]) == tuple(spec_for(one.get_metadata()["axes"], one.get_value().shape, mesh))
  assert any(any(entry is not None for entry in spec_for(v.get_metadata()["axes"], v.get_value().shape, mesh))
             for v in stacked.values())


def test_scanned_decoding_and_scanned_moe_are_refused():
  scanned = DenseLM(tiny(scan_layers=True), rngs=nnx.Rngs(params=0))
  with pytest.raises(ConfigError, match="model.scan_layers"):
    scanned.init_cache(1, SEQ)
  moe = tiny(scan_layers=True)
  moe.moe.num_experts = 4
  with pytest.raises(ConfigError, match="model.scan_layers"):
    DenseLM(moe, rngs=nnx.Rngs(params=0))
  not_bool = tiny()
  with not_bool.ignore_type():  # as a hand-edited config.json may hold it
    not_bool.scan_layers = "yes"
  with pytest.raises(ConfigError, match="model.scan_layers"):
    DenseLM(not_bool, rngs=nnx.Rngs(params=0))


def test_unrolled_gives_the_unrolled_twin_that_decodes_and_exports(tmp_path):
  """`unrolled(scanned)` holds exactly the unrolled model's weights (same init seed), decodes, and exports the
  same Hugging Face tensors as the model built unrolled."""
  from common.models.dense_lm import unrolled
  from common.models.hf_llama import save_hf_llama
  from safetensors.numpy import load_file
  built = DenseLM(tiny(qk_norm=False), rngs=nnx.Rngs(params=0))  # Llama has no QK-norm
  scanned = DenseLM(tiny(qk_norm=False, scan_layers=True), rngs=nnx.Rngs(params=0))
  twin = unrolled(scanned)
  assert not twin.scan_layers and not twin.cfg.scan_layers and scanned.scan_layers
  want, got = named_arrays(nnx.state(built, nnx.Param)), named_arrays(nnx.state(twin, nnx.Param))
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  twin.init_cache(1, SEQ)  # decodes
  for name, model in (("built", built), ("scanned", scanned)):
    save_hf_llama(tiny(qk_norm=False), model, str(tmp_path / name))
  a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("built", "scanned"))
  assert sorted(a) == sorted(b) and any("layers.2." in k for k in a)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


POLICY_NAMES = {"full": "nothing_saveable", "dots_saveable": "DotsSaveable"}


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_policies_give_the_gradients_of_no_remat(remat, scan):
  toks = tokens(1)
  plain = DenseLM(tiny(n_layers=2, scan_layers=scan), rngs=nnx.Rngs(params=0))
  rematted = DenseLM(tiny(n_layers=2, remat=remat, scan_layers=scan), rngs=nnx.Rngs(params=0))
  jaxpr = forward_jaxpr(rematted)  # jax.checkpoint's primitive, with the policy asked for
  assert "remat2" in jaxpr and POLICY_NAMES[remat] in jaxpr
  want, got = logits_and_grads(plain, toks)[1], logits_and_grads(rematted, toks)[1]
  for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    assert_close(r, g, jax.tree_util.keystr(path))


def test_remat_bools_are_aliases_and_unknown_policies_are_refused():
  for remat in ("none", False):
    model = DenseLM(tiny(n_layers=2, remat=remat), rngs=nnx.Rngs(params=0))
    assert not model.remat and "remat2" not in forward_jaxpr(model)
  model = DenseLM(tiny(n_layers=2, remat=True), rngs=nnx.Rngs(params=0))
  assert model.remat and model.remat_policy is jax.checkpoint_policies.nothing_saveable
  with pytest.raises(ConfigError, match="model.remat"):
    DenseLM(tiny(remat="everything"), rngs=nnx.Rngs(params=0))


def _train_cfg(**train):
  cfg = base_config()
  cfg.train.update(dict(steps=3, warmup_steps=1, **train))
  return cfg.train


def test_bf16_parameters_and_first_moment_keep_their_dtypes_through_a_step():
  model = DenseLM(tiny(n_layers=1, param_dtype="bfloat16"), rngs=nnx.Rngs(params=0))
  reference = DenseLM(tiny(n_layers=1), rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(model, nnx.Param)
  for leaf, ref in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.state(reference, nnx.Param))):
    assert leaf.dtype == jnp.bfloat16
    np.testing.assert_array_equal(leaf, ref.astype(jnp.bfloat16))  # the f32 draw, rounded
  optimizer = make_optimizer(_train_cfg(moment_dtype="bfloat16"))
  state = init_state(params, optimizer)
  adam = state["opt_state"][1][0]
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.bfloat16)}
  toks = tokens(2)
  batch = dict(inputs=toks, targets=jnp.roll(toks, -1, axis=1), loss_mask=jnp.ones_like(toks, jnp.float32),
               positions=jnp.broadcast_to(jnp.arange(SEQ), toks.shape), segment_ids=jnp.ones_like(toks))
  step = jax.jit(make_train_step(graphdef, next_token_loss, optimizer, lambda s: 0.0))
  new_state, metrics = step(*step(state, batch)[:1], batch)  # the second step: the first has rate 0 (warmup)
  assert bool(metrics["finite"])
  assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)
  assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(params)))


def test_f32_parameters_with_bf16_first_moment():
  params = nnx.state(DenseLM(tiny(), rngs=nnx.Rngs(params=0)), nnx.Param)
  adam = init_state(params, make_optimizer(_train_cfg(moment_dtype="bfloat16")))["opt_state"][1][0]
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
  default = init_state(params, make_optimizer(_train_cfg()))["opt_state"][1][0]
  assert {x.dtype for x in jax.tree.leaves(default.mu)} == {jnp.dtype(jnp.float32)}


def test_bad_dtypes_are_refused_naming_the_key():
  with pytest.raises(ConfigError, match="model.param_dtype"):
    DenseLM(tiny(param_dtype="float16"), rngs=nnx.Rngs(params=0))
  with pytest.raises(ConfigError, match="train.moment_dtype"):
    make_optimizer(_train_cfg(moment_dtype="int8"))


def _plan(param_dtype="float32", moment_dtype="float32", scan=False, remat=False):
  cfg = base_config()
  cfg.model = dense_model(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=128,
                          param_dtype=param_dtype, scan_layers=scan, remat=remat)
  cfg.train.moment_dtype = moment_dtype
  cfg.data.seq_len = 32
  return plan.make_plan(cfg, {"fsdp": 2})


def test_plan_counts_parameter_and_moment_bytes_in_their_dtypes():
  f32 = _plan()
  half = _plan("bfloat16", "bfloat16")
  moment_only = _plan(moment_dtype="bfloat16")
  assert half.param_gib == f32.param_gib / 2 and half.grad_gib == f32.grad_gib / 2
  assert half.optimizer_gib == f32.optimizer_gib / 2 == f32.param_gib  # two f32 moments = 2 x params
  assert moment_only.param_gib == f32.param_gib
  assert moment_only.optimizer_gib == 0.75 * f32.optimizer_gib  # 2 + 4 bytes in place of 4 + 4
  assert f32.total_gib - half.total_gib == pytest.approx(2 * f32.param_gib)  # (4 + 8 + 4) / 2 bytes saved
  # The stacked layout holds the same parameters: the same counts and bytes.
  scanned = _plan(scan=True)
  assert (scanned.params_total, scanned.param_gib) == (f32.params_total, f32.param_gib)


def test_plan_counts_remat_policies_as_remat():
  plain, full, dots = _plan(), _plan(remat="full"), _plan(remat="dots_saveable")
  assert full.activation_gib == dots.activation_gib < plain.activation_gib
  assert full.activation_gib == _plan(remat=True).activation_gib
  assert any("dots_saveable" in note for note in dots.notes) and not full.notes


def test_a_remat_policy_is_set_from_the_command_line_and_may_change_on_resume():
  import os  # pylint: disable=g-import-not-at-top
  from common.config import load  # pylint: disable=g-import-not-at-top
  from common.train.resume import config_changes  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for path in ("dense_tiny.py", "llama3_8b.py"):
    cfg = load(os.path.join(repo, "common", "configs", path), [("model.remat", "dots_saveable")])
    assert cfg.model.remat == "dots_saveable"
  old = {"model": {"remat": False, "d_model": 8}}  # a run started before the policies had names
  assert config_changes(old, {"model": {"remat": "full", "d_model": 8}}) == {}
  assert "model.d_model" in config_changes(old, {"model": {"remat": "full", "d_model": 16}})
