"""The `model` section of the MoT trainers (`mot.train.build_mot_model`).

Keys beyond the dense LM's (`common.configs.base.dense_model`):
- `name`: 'mot' (modality-untied) or 'dense_lm' (the common dense LM; Chameleon setting only);
- `untied`: False keeps one weight set for every modality: with `name='mot'` the dense baseline of the same
  code (the Transfusion setting's dense baseline);
- `n_modalities`: weight sets of an untied model (the data's modalities: 2 for text + image, 3 with audio);
- `setting`: 'chameleon' (discrete tokens for every modality, next-token loss) or 'transfusion' (text
  tokens + diffusion over continuous image patches);
- `grouped_impl`: the grouped matmul of the untied products (`common.kernels.grouped_matmul`; 'auto');
- `norm_placement`: 'pre' (RMSNorm on each sublayer's input, Llama style; also what a config without the key
  means) or 'post' (on each sublayer's output, the paper's Algorithm 1 after Chameleon sec. 2.3; tiny.py and
  reproduce.py use it, with the dense baseline `name='mot', untied=False` so that both share the placement);
- Transfusion: `patch_dim` (patch_size^2 x 3), `patches_per_image` ((image_size / patch_size)^2), `boi_id`
  (the <boi> token of `common.data.mixed_modal.MixedVocab`, 259), `diffusion.schedule` ('cosine' |
  'linear'), `diffusion.steps` (T), `diffusion.loss_weight` (lambda of L_LM + lambda L_DDPM, each term its
  own mean; 5 in Transfusion sec. 4), `diffusion.sample_steps` (denoising steps of image generation),
  `diffusion.caption_dropout` (probability that a training document's image is conditioned on an empty
  caption, for classifier-free guidance; 0.1 in Transfusion's image-generation runs, 0 here: no dropout).
Both models of a comparison share every shape, so FLOPs per token match (`common.flops`: an untied layer
costs a dense one).
"""
from __future__ import annotations

import ml_collections

from common.configs.base import dense_model


def mot_model(**overrides) -> ml_collections.ConfigDict:
  """The MoT model section; keyword overrides replace defaults (`diffusion=dict(...)` updates that
  subsection)."""
  diffusion_overrides = overrides.pop("diffusion", {})
  m = dense_model(
      name="mot", untied=True, n_modalities=2, setting="chameleon", qk_norm=True, grouped_impl="auto",
      norm_placement="pre", patch_dim=48, patches_per_image=64, boi_id=259,
      diffusion=ml_collections.ConfigDict(dict(schedule="cosine", steps=1000, loss_weight=5.0, sample_steps=50,
                                               caption_dropout=0.0)),
  )
  del m["moe"]
  m.update(overrides)
  m.diffusion.update(diffusion_overrides)
  return m
