"""Mixed-modal data (MoT, MoMa; Chameleon and Transfusion settings): one vocabulary over text, image and
audio tokens, generated scenes with captions, synthetic speech with a k-means tokenizer, packed documents."""
from __future__ import annotations

from common.data.mixed_modal.data import MixedModalData, mixed_modal_data_config, validate_data_config
from common.data.mixed_modal.vocab import AUDIO, IMAGE, MODALITIES, TEXT, MixedVocab

__all__ = ["MODALITIES", "TEXT", "IMAGE", "AUDIO", "MixedVocab", "MixedModalData", "mixed_modal_data_config",
           "validate_data_config"]
