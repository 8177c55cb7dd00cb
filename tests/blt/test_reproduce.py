"""blt.reproduce: FLOP-matched step counts, the seed interval, and a smoke run of the byte and BPE arms that
writes the table, the JSON and the plot, scores BPE on the held-out bytes, and skips finished runs."""
import json
import math
import os

import numpy as np
import pytest

from blt import reproduce
from common.scaling.intervals import t_interval


def test_t_interval_hand_computed():
  # values 1, 2, 3: mean 2, s = 1, t_{0.975, 2} = 4.302653 (t table) -> half-width 4.302653 / sqrt(3)
  mean, half = t_interval([1.0, 2.0, 3.0])
  assert mean == pytest.approx(2.0)
  assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
  mean, half = t_interval([0.5])
  assert mean == 0.5 and math.isnan(half)


def test_summary_reports_mean_and_interval_over_seeds():
  runs = [dict(label="byte", arm="byte", target_patch_size=None, steps=10, params=5, train_flops=1e9, bpb=b,
               patch_size=1.0, inference_flops_per_byte=2e5) for b in (1.0, 2.0, 3.0)]
  (row,) = reproduce.summarize(runs)
  assert row["seeds"] == 3 and row["bpb"] == pytest.approx(2.0)
  assert row["bpb_ci95"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
  assert row["patch_size_ci95"] == 0.0
  assert "| byte | 0.00 M | 10 | 1e+09 | 2e+05 ± 0 | 1.00 ± 0.00 | 2.0000 ± 2.4841 | 3 | " + reproduce.PAPER["byte"] + " |" in (
      reproduce.markdown([row], 1e9, []))


def test_ablations_are_space_blts_with_one_switch_in_a_second_table():
  from blt.configs.reproduce import get_config
  arms = reproduce.arm_list(["space"], [], dict(scale="quick"), ["no_hash", "pool_only"])
  assert [a.name for a in arms] == ["space", "space_no_hash", "space_pool_only"]
  base, no_hash, pool_only = (get_config(a.config.split(":", 1)[1]).model for a in arms)
  assert (base.hash_functions, no_hash.hash_functions, pool_only.encoder_cross) == (1, 0, "none")
  assert no_hash.encoder_cross == base.encoder_cross and pool_only.hash_functions == 1
  with pytest.raises(ValueError, match="ablation='k3'"):
    get_config("arm=space,ablation=k3")
  with pytest.raises(ValueError, match="on a BLT arm"):
    get_config("arm=byte,ablation=k2")
  records = [dict(a.extra, label=a.label, steps=10, params=5, train_flops=1e9, bpb=b + s, patch_size=7.0,
                  inference_flops_per_byte=2e5, paper=a.paper)
             for a, b in zip(arms, (2.0, 2.5, 2.1)) for s in (0.0, 0.2)]
  table = reproduce.markdown(reproduce.summarize(records), 1e9, [])
  main, ablations = table.split("Ablations of the space BLT")
  assert "| space |" in main and "no_hash" not in main
  assert "| space no_hash | 0.00 M | 10 | 2.6000 ± 1.2706 | +0.5000 | 2 | " + reproduce.ABLATION_PAPER["no_hash"] in ablations
  assert "| space pool_only |" in ablations and "+0.1000" in ablations


def test_trend_arm_is_the_deepest_global_model_within_the_reference_inference_flops():
  from blt.configs.reproduce import get_config
  from common.configs.base import dense_model
  from common.flops import blt_inference_flops_per_byte
  probe = get_config("arm=entropy,scale=quick,entropy_model=E")
  entropy_model = dense_model(vocab_size=384, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32, window=16)

  def per_byte(layers, size):
    m = probe.model.copy_and_resolve_references()
    m.n_layers_global, m.patching.patch_size = layers, size
    return blt_inference_flops_per_byte(m, 64, entropy_model_cfg=entropy_model)

  budget = per_byte(probe.model.n_layers_global, 4.5)
  layers = reproduce.trend_layers(probe, 4.5, 12.0, entropy_model)
  assert layers > probe.model.n_layers_global
  assert per_byte(layers, 12.0) <= budget < per_byte(layers + 1, 12.0)
  assert reproduce.trend_layers(probe, 4.5, 4.5, entropy_model) == probe.model.n_layers_global
  (arm,) = reproduce.arm_list([], [4.5], dict(scale="quick", entropy_model="E", threshold_12=3.1), trend={12.0: layers})
  assert (arm.name, arm.extra["trend"]) == (f"trendP12_L{layers}", True)
  cfg = get_config(arm.config.split(":", 1)[1])
  assert (cfg.model.n_layers_global, cfg.model.patching.threshold) == (layers, 3.1)


@pytest.mark.parametrize("budget,per_step", [(1e12, 3.7e9), (5e8, 1e9), (2e9, 7e7)])
def test_steps_match_the_budget_within_half_a_step(budget, per_step):
  steps = reproduce.steps_for_budget(budget, per_step)
  assert steps >= 1
  if budget >= per_step:
    assert abs(steps * per_step - budget) <= per_step / 2


def test_arms_name_one_run_folder_per_arm_and_entropy_size():
  arms = reproduce.arm_list(["byte", "entropy"], [4.5, 8.0], dict(scale="quick", entropy_model="E"))
  assert [a.name for a in arms] == ["byte", "entropyP4.5", "entropyP8"]
  assert [a.label for a in arms] == ["byte", "entropy P=4.5", "entropy P=8"]
  assert [a.trainer for a in arms] == ["common.train", "blt.train", "blt.train"]
  assert all(a.paper for a in arms)


def test_quick_byte_and_bpe_runs(tmp_path):
  out, budget = tmp_path / "out", 4e8
  argv = ["--quick", "--arms=byte,bpe", f"--budget={budget:g}", f"--out={out}", f"--cache_dir={tmp_path / 'cache'}"]
  assert reproduce.main(argv) == 0
  for name in ("results.md", "results.json", "bpb_vs_flops.png"):
    assert (out / name).stat().st_size > 0
  results = json.loads((out / "results.json").read_text())
  assert [r["label"] for r in results["summary"]] == ["byte", "bpe"]
  table = (out / "results.md").read_text()
  assert "| byte |" in table and "| bpe |" in table and "1 seed(s)" in table
  assert "| paper (fig. 1, up to 8B) |" in table and reproduce.PAPER["bpe"] in table
  for run in results["runs"]:
    assert abs(run["steps"] * run["flops_per_step"] - budget) <= run["flops_per_step"] / 2
    assert run["curves"]["bpb"]["flops"][-1] == pytest.approx(run["train_flops"])
    assert 0 < run["bpb"] < 12

  # BPE is scored per held-out byte: its positions are the SentencePiece tokens of the validation documents
  # plus one EOS each, counted here directly with sentencepiece (not through seqio's packed rows).
  import sentencepiece as spm
  from common.config import load
  from common.data import corpus
  bpe = next(r for r in results["runs"] if r["arm"] == "bpe")
  cfg = load(f"{reproduce.CONFIG}:arm=bpe,scale=quick,spm_model={out / 'tokenizer' / 'bpe320.model'},seq_len=8")
  sp = spm.SentencePieceProcessor(model_file=cfg.data.spm_model)
  root, rels = corpus.list_documents(cfg.data, "validation")
  texts = [corpus.read_text(os.path.join(root, rel)) for rel in rels]
  positions = sum(len(sp.encode(t)) + 1 for t in texts)
  n_bytes = sum(len(t.encode("utf-8")) for t in texts)
  assert bpe["patch_size"] == pytest.approx(n_bytes / positions, rel=1e-3)

  # A second call finds both runs finished and trains nothing.
  metrics = {run: (out / "runs" / run / "metrics.jsonl").read_text() for run in ("byte_s0", "bpe_s0")}
  assert reproduce.main(argv) == 0
  assert {run: (out / "runs" / run / "metrics.jsonl").read_text() for run in metrics} == metrics
  assert np.isclose(json.loads((out / "results.json").read_text())["summary"][1]["bpb"],
                    results["summary"][1]["bpb"])


def test_inference_flops_add_the_entropy_model_and_fall_with_patch_size():
  import ml_collections
  from blt.model import blt_model
  from common.configs.base import dense_model
  from common.flops import blt_flops, blt_inference_flops_per_byte
  entropy = dense_model(d_model=8, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=16, vocab_size=16)
  # per byte at L = 4: q, k, v, o 2*8*8 each; scores + values 2*2*(2 heads * 4 dims)*(4+1)/2 keys = 80;
  # SwiGLU 3*2*8*16 = 768; logits 2*8*16 = 256
  by_hand = 4 * 128 + 80 + 768 + 256
  sizes = []
  for patch_size in (2.0, 4.0, 8.0):
    m = blt_model()
    m.patching = ml_collections.ConfigDict(dict(method="entropy", patch_size=patch_size, max_patches=0,
                                                threshold=0.0, max_patch_length=0))
    alone = blt_inference_flops_per_byte(m, 4)
    assert alone == blt_flops(m, 4).forward
    assert blt_inference_flops_per_byte(m, 4, entropy_model_cfg=entropy) == pytest.approx(alone + by_hand)
    sizes.append(alone)
  assert sizes[0] > sizes[1] > sizes[2]
