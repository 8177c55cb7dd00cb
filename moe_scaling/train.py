"""`python -m moe_scaling.train --config=moe_scaling/configs/tiny.py --workdir=DIR [--config.K=V]`

Trains a dense or MoE LM with the shared trainer: the objective adds the MoE balancing loss, and metrics.jsonl
carries `nll` (cross-entropy alone), `moe/*` routing statistics and `eval/nll`, `eval/bpb`.
"""
from common.train.__main__ import cli

if __name__ == "__main__":
  cli()
