"""`python -m moma.train --config=moma/configs/tiny.py[:variant=dense|moe|moma|moma_mod] --workdir=DIR`

Trains one of the models of the MoMa comparison (Lin et al. 2024, arXiv 2407.21770, table 2) on mixed-modal data
in the Chameleon setting (image tokens from the VQ tokenizer) with the shared trainer (common/train): resume,
SIGTERM and exit status 2 on bad input as every trainer. metrics.jsonl carries `nll` (cross-entropy without
auxiliary losses), the per-modality losses of `common.tasks.mixed_modal` (`loss_text`, `loss_image`,
`eval/loss_image`, ...) and the routing statistics the model sows, averaged over its routed layers
(`moma.model.moma_loss_terms`): `moe/load_<e>` (each expert's share of the selected pairs), `moe/max_load_ratio`,
`moe/fraction_dropped` (tokens no expert of their group took), `moe/router_entropy`, `moe/z_loss`, and with
mixture-of-depths `mod/selected_fraction` and `mod/router_weight`.
"""
from common.config import require
from common.data.mixed_modal import validate_data_config
from common.recipes import image_tokenizer
from common.tasks import mixed_modal
from common.tasks.mixed_modal import mixed_modal_task, per_modality_nll, train_view
from common.train.__main__ import cli
from moma.model import build_moma_model, moma_loss_terms, validate_moma_config


def moma_loss(model, batch):
  """Summed next-token cross-entropy over loss_mask plus the model's auxiliary losses (router z-loss, if
  weighted) times the token count; as metric sums: `nll`, each modality's nll and loss, routing statistics."""
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"], batch["modality"])
  nll_sum, weight, sums = per_modality_nll(logits, batch)
  aux, routing_sums = moma_loss_terms(model, weight)
  sums.update(train_view(sums, weight))
  sums.update(nll=nll_sum, **routing_sums)
  return nll_sum + aux, weight, sums


def resolve(cfg):
  """Fills model.vocab_size 0 with the mixed vocabulary of data.* (in place; returns cfg), before any data or
  tokenizer is built (`common.tasks.mixed_modal.resolve`)."""
  images = "image" in cfg.data.modalities
  return mixed_modal.resolve(cfg, image_tokenizer.codebook_size(cfg.data) if images else 0)


def validate(cfg) -> None:
  """data.* and model.* checks of a resolved config (`resolve`), naming the key."""
  require(cfg.data.setting == "chameleon", "data.setting",
          f"moma trains on discrete image tokens: 'chameleon', got '{cfg.data.setting}'")
  validate_data_config(cfg.data)
  validate_moma_config(cfg.model)


def make_task(cfg):
  """The Task of the shared loop on a resolved config (`resolve`)."""
  return mixed_modal_task(cfg, build_moma_model, loss_fn=moma_loss, image_tokenizer=image_tokenizer.for_data(cfg.data))


if __name__ == "__main__":
  cli(make_task, validate, resolve)
