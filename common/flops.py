"""The one source of FLOP counts, parameter counts, peak FLOP/s and MFU for every architecture.

Conventions (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1; Chowdhery et al. 2022,
"PaLM", appendix B):
  * a matmul [m, k] x [k, n] costs 2mkn FLOPs (one multiply and one add per MAC);
  * the backward pass costs twice the forward (gradients w.r.t. activations and w.r.t. weights), so one
    training step is 3 x forward;
  * element-wise work (norms, RoPE, softmax, SiLU, residual adds, the loss) is not counted: at the sizes we
    care about it is a few percent of the matmuls, and MFU is defined on the matmul "model FLOPs";
  * the embedding lookup is a gather and costs 0.
Model FLOPs count causal attention once (only the keys a query may see), which is what MFU is reported on;
`causal=False` counts what a dense masked implementation executes (an upper bound on ours, which skips the
fully masked blocks), which is what XLA reports for sequences within one attention block.

Each model family registers a function `(model_cfg, seq_len, *, causal) -> FlopCount` in `FLOPS_BY_MODEL`;
`training_flops_per_token` dispatches on `model.name`, so MoE or byte-level models add their own counts.

Peak FLOP/s come from public datasheets (`ACCELERATORS`); on a CPU the peak is measured once with a jitted
matmul and cached (see `machine_peak_flops`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Callable

# ---------------------------------------------------------------------------------------------- counts


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """FLOPs per token, summed over layers. `forward` is their total; `training` = 3 x forward."""
  q: float = 0.0
  k: float = 0.0
  v: float = 0.0
  o: float = 0.0
  attention: float = 0.0   # scores q.k and the weighted sum of values
  mlp: float = 0.0         # SwiGLU gate, up and down projections (of the experts a token is sent to, for MoE)
  router: float = 0.0      # MoE routers: one logit per expert
  logits: float = 0.0      # unembedding
  embedding: float = 0.0   # a gather: 0
  patches: float = 0.0     # Transfusion: patch in/out projections and the diffusion-timestep MLP

  @property
  def forward(self) -> float:
    return (self.q + self.k + self.v + self.o + self.attention + self.mlp + self.router + self.logits
            + self.embedding + self.patches)

  @property
  def training(self) -> float:
    return 3.0 * self.forward

  def as_dict(self) -> dict[str, float]:
    d = dataclasses.asdict(self)
    d.update(forward=self.forward, training=self.training)
    return d


def attended_keys(seq_len: int, *, causal: bool = True, window: int = 0) -> float:
  """Average number of keys a query attends to (L_ctx).

  causal=False: every query is scored against all `seq_len` keys, as a dense masked implementation does
  (a window is only a mask there, so it saves nothing). causal=True: query i (1-based) sees min(i, w) keys
  (w = window, or seq_len if none), averaged over the sequence: (L + 1) / 2 without a window."""
  if not causal:
    return float(seq_len)
  w = min(window, seq_len) if window else seq_len
  # sum_{i=1}^{L} min(i, w) = w (w + 1) / 2 + (L - w) w
  return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def _head_dim(m) -> int:
  return int(m.head_dim) or int(m.d_model) // int(m.n_heads)


def _require_vocab(m) -> int:
  vocab = int(m.vocab_size)
  if vocab <= 0:
    from common.config import ConfigError  # local: keeps this module importable without ml_collections
    raise ConfigError(f"config key 'model.vocab_size': FLOP and parameter counts need the resolved "
                      f"vocabulary size, got {vocab}")
  return vocab


def moe_layout(model_cfg) -> tuple[int, int, int, float]:
  """(MoE layers, experts, expert d_ff, experts per token) of a dense LM config; (0, 0, 0, 0) when dense.

  Experts per token: k for token choice, counted before capacity drops (model FLOPs, as Artetxe et al. 2021
  count them: what the routing asks for, not what padding or dropping executes); capacity_factor for expert
  choice, where the E experts take capacity_factor * S / E tokens each (Zhou et al. 2022)."""
  moe = model_cfg.get("moe")
  if not moe or int(moe.num_experts) == 0:
    return 0, 0, 0, 0.0
  n_moe = int(model_cfg.n_layers) // int(moe.every)
  per_token = float(moe.capacity_factor) if moe.routing == "expert_choice" else float(moe.top_k)
  return n_moe, int(moe.num_experts), int(moe.d_ff) or int(model_cfg.d_ff), per_token


def dense_lm_flops(model_cfg, seq_len: int, *, causal: bool = True) -> FlopCount:
  """Forward FLOPs per token of `common.models.dense_lm.DenseLM` (GQA attention, SwiGLU, untied or tied
  output projection; the tied projection costs the same matmul). With `model.moe`, an MoE layer costs its
  router (2 d E) and the SwiGLUs of the experts each token is sent to (see `moe_layout`)."""
  m = model_cfg
  d, n, hd = int(m.d_model), int(m.n_layers), _head_dim(m)
  h, kv, ff = int(m.n_heads), int(m.n_kv_heads), int(m.d_ff)
  vocab = _require_vocab(m)
  ctx = attended_keys(seq_len, causal=causal, window=int(m.get("window", 0) or 0))
  n_moe, n_experts, expert_ff, per_token = moe_layout(m)
  return FlopCount(
      q=n * 2 * d * h * hd,
      k=n * 2 * d * kv * hd,
      v=n * 2 * d * kv * hd,
      o=n * 2 * h * hd * d,
      attention=n * 2 * 2 * h * hd * ctx,  # q.k^T and probs.v, each 2 * h * hd per key
      mlp=(n - n_moe) * 3 * 2 * d * ff + n_moe * per_token * 3 * 2 * d * expert_ff,
      router=n_moe * 2 * d * n_experts,
      logits=2 * d * vocab,
  )


FLOPS_BY_MODEL: dict[str, Callable[..., FlopCount]] = {"dense_lm": dense_lm_flops}


def register_flops(name: str, fn: Callable[..., FlopCount]) -> None:
  """Adds the FLOP count of a model family (`model.name`), e.g. from a paper package."""
  FLOPS_BY_MODEL[name] = fn


def blt_mean_patch_size(model_cfg) -> float:
  """Mean bytes per patch the BLT FLOP count assumes: `model.patching.patch_size` (capped by a positive
  `max_patch_length`). Exact for static patching; for space and entropy patching the mean depends on the data
  (and the threshold), so `patch_size` must be set to the measured mean (`eval/bytes_per_patch` of a run)."""
  p = model_cfg.get("patching")
  size = float(p.patch_size) if p is not None else 4.0
  if p is not None and int(p.get("max_patch_length", 0) or 0) > 0:
    size = min(size, float(p.max_patch_length))
  return size


def blt_flops(model_cfg, seq_len: int, *, causal: bool = True) -> FlopCount:
  """Forward FLOPs per *byte* of `blt.model.BLT` (Pagnoni et al. 2024, "Byte Latent Transformer", appendix on
  FLOP computation: local encoder and decoder per byte, global transformer per patch, so divided by the mean
  patch size P; the hash n-gram embeddings are lookups and cost 0, however many hash functions: their sum is
  element-wise work).

  Per byte, with d_l = model.d_local, d_g = model.d_global, L = seq_len, P = `blt_mean_patch_size`, N = L / P
  patches per row, r = 1 / P the patches per byte, and k = model.cross_attn_k query (and key/value) slots per
  patch (the architecture switches of `blt.model.Ablations`, each missing key read as its default):
    * local encoder / decoder layers: a dense-LM layer of width d_l (q, k, v, o, SwiGLU) with windowed causal
      attention over `attended_keys(L, window=local_window)` keys;
    * encoder cross-attentions (one, or one per layer under encoder_cross 'every', none under 'none'; k patch
      query slots over the bytes of their own patch): k, v per byte; q, o per slot (x k r); scores + values
      4 d_l per byte and slot (each byte is the key of its patch's k queries); once per patch (x r), the
      pooled state -> k slots projection (d_l -> k d_l, only for k > 1) and k d_l -> d_g (pooling-only: d_l);
    * global transformer: a dense-LM layer stack of width d_g over N patches, x r (no logits);
    * decoder cross-attentions (before every layer, or one under decoder_cross 'first' / 'last'; bytes over
      the k slots of the patches they read): q, o per byte; k, v per slot (x k r) from the d_kv-wide slots,
      d_kv = d_g for k = 1 and d_l for k > 1, where the d_g -> k d_l projection runs once per patch (counted
      half under k, half under v); scores + values 4 d_l per attended slot: k (N - 1) / 2 on average over all
      earlier patches, k under decoder_patch_scope 'own' (the paper's m = k);
    * logits: 2 d_l V per byte.
  causal=False counts what our dense masked implementation executes: every query scores all keys (L bytes
  locally, all patch slots in the cross-attentions and the global model), with `model.patching.max_patches`
  slots per row when positive (else N), so r = slots / L."""
  m = model_cfg
  dl, dg, vocab = int(m.d_local), int(m.d_global), _require_vocab(m)
  p_mean = blt_mean_patch_size(m)
  slots = seq_len / p_mean
  if not causal and m.get("patching") is not None and int(m.patching.get("max_patches", 0) or 0) > 0:
    slots = float(m.patching.max_patches)
  r = slots / seq_len

  def layer(d, heads, d_ff, ctx):  # one dense layer (MHA, SwiGLU), FLOPs per position
    return dict(q=2 * d * d, k=2 * d * d, v=2 * d * d, o=2 * d * d, attention=4 * d * ctx,
                mlp=3 * 2 * d * (d_ff or 4 * d))

  c = dict(q=0.0, k=0.0, v=0.0, o=0.0, attention=0.0, mlp=0.0)

  def add(parts, times=1.0):
    for key, value in parts.items():
      c[key] += times * value

  k = int(m.get("cross_attn_k", 1))
  n_enc_cross = dict(last=1, every=int(m.n_layers_encoder), none=0)[m.get("encoder_cross", "last")]
  n_dec_cross = int(m.n_layers_decoder) if m.get("decoder_cross", "every") == "every" else 1
  k_enc = k if n_enc_cross else 1  # pooling alone makes one d_l vector per patch
  local_ctx = attended_keys(seq_len, causal=causal, window=int(m.local_window or 0))
  local = layer(dl, int(m.n_heads_local), int(m.d_ff_local), local_ctx)
  add(local, int(m.n_layers_encoder) + int(m.n_layers_decoder))
  # encoder: the query slots and the projection to the global width, per patch; the cross-attentions
  add(dict(q=(2 * dl * k_enc * dl if k_enc > 1 else 0.0) * r, o=2 * k_enc * dl * dg * r))
  add(dict(q=2 * dl * dl * k_enc * r, k=2 * dl * dl, v=2 * dl * dl, o=2 * dl * dl * k_enc * r,
           attention=4 * dl * k_enc * (1.0 if causal else slots)), n_enc_cross)
  # global transformer over patches
  global_ctx = attended_keys(slots, causal=causal) if causal else slots
  add(layer(dg, int(m.n_heads_global), int(m.d_ff_global), global_ctx), int(m.n_layers_global) * r)
  # decoder: the key/value slots of each patch; the cross-attentions
  d_kv = dg if k == 1 else dl
  if k > 1:
    add(dict(k=dg * k * dl * r, v=dg * k * dl * r))
  if not causal:
    dec_ctx = slots
  else:
    dec_ctx = 1.0 if m.get("decoder_patch_scope", "all") == "own" else (slots - 1) / 2
  add(dict(q=2 * dl * dl, k=2 * d_kv * dl * k * r, v=2 * d_kv * dl * k * r, o=2 * dl * dl,
           attention=4 * dl * k * dec_ctx), n_dec_cross)
  return FlopCount(**c, logits=2 * dl * vocab)


register_flops("blt", blt_flops)


def blt_inference_flops_per_byte(model_cfg, seq_len: int, *, entropy_model_cfg=None) -> float:
  """Forward FLOPs per byte of generating with a BLT: `blt_flops` (causal) plus, under entropy patching, the
  entropy model's forward on every byte (Pagnoni et al. 2024, sec. 2.3: the small byte LM runs ahead of the
  BLT to place each boundary, so its cost is paid per byte at inference). `entropy_model_cfg` is that byte
  LM's `model` section (any registered family, e.g. a windowed dense LM)."""
  total = blt_flops(model_cfg, seq_len, causal=True).forward
  if entropy_model_cfg is not None:
    total += flops_for(entropy_model_cfg, seq_len, causal=True).forward
  return total


def moma_flops(model_cfg, seq_len: int, *, causal: bool = True) -> FlopCount:
  """Forward FLOPs per token of `moma.model.MoMaLM` (Lin et al. 2024, arXiv 2407.21770): the dense LM's layers
  (shared GQA attention) with, per `model.moma`:
    * an expert layer (`experts` non-empty, every `every`-th layer): capacity_factor SwiGLUs of width
      `moma.d_ff` (or `model.d_ff`) per token (expert choice: E_m experts of a group take c N_m / E_m of its
      N_m tokens each, before rounding the capacities up) and the router, 2 d E (all E logits are computed);
    * a mixture-of-depths layer (`mod_layers`): a share p = ceil(mod_capacity L) / L of the tokens runs the
      whole layer (projections, FFN, expert router: x p) and attends within those pL tokens (x p at
      `attended_keys(pL)` keys), plus the depth router, 2 d, on every token (Raposo et al. 2024, sec. 3)."""
  m = model_cfg
  mm = m.moma
  d, n, hd = int(m.d_model), int(m.n_layers), _head_dim(m)
  h, kv, ff = int(m.n_heads), int(m.n_kv_heads), int(m.d_ff)
  experts = tuple(int(e) for e in mm.experts)
  expert_ff = int(mm.d_ff) or ff
  mod_layers = {int(i) for i in mm.mod_layers}
  window = int(m.get("window", 0) or 0)
  c = dict(q=0.0, k=0.0, v=0.0, o=0.0, attention=0.0, mlp=0.0, router=0.0)
  for i in range(n):
    share, length = 1.0, seq_len
    if i in mod_layers:
      length = max(1, min(seq_len, math.ceil(float(mm.mod_capacity) * seq_len)))
      share = length / seq_len
      c["router"] += 2 * d
    ctx = attended_keys(length, causal=causal, window=window)
    c["q"] += share * 2 * d * h * hd
    c["k"] += share * 2 * d * kv * hd
    c["v"] += share * 2 * d * kv * hd
    c["o"] += share * 2 * h * hd * d
    c["attention"] += share * 2 * 2 * h * hd * ctx
    if experts and (i + 1) % int(mm.every) == 0:
      c["mlp"] += share * float(mm.capacity_factor) * 3 * 2 * d * expert_ff
      c["router"] += share * 2 * d * sum(experts)
    else:
      c["mlp"] += share * 3 * 2 * d * ff
  return FlopCount(**c, logits=2 * d * _require_vocab(m))


register_flops("moma_lm", moma_flops)


def mot_flops(model_cfg, seq_len: int, *, causal: bool = True) -> FlopCount:
  """Forward FLOPs per token of `mot.model.MoTLM` / `mot.transfusion.TransfusionLM` (Liang et al. 2024, arXiv
  2411.04996): a token goes through one modality's weights, so the layers cost the dense LM's (untied or
  not). The Transfusion setting (`model.setting`) adds, on every position (as executed: the results are
  selected per position), the patch projections in and out (2 x 2 d patch_dim) and the timestep MLP
  (2 x 2 d^2, on a sinusoid of width d); its attention is counted causal as the dense LM's (the
  bidirectional part within an image is a few keys per image query)."""
  count = dense_lm_flops(model_cfg, seq_len, causal=causal)
  if model_cfg.get("setting", "chameleon") != "transfusion":
    return count
  d = int(model_cfg.d_model)
  return dataclasses.replace(count, patches=2 * 2 * d * int(model_cfg.patch_dim) + 2 * 2 * d * d)


register_flops("mot", mot_flops)


def flops_for(model_cfg, seq_len: int, *, causal: bool = True) -> FlopCount:
  name = model_cfg.name
  if name not in FLOPS_BY_MODEL:
    from common.config import ConfigError
    raise ConfigError(f"config key 'model.name': no FLOP count registered for '{name}' "
                      f"(known: {', '.join(sorted(FLOPS_BY_MODEL))})")
  return FLOPS_BY_MODEL[name](model_cfg, seq_len, causal=causal)


def training_flops_per_token(model_cfg, seq_len: int, *, causal: bool = True) -> float:
  """Model FLOPs of one training step per token (forward + backward), the numerator of MFU."""
  return flops_for(model_cfg, seq_len, causal=causal).training


def param_count(model_cfg) -> dict[str, int]:
  """Parameters of a dense LM, analytically. `non_embedding` leaves out the embedding table and the output
  projection (Kaplan et al. 2020 count N without them); a tied table is counted once in `total`. With MoE
  layers, `active_non_embedding` counts only the parameters a token uses (the router and top-k experts)."""
  m = model_cfg
  d, n, hd = int(m.d_model), int(m.n_layers), _head_dim(m)
  h, kv, ff = int(m.n_heads), int(m.n_kv_heads), int(m.d_ff)
  vocab = _require_vocab(m)
  attn = d * h * hd + 2 * d * kv * hd + h * hd * d + (2 * hd if m.get("qk_norm", False) else 0)
  attn += (h + 2 * kv) * hd if m.get("qkv_bias", False) else 0
  layer = attn + 3 * d * ff + 2 * d  # + the two RMSNorm scales
  n_moe, n_experts, expert_ff, per_token = moe_layout(m)
  moe_extra = n_moe * (n_experts * 3 * d * expert_ff + d * n_experts - 3 * d * ff)  # experts + router - SwiGLU
  non_embedding = n * layer + d + moe_extra  # + the final norm
  embedding = vocab * d * (1 if m.tie_embeddings else 2)
  out = dict(total=non_embedding + embedding, non_embedding=non_embedding)
  if n_moe:
    out["active_non_embedding"] = int(non_embedding - n_moe * (n_experts - per_token) * 3 * d * expert_ff)
  return out


# ---------------------------------------------------------------------------------------- peak FLOP/s


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """Dense (no structured sparsity) peak FLOP/s per chip and its HBM in GiB.

  `float32` is the rate of a float32 matmul at JAX's default precision, which rounds inputs to TF32 on
  Ampere/Hopper GPUs and to bfloat16 (one pass) on TPUs (JAX docs, "Matmul precision"); `float32_highest`
  is true IEEE float32 (precision='highest': CUDA cores on GPU, six bf16 passes on TPU)."""
  name: str
  bfloat16: float
  float32: float
  float32_highest: float
  hbm_gib: float


T = 1e12
# Sources (public datasheets, dense numbers):
#  TPU v4: 275 TFLOP/s bf16, 32 GiB HBM (cloud.google.com/tpu/docs/v4; Jouppi et al. 2023).
#  TPU v5e: 197 TFLOP/s bf16, 16 GiB (cloud.google.com/tpu/docs/v5e).
#  TPU v5p: 459 TFLOP/s bf16, 95 GiB (cloud.google.com/tpu/docs/v5p).
#  TPU v6e (Trillium): 918 TFLOP/s bf16, 32 GiB (cloud.google.com/tpu/docs/v6e).
#  A100 SXM: 312 bf16, 156 TF32, 19.5 FP32 TFLOP/s, 40/80 GB (NVIDIA A100 datasheet); we take 80.
#  H100 SXM: 989 bf16, 494.7 TF32, 67 FP32 TFLOP/s, 80 GB (NVIDIA H100 datasheet, the "with sparsity"
#    figures halved). H100 PCIe: 756 / 378 / 51, 80 GB.
#  H200 SXM: same compute as H100 SXM, 141 GB (NVIDIA H200 datasheet).
ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("v4", 275 * T, 275 * T, 275 * T / 6, 32),
    Accelerator("v5e", 197 * T, 197 * T, 197 * T / 6, 16),
    Accelerator("v5p", 459 * T, 459 * T, 459 * T / 6, 95),
    Accelerator("v6e", 918 * T, 918 * T, 918 * T / 6, 32),
    Accelerator("a100", 312 * T, 156 * T, 19.5 * T, 80),
    Accelerator("h100", 989 * T, 494.7 * T, 67 * T, 80),
    Accelerator("h100_pcie", 756 * T, 378 * T, 51 * T, 80),
    Accelerator("h200", 989 * T, 494.7 * T, 67 * T, 141),
)}

