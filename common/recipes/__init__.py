"""Commands and functions that run training to make an artefact another package starts from: the tiny base
LM (`pretrain_base`) and the default image tokenizer (`image_tokenizer`). Above `common.train` in the floors."""
