"""The config file that emitted sweep commands start from (`--config=common/scaling/family_config.py`).

The sweep (commands.py) writes each run as this skeleton plus every key on which the run's config differs
from it, so that a cluster scheduler needs nothing but the command line; this file therefore holds every key
a family may set: the shared trainer sections and the dense LM's model section.
"""
from common.configs.base import base_config, dense_model


def get_config():
  c = base_config()
  c.model = dense_model()
  return c
