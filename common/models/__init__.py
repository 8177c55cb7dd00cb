"""Whole models shared by several papers, built by name from `config.model`."""
from common.models.dense_lm import DenseLM, build_model, padded_vocab_size, register_model, validate_model_config