# (pattern on the lower-cased device_kind or user name with spaces/dashes/underscores removed, name).
# Order matters: 'v5 lite' before 'v5', 'h100 pcie' before 'h100'. JAX reports e.g. 'TPU v4', 'TPU v5 lite'
# (v5e), 'TPU v5' or 'TPU v5p', 'TPU v6 lite' (v6e), 'NVIDIA A100-SXM4-80GB', 'NVIDIA H100 80GB HBM3',
# 'NVIDIA H100 PCIe', 'NVIDIA H200', 'NVIDIA GH200 480GB'.
_KIND_PATTERNS = (
    (r"v6(e|lite)", "v6e"), (r"trillium", "v6e"),
    (r"v5(e|lite)", "v5e"), (r"v5p?($|[^0-9])", "v5p"), (r"v4", "v4"),
    (r"h200", "h200"), (r"h100.*pcie", "h100_pcie"), (r"h100", "h100"), (r"a100", "a100"),
)


def accelerator_for(kind: str) -> Accelerator | None:
  """The table entry for a device_kind string or a short name ('h100', 'TPU v5 lite', 'v5e'); None if
  unknown."""
  key = re.sub(r"[\s\-_]+", "", kind.lower())
  if key in ACCELERATORS:
    return ACCELERATORS[key]
  for pattern, name in _KIND_PATTERNS:
    if re.search(pattern, key):
      return ACCELERATORS[name]
  return None


