"""notebooks/<paper>.ipynb run top to bottom on a small results.json that each study's own report writes from
made-up runs (two seeds, no training), and draw their figures."""
import importlib
import os

import pytest

from common import reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def curve(values, flops_per_step=1e9):
  steps = list(range(1, len(values) + 1))
  return dict(steps=steps, flops=[s * flops_per_step for s in steps], seconds=[float(s) for s in steps],
              values=list(values))


def blt_runs(seed):
  return [dict(label=label, arm=arm, target_patch_size=size, seed=seed, steps=10, params=1e6, train_flops=1e10,
               flops_per_step=1e9, bpb=bpb + 0.01 * seed, patch_size=p, inference_flops_per_byte=2e6 / p,
               curves=dict(bpb=curve([bpb + 1, bpb + 0.01 * seed]))) for label, arm, size, bpb, p in
          (("byte", "byte", None, 3.0, 1.0), ("bpe", "bpe", None, 2.0, 2.3), ("entropy P=8", "entropy", 8.0, 2.1, 8.5))]


def mot_runs(seed):
  acc = {a: 0.5 for a in ("shape", "colour", "size", "position")}
  return [dict(setting="transfusion", model=model, seed=seed, steps=2, curves={
      k: curve([v + 1, v + 0.01 * seed]) for k, v in (("text", base), ("image", base / 2), ("overall", base))},
      image_accuracy=acc, caption_accuracy=acc) for model, base in (("dense", 3.0), ("mot", 2.0))]


def moma_runs(seed):
  return [dict(variant=v, seed=seed, steps=3, params=1e6, flops_per_token=1e5, flops_per_step=1e9,
               train_seconds=3.0, final={p: loss for p in ("overall", "text", "image")},
               curves={p: curve([loss + 2, loss + 1, loss]) for p in ("overall", "text", "image")})
          for v, loss in (("dense", 3.0), ("moma", 2.5 + 0.1 * seed))]


def moe_runs(seed):
  rows = []
  for d, c in ((32, 1e11), (48, 2e11), (64, 4e11)):
    for family, k in (("dense", 1.0), ("moe", 2.0 + seed)):
      loss = 1.0 + 10 * (k * c) ** -0.1
      points = [1.0 + 10 * (k * c * f) ** -0.1 for f in (0.25, 0.5, 0.75, 1.0)]
      rows.append(dict(family=family, d_model=d, seed=seed, budget=d, flops=c, in_loss=loss, ood_loss=loss + 0.5,
                       in_ppl=2.7 ** loss, ood_ppl=2.7 ** (loss + 0.5), params=dict(non_embedding=1e5),
                       curve=curve(points, c / 4), routing=dict(fraction_dropped=0.1, max_load_ratio=1.5,
                                                                 balance_loss=1.01), **{"0shot": 0.3, "4shot": 0.4}))
  return rows


def pit_runs(seed):
  rows = []
  for name, setting, em in (("base", "in_domain", 2.0), ("open_book", "in_domain", 5.0), ("it", "in_domain", 20.0),
                            ("pit", "in_domain", 40.0), ("it_xd", "cross_domain", 10.0),
                            ("pit_xd", "cross_domain", 30.0)):
    scores = {f"closed/{k}": em + seed + extra for k, extra in (("em", 0), ("recall", 5), ("rouge_l", 3))}
    if name == "open_book":
      scores.update({f"open/{k}": 70.0 + seed for k in ("em", "recall", "rouge_l")})
    rows.append(dict(name=name, label=name, seed=seed, paper="", variant=name.removesuffix("_xd"), setting=setting,
                     doc_ppl=1.5 + 10 / em, answer_nll=3.0 - em / 20, flops=1e12, steps=4,
                     curves=dict(test_answer_loss=curve([3.0, 2.0])), **{"train/em": 50.0}, **scores))
  return rows


def ease_runs(seed):
  def scores(rouge, compression):
    return dict(rouge1=rouge + 0.1, rouge2=rouge / 2, rougeL=rouge, evidence_precision=0.6, evidence_recall=0.5,
                faithfulness=0.7, reference_faithfulness=0.8, compression=compression)
  rows = [dict(name="abstractive", label="abstractive", seed=seed, paper="", variant="abstractive", level="sentence",
               eval_nll=1.0, flops=1e12, budgets={"1": scores(0.5 + 0.01 * seed, 1.0)})]
  for name, level in (("lead", "sentence"), ("ease_sent", "sentence"), ("ease_tok", "token")):
    rows.append(dict(name=name, label=name, seed=seed, paper="", variant=name.split("_")[0], level=level,
                     eval_nll=1.2, flops=1e12, budgets={f"{b:g}": scores(0.3 + 0.2 * b + 0.01 * seed, b)
                                                        for b in (0.2, 0.4, 0.6, 1.0)}))
  return rows


