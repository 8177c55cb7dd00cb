"""The shared checkpoint library (`library`): named checkpoints with their model config and tokenizer.
`python -m common.hub` lists, shows and publishes entries (`__main__`)."""
from common.hub.library import (DEFAULT_ROOT, ENV_ROOT, describe, entry_tokenizer, hub_root, list_checkpoints,
                                load, save)

__all__ = ["DEFAULT_ROOT", "ENV_ROOT", "describe", "entry_tokenizer", "hub_root", "list_checkpoints", "load", "save"]
