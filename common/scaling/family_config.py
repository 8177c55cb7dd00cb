"""The config file that emitted sweep commands start from (`--config=common/scaling/family_config.py`).

`common.config.load` applies `path.py:k=v` pairs as overrides and does not hand them to `get_config`, so a
family cannot be selected through the file argument. Instead the sweep (commands.py) writes each run as this
skeleton plus every key on which the run's config differs from it; this file therefore holds every key a
family may set: the shared trainer sections and the dense LM's model section.
"""
from common.configs.base import base_config, dense_model


def get_config(arg=None):
  del arg
  c = base_config()
  c.model = dense_model()
  return c