def icl_explanations_runs(seed):
  keys = ([f"perturb/arith/{p}" for p in ("none", "mask_ops", "incorrect_values", "no_nl", "no_trace")]
          + ["select/random"] + [f"select/{s}/{m}" for s in ("embedding", "bm25", "likelihood", "token_match")
                                 for m in ("nn", "mmr")]
          + [f"lambda/{lam:g}" for lam in (1.0, 0.8, 0.6, 0.5, 0.4, 0.2, 0.0)]
          + [f"compose/{c}" for c in ("add_only", "mul_only", "add_and_mul")])
  evals = {k: dict(n=8, accuracy=30.0 + i + seed, rule_accuracy=50.0 + seed, no_answer=0.0) for i, k in enumerate(keys)}
  return [dict(name="meta", label="meta", seed=seed, paper="", families="arith", evals=evals, steps=4, eval_loss=0.5)]


def optiml_runs(seed):
  rows = []
  for name, label, gain in (("base", "base", 0.0), ("it", "instruction-tuned", 10.0)):
    scores = {f"{level}/{k}shot": 20.0 + gain + i + seed for i, level in
              enumerate(("heldout_category", "heldout_task", "heldout_instance", "avg")) for k in (0, 2)}
    scores.update({f"{level}/0shot/{c}": 10.0 + gain + seed for level in ("heldout_category", "heldout_task")
                   for c in ("logic", "counting")})
    rows.append(dict(name=name, label=label, seed=seed, paper="", ablation=False, shots=2, flops=1e12, steps=4,
                     curves=dict(heldout_instance_answer_loss=curve([3.0, 2.0])), **scores))
  return rows


def slag_runs(seed):
  def method(success, edges):
    scores = dict(update_success=success, paraphrase_success=success - 10, entailed_accuracy=60.0 + seed,
                  consistency=70.0, retain_rate=90.0 - seed, delta_accuracy=-2.0, mean_steps=3.0, updates=8)
    graph = dict(edges=len(edges), mean_out_degree=len(edges) / 6, share_updates_flipping_any=0.5,
                 mean_corrupted_per_update=0.5, mean_path_length=1.2)
    return dict(single=scores, sequential={**scores, "update_success": success - 20}, sequential_r=4, graph=graph,
                edges=edges, num_beliefs=6)
  return [dict(name="base", label="base", seed=seed, paper="", base=dict(accuracy=90.0, consistency=80.0),
               methods=dict(sgd=method(95.0, [[0, 1]]), adam=method(99.0, [[0, 1], [2, 3]]))),
          dict(name="learned_slag", label="slag", seed=seed, paper="",
               methods=dict(learned_slag=method(97.0 + seed, [[1, 2]])))]


def astro_runs(seed):
  rows = []
  for name, acc, backtracks in (("base", 20.0, 0.0), ("sft_direct", 25.0, 0.0), ("sft_astro", 30.0, 0.8),
                                ("rl_direct", 35.0, 0.0), ("rl_astro", 40.0, 1.2)):
    rows.append({"name": name, "label": name, "seed": seed, "paper": "", "stage": name, "parent": "",
                 "pass@1": acc + seed, "maj@4": acc + 5, "pass@4": acc + 10, "backtracks": backtracks,
                 "backtrack_share": 10.0 * backtracks, "backtrack_correlation": 0.1 * seed, "length": 60.0,
                 "flops": 1e12, "steps": 4, "by_difficulty": {"2": acc + 10, "3": acc, "4": acc - 10},
                 "curves": {"eval/loss": curve([1.0, 0.5])}})
  rows[2]["search"] = dict(trees=8, solved=5, nodes=12.0, trace_backtracks=1.5)
  return rows


RUNS = {"astro": astro_runs, "blt": blt_runs, "mot": mot_runs, "moma": moma_runs, "moe_scaling": moe_runs, "pit": pit_runs,
        "ease": ease_runs, "icl_explanations": icl_explanations_runs, "optiml": optiml_runs, "slag": slag_runs}


@pytest.mark.parametrize("paper", sorted(RUNS))
def test_notebook_runs_top_to_bottom_on_a_small_results_file(paper, tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  module = importlib.import_module(f"{paper}.reproduce")
  study = module.Study(reproduce.parser(module.Study, module.__doc__).parse_args([f"--out={tmp_path}", "--seeds=2"]))
  study.classifier_accuracy = {"shape": 0.9}  # mot: made by prepare(), not run here
  reproduce.write_results(study, [r for seed in (0, 1) for r in RUNS[paper](seed)])
  monkeypatch.setenv(f"{paper.upper()}_RESULTS", str(tmp_path / "results.json"))
  path = os.path.join(ROOT, "notebooks", f"{paper}.ipynb")
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "| paper" in text  # the results table, with the paper's column
  images = sum(o.output_type == "display_data" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert images == 2
  assert len(os.listdir(tmp_path / "notebook_plots")) == 2
