"""Memory, FLOPs and step time of a config on a mesh this machine does not have.

    python -m common.plan --config=common/configs/llama3_8b.py --mesh=fsdp:32,tensor:8 \
        [--accelerator=h100] [--mfu=0.4] [--flash] [--json] [--config.train.batch_size=128]

The mesh is the config's `mesh.shape`/`mesh.axes`, as for every trainer; `--mesh=fsdp:32,tensor:8` is
shorthand that sets those two keys. Every size must be given (a -1, "the rest of the devices", means
nothing for a machine the plan does not run on).

The model is built abstractly (`nnx.eval_shape`: shapes only, nothing allocated), and every parameter is
placed with the real sharding rules (`common.sharding.spec_for` on an abstract mesh), so the per-device
numbers are those of the trainer. Exits with status 2 and one line on stderr when the plan does not fit the
accelerator's memory, the mesh names an unknown axis, or the accelerator is unknown.

Memory per device (GiB = 2**30 bytes):
  parameters  in model.param_dtype (default f32), as the trainer stores them (compute casts to model.dtype on
              the fly);
  optimizer   AdamW's two moments (Loshchilov & Hutter 2019): the first in train.moment_dtype, the second in
              the parameters' dtype (as optax keeps them), sharded like the parameters (as the trainer places
              them: tests/common/test_train_memory.py compares with its compiled programs);
  gradients   in the parameters' dtype, sharded like the parameters;
  activations the analytic estimate of `dense_lm_activation_bytes`.
Not counted: XLA's temporaries beyond one layer, the gradient-accumulation buffer, fragmentation.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Callable, Sequence

import jax
from flax import nnx

from common import flops
from common.config import ConfigError, parse_argv, run_main
from common.models import build_model
from common.models.dense_lm import padded_vocab_size, remat_policy_name
from common.sharding import MESH_AXES, RULES, make_abstract_mesh, spec_for

GIB = 2 ** 30
BYTE_VOCAB_SIZE = 259   # seqio.ByteVocabulary: 256 bytes + pad, eos, unk
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


def parse_mesh(text: str) -> dict[str, int]:
  """'fsdp:64,tensor:4' -> {'fsdp': 64, 'tensor': 4}."""
  sizes: dict[str, int] = {}
  for item in filter(None, text.split(",")):
    name, sep, size = item.partition(":")
    name = name.strip()
    if name not in MESH_AXES:
      raise ConfigError(f"--mesh: unknown mesh axis '{name}' (known: {', '.join(MESH_AXES)})")
    if not sep or not size.strip().isdigit() or int(size) < 1:
      raise ConfigError(f"--mesh: expected AXIS:SIZE with a positive size, got '{item}'")
    if name in sizes:
      raise ConfigError(f"--mesh: axis '{name}' given twice")
    sizes[name] = int(size)
  if not sizes:
    raise ConfigError(f"--mesh: expected e.g. fsdp:64,tensor:4, got '{text}'")
  return sizes


# ------------------------------------------------------------------------------------------ activations


def _local(dim: int, shards: int) -> int:
  """A dim split over `shards` devices if it divides (spec_for's rule), else replicated."""
  return dim // shards if shards > 1 and dim % shards == 0 else dim


def _block_bytes(*, b: int, seq: int, keys: int, d: int, h: int, kv: int, hd: int, f: int, a: int,
                 flash: bool) -> int:
  """One pre-norm attention + SwiGLU block's saved activations (the table of `dense_lm_activation_bytes`), with
  each query scoring `keys` keys (seq for causal attention, counted whole; window + 128 for a windowed one, which
  common.nn computes 128 queries at a time)."""
  dense = b * seq * a * (4 * d + (h + 2 * kv) * hd + h * hd + 3 * f)
  scores = b * h * seq * 4 if flash else b * h * seq * keys * (4 + a) + b * seq * keys
  return dense + scores


def dense_lm_activation_bytes(m, *, batch: int, seq_len: int, tensor: int, remat: bool,
                              flash: bool) -> dict[str, float]:
  """Activations one device keeps for the backward pass of `batch` local sequences (bytes).

  Per layer, without remat (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", sec. 4, adapted to a pre-norm GQA + SwiGLU block), in model.dtype (a bytes) unless
  said:
    block input and its RMSNorm output, the same before the FFN     4 b L d a
    q, k, v after RoPE                                              b L (h + 2 kv) hd a
    attention output (input of the o projection)                    b L h hd a
    SwiGLU gate and up outputs and their product                    3 b L f a
    attention scores' softmax in f32 and its cast, and the mask     b h L^2 (4 + a) + b L^2
      (flash attention keeps only the f32 log-sum-exp instead:     b h L 4)
  h, kv, f are the local sizes: divided by the 'tensor' axis when it divides them (heads, kv heads and d_ff
  are sharded over 'tensor' by common.sharding.RULES); the residual stream [b, L, d] is replicated over
  'tensor' (no sequence parallelism).
  With remat (one nnx.remat per block) only each block's input is saved, n_layers b L d a, plus the working
  set of the one layer being recomputed during its backward (the per-layer total above).
  Both add the f32 logits and their gradient, 2 b L V 4 (V local over 'tensor')."""
  b, seq, a = batch, seq_len, DTYPE_BYTES[m.dtype]
  d, n = int(m.d_model), int(m.n_layers)
  layer = _block_bytes(b=b, seq=seq, keys=seq, d=d, h=_local(int(m.n_heads), tensor),
                       kv=_local(int(m.n_kv_heads), tensor), hd=int(m.head_dim) or d // int(m.n_heads),
                       f=_local(int(m.d_ff), tensor), a=a, flash=flash)
  saved = n * b * seq * d * a + layer if remat else n * layer
  logits = 2 * b * seq * _local(int(m.vocab_size), tensor) * 4
  return dict(layers=float(saved), logits=float(logits), total=float(saved + logits))


def blt_activation_bytes(m, *, batch: int, seq_len: int, tensor: int, remat: bool, flash: bool) -> dict[str, float]:
  """Activations of a BLT (blt.model; Pagnoni et al. 2024) for `batch` local rows of `seq_len` bytes (bytes), no
  remat (the BLT has none): the local encoder and decoder blocks over the bytes (windowed self-attention,
  `model.local_window` + 128 keys per query), the global blocks over `model.patching.max_patches` patch slots (causal
  attention over all of them), and per decoder layer its cross-attention from every byte to every patch slot, a
  dense masked softmax (b h_cross L N scores in f32 and their cast, and the mask, whatever --flash says: no kernel
  computes it), with its query/output states (3 b L d_local a); the encoder's cross-attention, a segment softmax over
  the bytes, is linear in L and counted as one more local block input. Plus the f32 logits and their gradient."""
  b, L, a = batch, seq_len, DTYPE_BYTES[m.dtype]
  n_slots = int(m.patching.max_patches) or L
  d_l, d_g = int(m.d_local), int(m.d_global)
  h_l, h_g, h_c = (_local(int(m[k]), tensor) for k in ("n_heads_local", "n_heads_global", "n_heads_cross"))
  f_l, f_g = _local(int(m.d_ff_local) or 4 * d_l, tensor), _local(int(m.d_ff_global) or 4 * d_g, tensor)
  window = int(m.local_window)
  local = _block_bytes(b=b, seq=L, keys=min(L, window + 128) if window else L, d=d_l, h=h_l, kv=h_l,
                       hd=d_l // int(m.n_heads_local), f=f_l, a=a, flash=flash)
  global_ = _block_bytes(b=b, seq=n_slots, keys=n_slots, d=d_g, h=h_g, kv=h_g, hd=d_g // int(m.n_heads_global),
                         f=f_g, a=a, flash=flash)
  cross = b * h_c * L * n_slots * (4 + a) + b * L * n_slots + 3 * b * L * d_l * a
  n_enc, n_dec = int(m.n_layers_encoder), int(m.n_layers_decoder)
  saved = (n_enc + n_dec) * local + int(m.n_layers_global) * global_ + n_dec * cross + b * L * d_l * a
  logits = 2 * b * L * _local(int(m.vocab_size), tensor) * 4
  return dict(layers=float(saved), logits=float(logits), total=float(saved + logits))


ACTIVATIONS_BY_MODEL: dict[str, Callable[..., dict[str, float]]] = {
    "dense_lm": dense_lm_activation_bytes, "blt": blt_activation_bytes}


# ----------------------------------------------------------------------------------------------- params


def param_shards(model_cfg, mesh) -> list[tuple[tuple[int, ...], int, bool]]:
  """[(global shape, elements per device, has a vocab axis)] for every parameter of the abstract model
  on `mesh`."""
  abstract = nnx.eval_shape(lambda: build_model(model_cfg, seed=0))
  out = []
  for var in jax.tree.leaves(nnx.state(abstract, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
    value = var.get_value() if hasattr(var, "get_value") else var.value
    shape = tuple(value.shape)
    logical = var.get_metadata().get("axes") or (None,) * len(shape)
    local = 1
    for dim, entry in zip(shape, spec_for(logical, shape, mesh)):
      names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
      local *= dim // math.prod(mesh.shape[a] for a in names)
    out.append((shape, local, "vocab" in logical))
  return out


def param_totals(model_cfg, mesh) -> dict[str, int]:
  """{total, embedding, per_device} parameter elements of the model on `mesh`.

  Building an 80-layer model abstractly still traces every initialiser (seconds), so when `n_layers` > 3
  the model is built with 1, 2 and 3 layers instead; if the counts grow linearly with the depth (every
  layer alike, checked), the full depth is extrapolated, otherwise the full model is built."""
  def totals(cfg):
    shards = param_shards(cfg, mesh)
    return dict(total=sum(math.prod(s) for s, _, _ in shards),
                embedding=sum(math.prod(s) for s, _, vocab in shards if vocab),
                per_device=sum(local for _, local, _ in shards))
  n = int(model_cfg.get("n_layers", 0) or 0)
  if n > 3:
    small = []
    for layers in (1, 2, 3):
      cfg = model_cfg.copy_and_resolve_references()
      cfg.n_layers = layers
      small.append(totals(cfg))
    f1, f2, f3 = small
    if all(f3[k] - f2[k] == f2[k] - f1[k] for k in f1):
      return {k: f1[k] + (n - 1) * (f2[k] - f1[k]) for k in f1}
  return totals(model_cfg)


# ------------------------------------------------------------------------------------------------- plan


@dataclasses.dataclass
class Plan:
  mesh: dict[str, int]
  n_devices: int
  accelerator: str
  hbm_gib: float
  params_total: int
  params_non_embedding: int
  param_gib: float
  optimizer_gib: float
  grad_gib: float
  activation_gib: float
  total_gib: float
  local_batch: int
  vocab_size: int
  flops_per_token: float
  flops_per_step: float
  mfu: float
  step_seconds: float
  tokens_per_sec: float
  notes: list[str]

  @property
  def fits(self) -> bool:
    return self.total_gib <= self.hbm_gib


def state_dtype_bytes(cfg) -> tuple[int, int]:
  """(bytes of a parameter, gradient and second moment; bytes of a first moment) under model.param_dtype and
  train.moment_dtype (configs written before them: f32)."""
  param_dtype, moment_dtype = cfg.model.get("param_dtype", "float32"), cfg.train.get("moment_dtype", "float32")
  for key, name in (("model.param_dtype", param_dtype), ("train.moment_dtype", moment_dtype)):
    if name not in DTYPE_BYTES:
      raise ConfigError(f"config key '{key}': must be one of {sorted(DTYPE_BYTES)}, got '{name}'")
  return DTYPE_BYTES[param_dtype], DTYPE_BYTES[moment_dtype]


def plan_mesh(mesh_cfg):
  """The abstract mesh of a config's `mesh` section, every size given."""
  shape = tuple(int(s) for s in mesh_cfg.shape)
  if any(s < 1 for s in shape):
    raise ConfigError(f"config key 'mesh.shape': the planner needs every size (>= 1), got {shape} "
                      f"(e.g. --mesh=fsdp:64,tensor:8)")
  return make_abstract_mesh(shape, tuple(mesh_cfg.axes), math.prod(shape))


def make_plan(cfg, mesh_sizes: dict[str, int] | None = None, *, accelerator: str = "h100", mfu: float = 0.4,
              flash: bool = False) -> Plan:
  """The plan of `cfg` on the mesh of its `mesh.shape`/`mesh.axes`, which `mesh_sizes` ({axis: size}, the
  --mesh shorthand) replaces when given; vocab_size 0 is resolved to the padded byte vocabulary. Both on a
  copy: `cfg` is left as it is."""
  cfg = cfg.copy_and_resolve_references()
  if mesh_sizes is not None:
    cfg.mesh.update(shape=tuple(mesh_sizes.values()), axes=tuple(mesh_sizes))
  notes = []
  acc = flops.accelerator_for(accelerator)
  if acc is None:
    raise ConfigError(f"--accelerator: unknown accelerator '{accelerator}' "
                      f"(known: {', '.join(flops.ACCELERATORS)})")
  if not 0 < mfu <= 1:
    raise ConfigError(f"--mfu: must be in (0, 1], got {mfu}")
  m = cfg.model
  if int(m.vocab_size) <= 0:
    if cfg.data.vocab != "byte":
      raise ConfigError(f"config key 'model.vocab_size': 0 means the data vocabulary, which the planner "
                        f"cannot read for data.vocab='{cfg.data.vocab}'; set model.vocab_size")
    m.vocab_size = padded_vocab_size(BYTE_VOCAB_SIZE)
    notes.append(f"model.vocab_size 0: using the byte vocabulary ({BYTE_VOCAB_SIZE}) padded to "
                 f"{m.vocab_size}")
  if m.name not in ACTIVATIONS_BY_MODEL:
    raise ConfigError(f"config key 'model.name': the planner has no activation estimate for '{m.name}'")

  mesh = plan_mesh(cfg.mesh)
  n_devices = mesh.size
  dp = math.prod(mesh.shape[a] for a in RULES["batch"])
  batch, accum = int(cfg.train.batch_size), int(cfg.train.get("grad_accum", 1) or 1)
  if batch % (dp * accum):
    raise ConfigError(f"config key 'train.batch_size': {batch} does not divide into {dp} data-parallel "
                      f"shards x {accum} accumulation steps")
  local_batch = batch // (dp * accum)
  seq_len = int(cfg.data.seq_len)

  counts = param_totals(m, mesh)
  total, embedding, per_device = counts["total"], counts["embedding"], counts["per_device"]
  param_bytes, moment_bytes = state_dtype_bytes(cfg)
  param_gib = per_device * param_bytes / GIB
  optimizer_gib = per_device * (moment_bytes + param_bytes) / GIB  # first moment, second moment
  remat = remat_policy_name(m) != "none"
  if remat_policy_name(m) == "dots_saveable":
    notes.append("model.remat 'dots_saveable': activations estimated as for 'full'; the matmul outputs it also "
                 "keeps are not counted")
  act = ACTIVATIONS_BY_MODEL[m.name](m, batch=local_batch, seq_len=seq_len, tensor=mesh.shape["tensor"],
                                     remat=remat, flash=flash)
  activation_gib = act["total"] / GIB
  total_gib = param_gib + optimizer_gib + param_gib + activation_gib  # params, AdamW moments, grads

  per_token = flops.training_flops_per_token(m, seq_len)
  per_step = per_token * batch * seq_len
  peak = flops.accelerator_peak(acc.name, "bfloat16" if m.dtype == "bfloat16" else "float32")
  step_seconds = per_step / (n_devices * peak * mfu)
  return Plan(
      mesh=dict(mesh.shape), n_devices=n_devices, accelerator=acc.name, hbm_gib=float(acc.hbm_gib),
      params_total=total, params_non_embedding=total - embedding, param_gib=param_gib,
      optimizer_gib=optimizer_gib, grad_gib=param_gib, activation_gib=activation_gib, total_gib=total_gib,
      local_batch=local_batch, vocab_size=int(m.vocab_size), flops_per_token=per_token,
      flops_per_step=per_step, mfu=mfu,
      step_seconds=step_seconds, tokens_per_sec=batch * seq_len / step_seconds, notes=notes)


def format_table(plan: Plan, cfg, *, flash: bool) -> str:
  m = cfg.model
  param_dtype, moment_dtype = m.get("param_dtype", "float32"), cfg.train.get("moment_dtype", "float32")
  mesh = ",".join(f"{a}:{s}" for a, s in plan.mesh.items() if s > 1) or "1 device"
  rows = [
      ("mesh", f"{mesh} ({plan.n_devices} devices)"),
      ("accelerator", f"{plan.accelerator} ({plan.hbm_gib:.0f} GiB, {m.dtype})"),
      ("parameters", f"{plan.params_total / 1e9:.3f} B"),
      ("  non-embedding", f"{plan.params_non_embedding / 1e9:.3f} B"),
      ("batch x seq_len", f"{cfg.train.batch_size} x {cfg.data.seq_len} ({plan.local_batch} per device "
                          f"per microbatch, remat {remat_policy_name(m)}, "
                          f"{'flash' if flash else 'dense'} attention)"),
      ("per device:", ""),
      (f"  parameters ({param_dtype})", f"{plan.param_gib:.2f} GiB"),
      (f"  optimizer (AdamW, {moment_dtype} + {param_dtype})", f"{plan.optimizer_gib:.2f} GiB"),
      (f"  gradients ({param_dtype})", f"{plan.grad_gib:.2f} GiB"),
      ("  activations (estimate)", f"{plan.activation_gib:.2f} GiB"),
      ("  total", f"{plan.total_gib:.2f} GiB of {plan.hbm_gib:.2f} GiB"
                  f" ({'fits' if plan.fits else 'DOES NOT FIT'})"),
      ("training FLOPs / token", f"{plan.flops_per_token:.4g}"),
      ("training FLOPs / step", f"{plan.flops_per_step:.4g}"),
      (f"step time at MFU {plan.mfu:g}",
       f"{plan.step_seconds:.3f} s ({plan.tokens_per_sec:,.0f} tokens/s)"),
  ]
  width = max(len(k) for k, _ in rows)
  lines = [f"{k:<{width}}  {v}".rstrip() for k, v in rows]
  return "\n".join(lines + [f"note: {n}" for n in plan.notes])


def _bool_flag(flags: dict[str, str], name: str) -> bool:
  value = flags.get(name, "false").strip().lower()
  if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
    raise ConfigError(f"--{name}: expected true or false, got '{value}'")
  return value in ("1", "true", "yes", "on")


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  cfg, flags = parse_argv(argv, extra_flags={
      "mesh": "axis:size,... (e.g. fsdp:32,tensor:8; default: the config's mesh.shape/mesh.axes)",
      "accelerator": f"one of {', '.join(flops.ACCELERATORS)} (default h100)",
      "mfu": "model FLOPs utilisation the step time assumes (default 0.4)"},
      switches={"flash": "count attention activations as a flash kernel keeps them", "json": "print JSON"},
      workdir=False)
  mesh_sizes = parse_mesh(flags["mesh"]) if "mesh" in flags else None
  try:
    mfu = float(flags.get("mfu", "0.4"))
  except ValueError:
    raise ConfigError(f"--mfu: expected a number, got '{flags['mfu']}'") from None
  flash = _bool_flag(flags, "flash")
  plan = make_plan(cfg, mesh_sizes, accelerator=flags.get("accelerator", "h100"), mfu=mfu, flash=flash)
  if _bool_flag(flags, "json"):
    print(json.dumps({**dataclasses.asdict(plan), "fits": plan.fits}, indent=1))
  else:
    print(format_table(plan, cfg, flash=flash))
  sys.stdout.flush()
  if not plan.fits:
    raise ConfigError(
        f"plan: per-device memory {plan.total_gib:.2f} GiB (parameters {plan.param_gib:.2f}, optimizer "
        f"{plan.optimizer_gib:.2f}, gradients {plan.grad_gib:.2f}, activations {plan.activation_gib:.2f}) "
        f"exceeds the {plan.hbm_gib:.0f} GiB of one {plan.accelerator}; shard over more devices (--mesh), "
        f"lower train.batch_size or raise train.grad_accum")
  return 0


if __name__ == "__main__":
  run_main(main)
