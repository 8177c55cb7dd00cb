"""The sections every trainer shares: train, checkpoint, log, eval, mesh, data. Model configs add `model`."""
import ml_collections

from common.data import default_data_config


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train = dict(
      steps=300, batch_size=16, seed=0, learning_rate=3e-3, min_learning_rate_ratio=0.1, warmup_steps=30,
      weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0, grad_accum=1,
      schedule="cosine",  # the decay after warmup: 'cosine' or 'linear'
      nan_policy="stop",  # 'stop': exit naming the step, keep the last good checkpoint; 'skip': drop the update
      moment_dtype="float32",  # Adam's first moment: 'float32' or 'bfloat16' (the second follows the params)
      init_from="",  # a new run's parameters from a run folder or hub entry (fresh optimizer); '' = random
  )
  c.checkpoint = dict(every_steps=100, keep=3, async_save=True)
  # progress: 'auto' (bar on a terminal), 'bar', 'lines'; profile_steps 'N:M': a jax.profiler trace of steps
  # N..M in DIR/profile (TensorBoard's profile tab)
  c.log = dict(every_steps=10, progress="auto", profile_steps="")
  c.eval = dict(every_steps=100, batches=8)
  # dcn_shape: how many slices (TPU pods over the data-centre network) each of `axes` spans, () = one slice
  c.mesh = dict(shape=(-1,), axes=("data",), dcn_shape=())
  c.data = default_data_config()
  return c


def tiny_run(c: ml_collections.ConfigDict, *, seq_len: int) -> ml_collections.ConfigDict:
  """The schedule of the papers' tiny configs: 200 steps of batch 8, a slice of the embedded corpus, eval and
  checkpoints every 100 steps; minutes on a 2-core CPU."""
  c.train.update(steps=200, batch_size=8, warmup_steps=20)
  c.data.update(seq_len=seq_len, max_train_bytes=4_000_000, max_eval_bytes=400_000)
  c.eval.update(every_steps=100, batches=8)
  c.checkpoint.every_steps = 100
  return c


def dense_model(**overrides) -> ml_collections.ConfigDict:
  """Model section of the dense LM; vocab_size 0 means the data vocabulary, padded to a multiple of 128."""
  m = ml_collections.ConfigDict(dict(
      name="dense_lm", vocab_size=0, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=0,
      d_ff=768, rope_theta=10000.0, rope_scaling=ml_collections.ConfigDict(), norm_eps=1e-5,
      tie_embeddings=True, window=0, qk_norm=False, dtype="float32", remat="none",
      qkv_bias=False,  # biases on the query/key/value projections, as Qwen2 has
      # Scale options (common.models.dense_lm): remat is 'none' | 'full' | 'dots_saveable' (true/false mean
      # full/none); scan_layers stacks the blocks on a 'layers' axis under one scan; param_dtype stores the
      # parameters ('float32' or 'bfloat16'; compute stays `dtype`).
      scan_layers=False, param_dtype="float32",
      # Context length (positions 0 .. max_len - 1; 0: unbounded) and the special ids a Hugging Face export
      # writes (-1 / []: none; a list, as JSON reads it back); configs saved before these keys read the
      # defaults.
      max_len=0, bos_id=-1, eos_ids=[], pad_id=-1,
      # Mixture-of-experts FFN in every `every`-th layer (common.nn.moe); num_experts 0 = dense.
      # second_policy: 'all' | 'sampling' (fairseq's Gumbel rule) | 'random' (GShard's). Evaluation with
      # mode 'capacity': ceil(eval_capacity_token_fraction * S) slots per expert, <= 0 = dropless (exact).
      # exchange_slack: expert-parallel dropless all-to-all buffers, in even shares of a shard's rows
      # (common.nn.moe.exchange; a call that overflows them takes an exact, slower fallback).
      moe=ml_collections.ConfigDict(dict(
          num_experts=0, top_k=2, every=2, routing="token_choice", mode="capacity", capacity_factor=1.0,
          second_policy="all", num_groups=1, router_noise=0.0, balance_weight=0.01, z_loss_weight=0.0,
          d_ff=0, expert_parallel=True, grouped_impl="auto", eval_capacity_token_fraction=0.0,
          exchange_slack=2.0)),
  ))
  with m.ignore_type():  # remat may be a bool (true: 'full'), as configs written before the policies say
    m.remat = overrides.pop("remat", m.remat)
  m.update(overrides)
  return m
