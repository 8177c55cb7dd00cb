"""`tiny-base`: the 3.7 M-parameter dense LM that the fine-tuning papers' small-scale reproductions start from
(`python -m common.recipes.pretrain_base`): the embedded corpus mixed with generated instruction-style text,
1,000 steps of 16 x 256 tokens, sized to stay under 40 minutes on 2 idle CPU cores.

Tokenizer: a 2,048-piece SentencePiece model trained on the corpus (seconds). It holds 2.73 bytes of held-out
corpus text per token against 1 for bytes, for 12% more training FLOPs per token (23.6 against 21.0 M: the
larger softmax), so a CPU-minute sees about 2.4 times as much text, and a 256-token row 2.7 times the
context; 4,096 pieces would add 10% bytes per token for another 13% FLOPs per token.

Arguments (`--config=common/configs/tiny_base.py:steps=20,tokenizer=byte`): `steps`, and `tokenizer`
('spm': a local SentencePiece model, trained into the workdir unless `data.spm_model` names one; 'byte')."""
import ml_collections

from common.config import config_args
from common.configs.base import base_config, dense_model


def get_config(arg=None):
  args = config_args(arg, {"steps": "1000", "tokenizer": "spm"})
  c = base_config()
  c.model = dense_model(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=768)
  steps = int(args["steps"])
  c.train.update(steps=steps, batch_size=16, learning_rate=2e-3, warmup_steps=min(100, max(steps // 10, 1)))
  c.data.update(vocab=args["tokenizer"], seq_len=256, max_eval_bytes=200_000)
  c.checkpoint.update(every_steps=250, keep=2)
  c.log.every_steps = 25
  c.eval.update(every_steps=500, batches=4)
  c.pretrain = ml_collections.ConfigDict(dict(
      tokenizer_vocab_size=2048,      # pieces of the SentencePiece model trained when data.spm_model is ''
      instruction_fraction=0.25,      # share of each batch's rows that hold generated instruction text
      num_instruction_examples=60_000,
      instruction_seed=0,             # the held-out questions come from instruction_seed + 1
      eval_questions=300,             # held-out generated questions answered greedily after training
      max_answer_tokens=24,
  ))
  return c