def _peak_of(acc: Accelerator, dtype: str) -> float:
  aliases = {"bf16": "bfloat16", "f32": "float32", "tf32": "float32", "fp32": "float32_highest"}
  dtype = aliases.get(dtype, dtype)
  if dtype not in ("bfloat16", "float32", "float32_highest"):
    raise ValueError(f"unknown dtype '{dtype}' (expected bfloat16, float32 or float32_highest)")
  return getattr(acc, dtype)


# ----------------------------------------------------------------------------------- CPU calibration

CPU_PEAK_ENV = "META_PAPERS_CPU_PEAK"        # machine peak in FLOP/s (e.g. '2e11'); skips the calibration
CACHE_DIR_ENV = "META_PAPERS_CACHE_DIR"      # overrides ~/.cache/meta_papers_jax


def cache_dir() -> str:
  return os.path.expanduser(os.environ.get(CACHE_DIR_ENV) or os.path.join("~", ".cache", "meta_papers_jax"))


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith(("model name", "hardware", "cpu model")):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor() or platform.machine() or "unknown"


def _calibration_key() -> str:
  import jax
  return f"{_cpu_model()}|cpus={os.cpu_count()}|jax={jax.__version__}"


def measure_cpu_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """Best observed FLOP/s of a jitted f32 [n, n] x [n, n] matmul on the default CPU backend. Best, not
  median: the peak is what the machine can do; slower repeats are noise from other processes."""
  import jax
  import jax.numpy as jnp
  cpu = jax.devices("cpu")[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
  b = jax.device_put(jnp.full((n, n), 0.5, jnp.float32), cpu)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()  # compile and warm up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def machine_peak_flops(*, cache: bool = True, n: int = 2048, repeats: int = 5) -> float:
  """Peak FLOP/s of this CPU machine (all cores together).

  `META_PAPERS_CPU_PEAK` (FLOP/s) wins; otherwise the cached calibration of this CPU model, core count and
  JAX version in `<cache_dir>/cpu_peak.json`; otherwise a measurement (a second or two), then cached."""
  env = os.environ.get(CPU_PEAK_ENV)
  if env:
    try:
      value = float(env)
    except ValueError:
      value = -1.0
    if value <= 0:
      raise ValueError(f"{CPU_PEAK_ENV}={env!r}: expected a positive number of FLOP/s")
    return value
  path = os.path.join(cache_dir(), "cpu_peak.json")
  key = _calibration_key()
  table = {}
  if cache and os.path.isfile(path):
    try:
      with open(path) as f:
        table = json.load(f)
      if float(table.get(key, 0)) > 0:
        return float(table[key])
    except (OSError, ValueError, TypeError, AttributeError):
      table = {}
  value = measure_cpu_matmul_flops(n, repeats)
  if cache:
    table = table if isinstance(table, dict) else {}
    table[key] = value
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  return value


def peak_flops_per_device(device=None, dtype: str = "float32") -> float:
  """Peak FLOP/s of one device (default: jax.devices()[0]) for matmuls in `dtype`.

  On CPU the machine peak is divided among the CPU devices (XLA's simulated devices share the cores).
  Raises ValueError for an accelerator missing from `ACCELERATORS`."""
  import jax
  device = jax.devices()[0] if device is None else device
  if device.platform == "cpu":
    return machine_peak_flops() / len(jax.devices("cpu"))
  acc = accelerator_for(device.device_kind)
  if acc is None:
    raise ValueError(f"no peak FLOP/s known for device kind '{device.device_kind}' "
                     f"(known: {', '.join(ACCELERATORS)}); add it to common.flops.ACCELERATORS")
  return _peak_of(acc, dtype)


def accelerator_peak(name: str, dtype: str = "bfloat16") -> float:
  """Peak FLOP/s of a named accelerator ('h100', 'v5e', ...), for planning runs on hardware we lack."""
  acc = accelerator_for(name)
  if acc is None:
    raise ValueError(f"unknown accelerator '{name}' (known: {', '.join(ACCELERATORS)})")
  return _peak_of(acc, dtype)


def mfu(model_flops_per_sec: float, n_devices: int, peak_per_device: float) -> float:
  """Model FLOPs utilisation (PaLM, appendix B): achieved model FLOP/s over the peak of all devices."""
  return model_flops_per_sec / (n_devices * peak_per_device)
