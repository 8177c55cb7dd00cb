"""`python -m mot.train_image_tokenizer --config=mot/configs/image_tokenizer.py --workdir=DIR [--config.K=V ...]`

Trains the VQ image tokenizer of the Chameleon setting (`common.models.vq_autoencoder`) with the shared trainer
(resume, SIGTERM, exit 2 on bad input). Its workdir is what `data.image_tokenizer` of the mixed-modal trainers
names; they read it with `common.recipes.image_tokenizer.load_image_tokenizer`.
"""
from __future__ import annotations

from common.tasks.vq import validate_vq_task_config, vq_task
from common.train.__main__ import cli as common_cli


def cli() -> None:
  common_cli(vq_task, validate_vq_task_config)


if __name__ == "__main__":
  cli()
