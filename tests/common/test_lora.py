"""LoRA adapters (common.nn.lora) on the dense LM: exact start from the base model, the low-rank formula, only
adapters trained, merging, sharding metadata."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common import sharding
from common.configs.base import base_config, dense_model
from common.models.dense_lm import DenseLM
from common.nn.linear import Linear
from common.nn.lora import LoRALinear, LoRAParam, adapter_count, apply_lora, merge_lora
from common.tasks.sft import lora_loss
from common.train.optim import learning_rate_schedule, make_optimizer
from common.train.step import init_state, make_train_step

VOCAB, D, LAYERS, HEADS, KV, FF = 64, 32, 2, 4, 2, 48


def tiny_model(seed=0):
  cfg = dense_model(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV, d_ff=FF)
  return DenseLM(cfg, rngs=nnx.Rngs(params=seed))


forward = nnx.jit(lambda model, ids: model(ids))


def tokens(shape=(2, 12), seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


def randomise_adapters(model, seed=3):
  """Non-zero B everywhere, so the adapters change the output."""
  key = jax.random.PRNGKey(seed)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, LoRAParam) and path[-1] == "lora_b":
      key, sub = jax.random.split(key)
      var.set_value(0.1 * jax.random.normal(sub, var.shape))


def test_zero_initialised_b_gives_the_base_model_exactly():
  model = tiny_model()
  ids = tokens()
  before = forward(model, ids)
  apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(params=1))
  np.testing.assert_array_equal(np.asarray(forward(model, ids)), np.asarray(before))


def test_lora_linear_computes_w_plus_scaled_low_rank_update():
  base = Linear(6, (2, 3), axes=("embed", "heads", "head_dim"), rngs=nnx.Rngs(params=0))
  layer = LoRALinear(base, rank=2, alpha=5.0, rngs=nnx.Rngs(params=1))
  layer.lora_b.set_value(jax.random.normal(jax.random.PRNGKey(2), (2, 2, 3)))
  x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  w, a, b = (np.asarray(v[...], np.float64) for v in (layer.kernel, layer.lora_a, layer.lora_b))
  expected = x @ w.reshape(6, 6) + (5.0 / 2) * (x @ a) @ b.reshape(2, 6)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))).reshape(4, 6), expected, rtol=1e-5, atol=1e-5)


def test_only_the_named_layers_are_adapted_with_r_times_in_plus_out_weights():
  model = apply_lora(tiny_model(), rank=3, alpha=3.0, targets=("q", "down"), rngs=nnx.Rngs(params=1))
  block = model.blocks[0]
  assert isinstance(block.attn.q, LoRALinear) and isinstance(block.ffn.down, LoRALinear)
  assert isinstance(block.attn.k, Linear) and isinstance(block.ffn.up, Linear)
  head_dim = D // HEADS
  per_layer = 3 * (D + HEADS * head_dim) + 3 * (FF + D)
  assert adapter_count(model) == LAYERS * per_layer


def test_a_target_that_names_no_layer_is_refused():
  with pytest.raises(ValueError, match="qq"):
    apply_lora(tiny_model(), rank=2, alpha=2.0, targets=("q", "qq"), rngs=nnx.Rngs(params=1))


def test_adapters_carry_logical_axes_for_sharding():
  model = apply_lora(tiny_model(), rank=4, alpha=4.0, rngs=nnx.Rngs(params=1))
  mesh = sharding.make_mesh((2, 4), ("fsdp", "tensor"))
  shardings = sharding.state_shardings(nnx.state(model, LoRAParam), mesh)
  q = shardings["blocks"][0]["attn"]["q"]
  assert q["lora_a"].get_value().spec == jax.sharding.PartitionSpec("fsdp", None)
  assert q["lora_b"].get_value().spec == jax.sharding.PartitionSpec(None, "tensor", None)


def test_training_steps_move_the_adapters_and_leave_every_base_weight_bit_identical():
  model = apply_lora(tiny_model(), rank=4, alpha=8.0, rngs=nnx.Rngs(params=1))
  graphdef, params = nnx.split(model, nnx.Param)
  train_cfg = base_config().train
  train_cfg.update(learning_rate=1e-2, warmup_steps=0, steps=3, weight_decay=0.0)
  optimizer = make_optimizer(train_cfg)
  step = jax.jit(make_train_step(graphdef, lora_loss, optimizer, learning_rate_schedule(train_cfg)))
  ids = tokens((4, 16), seed=1)
  batch = {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1), "segment_ids": jnp.ones_like(ids),
           "positions": jnp.broadcast_to(jnp.arange(16), ids.shape), "loss_mask": jnp.ones(ids.shape, jnp.float32)}
  state = init_state(params, optimizer)
  for _ in range(3):
    state, metrics = step(state, batch)
  assert bool(metrics["finite"])
  is_adapter = lambda path: path[-1] in ("lora_a", "lora_b")
  before = dict(nnx.to_flat_state(params))
  after = dict(nnx.to_flat_state(state["params"]))
  for path, var in before.items():
    old, new = np.asarray(var.get_value()), np.asarray(after[path].get_value())
    if is_adapter(path):
      if path[-1] == "lora_b":
        assert np.abs(new).max() > 0, path
    else:
      np.testing.assert_array_equal(new, old, err_msg=str(path))
  assert sum(is_adapter(p) for p in before) == 2 * 7 * LAYERS


def test_merged_model_gives_the_adapted_logits_with_plain_layers():
  model = apply_lora(tiny_model(), rank=4, alpha=8.0, rngs=nnx.Rngs(params=1))
  randomise_adapters(model)
  ids = tokens()
  adapted = np.asarray(forward(model, ids))
  assert np.abs(adapted - np.asarray(forward(tiny_model(), ids))).max() > 1e-3  # the adapters do change the output
  merge_lora(model)
  assert not jax.tree.leaves(nnx.state(model, LoRAParam))
  assert isinstance(model.blocks[1].attn.o, Linear)
  assert model.blocks[1].attn.q.kernel.get_metadata()["axes"] == ("embed", "heads", "head_dim")
  np.testing.assert_allclose(np.asarray(forward(model, ids)), adapted, rtol=1e-5, atol=1e-5)
