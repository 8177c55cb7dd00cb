"""The shared checkpoint library as users see it: named checkpoints with their model config and tokenizer
(`save`, `load`, `list_checkpoints`, `describe`; stored by `common.models.checkpoint_library`), publishing a
training run as an entry (`publish`), and `python -m common.hub list | show | publish` (`__main__`)."""
from common.hub.publish import publish
from common.models.checkpoint_library import (DEFAULT_ROOT, ENV_ROOT, describe, entry_tokenizer, hub_root,
                                              list_checkpoints, load, save)

__all__ = ["DEFAULT_ROOT", "ENV_ROOT", "describe", "entry_tokenizer", "hub_root", "list_checkpoints", "load",
           "publish", "save"]
