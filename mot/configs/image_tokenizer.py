"""The discrete image tokenizer of the Chameleon setting: a VQ-VAE (van den Oord et al. 2017) with 256 codes
of 32 dims, 8x8 tokens per 32x32 scene image, 400 steps of 64 images (about a minute on a 2-core CPU).
`default_image_tokenizer` trains exactly this config (at the requested image size) when no run is named.

`python -m mot.train_image_tokenizer --config=mot/configs/image_tokenizer.py[:image_size=64] --workdir=DIR`
"""
from common.config import config_args
from common.tasks.vq import vq_config


def get_config(arg=None):
  args = config_args(arg, {"image_size": "32"})
  return vq_config(int(args["image_size"]))
