"""Mixture-of-experts layers shared by the MoE papers (moe_scaling, MoMa): a float32 router with noise and
z-loss, token choice top-k (capacity-bounded as in GShard/fairseq, or dropless with a grouped matmul),
expert choice, the load-balancing loss and routing statistics (padding masked out of all of them), a
separate evaluation capacity, and expert parallelism with all-to-all inside `jax.shard_map`.

References: Shazeer et al. 2017 (arXiv 1701.06538); GShard, Lepikhin et al. 2020 (arXiv 2006.16668);
Switch Transformers, Fedus et al. 2021 (arXiv 2101.03961); Artetxe et al. 2021, "Efficient Large Scale
Language Modeling with Mixtures of Experts" (arXiv 2112.10684); expert choice, Zhou et al. 2022
(arXiv 2202.09368); ST-MoE, Zoph et al. 2022 (arXiv 2202.08906).
"""
from common.nn.moe.aux import moe_loss_terms, summarize_aux
from common.nn.moe.experts import Experts, run_batched, run_grouped
from common.nn.moe.forward import MoESettings, moe_forward
from common.nn.moe.layer import MoE, pop_moe_aux
from common.nn.moe.router import Router, balance_loss, entropy, z_loss
from common.nn.moe.routing import (Assignment, Dispatch, assign_expert_choice, assign_token_choice,
                                   dispatch_from_assignment, eval_capacity, expert_capacity, token_capacity)
