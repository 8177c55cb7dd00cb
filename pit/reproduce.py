"""`python -m pit.reproduce [--out=runs/pit] [--arms=default|ablations|all|NAME,...] [--seeds=3] [--quick]`

The comparison of Jiang et al. 2024 (tables 1-4) in miniature: a small dense LM trained from scratch on the
generated world (pit/data.py), one run per variant's data schedule, each starting with the same base phase
(old entities' documents and QA pairs: what the paper's pretrained Llama-2 already brings), then
  base            nothing more: closed-book, the floor,
  open_book       train QA pairs with their document in the prompt, then asked with the test document in the
                  prompt: the ceiling,
  cpt             continued pretraining on the test documents,
  it              standard instruction tuning: train + test documents, then train QA pairs,
  it_no_forget    the same with the test documents mixed into the QA phase,
  mix_all         train QA + train documents + test documents together,
  pit             pre-instruction-tuning: each train document's QA pairs right before it, then test documents,
  pit_pp          PIT++: train QA alone, then as pit,
  it_xd, pit_xd   standard IT and PIT cross-domain: train on films, towns and organisations, test on people;
`--arms=ablations` adds pit_qa_only, pit_qa_then_docs, pit_interleaved (QA and documents shuffled rather than
grouped) and it_weighted (answer tokens weighted x data.answer_weight in the document phase). Every run is
scored on the held-out test questions (exact match, answer recall, ROUGE-L; greedy answers) and by the
perplexity of the test documents (pit/evaluate.py).

Runs on the shared harness (common.reproduce): OUT/results.md, OUT/results.json (read by notebooks/pit.ipynb),
OUT/em_by_variant.png; one SentencePiece tokenizer for the study (OUT/tokenizer.model, trained once on the
texts of both settings); each run is a pit.train workdir OUT/runs/<arm>_s<seed>, skipped when finished and
scored, resumed when interrupted. --seeds N (default 3; --quick 1): means with 95% t-intervals.

Cost: see pit/README.md for the measured wall time of the default study.
"""
from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.figure import Figure

from common import reproduce
from common.config import load
from common.scaling.runs import format_pm, read_metrics
from common.train.restore import load_run_model
from pit import data as pit_data
from pit import evaluate
from pit import train as pit_train

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "tiny.py")
# The paper's exact match (Llama-2-7B, Wiki2023-film; tables 1-2 and 4).
PAPER = {"base": "9.5", "open_book": "72.2", "cpt": "27.6", "it": "30.3", "mix_all": "39.4", "pit": "45.4",
         "pit_pp": "48.1", "it_xd": "23.6", "pit_xd": "36.9"}
LABELS = {"base": "closed-book (base)", "open_book": "open-book (test document in context)",
          "cpt": "continued pretraining", "it": "standard instruction tuning",
          "it_no_forget": "instruction tuning w/o forgetting", "mix_all": "mix all", "pit": "PIT",
          "pit_pp": "PIT++", "pit_qa_only": "PIT (QA only)", "pit_qa_then_docs": "PIT (QA then docs)",
          "pit_interleaved": "PIT (interleaved, not grouped)", "it_weighted": "IT, answer tokens weighted"}
DEFAULT_ARMS = ("base", "open_book", "cpt", "it", "it_no_forget", "mix_all", "pit", "pit_pp", "it_xd", "pit_xd")
ABLATION_ARMS = ("pit_qa_only", "pit_qa_then_docs", "pit_interleaved", "it_weighted")
CROSS = {"it_xd": "it", "pit_xd": "pit"}
# --quick: a small world and a pass or two per phase (data.* keys).
QUICK = dict(old_per_kind=4, train_entities=12, test_entities=6, docs_per_entity=1, base_epochs=1.0,
             doc_epochs=1.0, qa_epochs=1.0)
EVALS_PER_RUN = 8


def arm_of(name: str) -> reproduce.Arm:
  variant, setting = CROSS.get(name, name), "cross_domain" if name in CROSS else "in_domain"
  label = LABELS[variant] + (" (cross-domain)" if name in CROSS else "")
  return reproduce.Arm(name, label, f"{CONFIG}:variant={variant},setting={setting}", "pit.train",
                       PAPER.get(name, ""), dict(variant=variant, setting=setting))


def tables(records: list[dict]) -> tuple[list[str], list[dict]]:
  """Seed means per arm and the markdown: in-domain rows, then cross-domain; every arm is scored closed-book
  but open_book, which reads the test document."""
  rows = []
  for name in dict.fromkeys(r["name"] for r in records):
    group = [r for r in records if r["name"] == name]
    view = "open" if name == "open_book" else "closed"
    if all(f"{view}/em" in r for r in group):
      label = arm_of(name).label if CROSS.get(name, name) in LABELS else group[0]["label"]
      row = dict(name=name, view=view, label=label, setting=group[0]["setting"], n=len(group),
                 paper=PAPER.get(name, ""))
      for key in ("em", "recall", "rouge_l"):
        row[key], row[f"{key}_ci95"], _ = reproduce.interval([r[f"{view}/{key}"] for r in group])
      for key in ("answer_nll", "doc_ppl", "train/em", "flops"):
        row[key], row[f"{key}_ci95"], _ = reproduce.interval([r.get(key, math.nan) for r in group])
      rows.append(row)
  header = ["variant", "EM", "answer recall", "ROUGE-L", "test answer NLL", "test-doc perplexity", "train-QA EM",
            "train FLOPs", "seeds"]
  lines = []
  for setting, title in (("in_domain", "In-domain (train and test entities: people)"),
                         ("cross_domain", "Cross-domain (train: films, towns, organisations; test: people)")):
    chosen = [r for r in rows if r["setting"] == setting]
    if not chosen:
      continue
    lines += [f"### {title}", ""] + reproduce.table(header, [(
        [r["label"], format_pm(r["em"], r["em_ci95"], ".1f"), format_pm(r["recall"], r["recall_ci95"], ".1f"),
         format_pm(r["rouge_l"], r["rouge_l_ci95"], ".1f"), format_pm(r["answer_nll"], r["answer_nll_ci95"], ".2f"),
         format_pm(r["doc_ppl"], r["doc_ppl_ci95"], ".2f"),
         format_pm(r["train/em"], r["train/em_ci95"], ".1f"), f"{r['flops']:.3g}", r["n"]], r["paper"])
        for r in chosen], paper="paper EM (Llama-2-7B)") + [""]
  return lines, rows


def plot(rows: list[dict], records: list[dict], path: str) -> str:
  """Left: test EM per variant (seed mean, 95% interval). Right: test-document perplexity against EM per run,
  the paper's point that the two part ways."""
  fig = Figure(figsize=(12, 4.2))
  ax = fig.add_subplot(1, 2, 1)
  y = np.arange(len(rows))
  ax.barh(y, [r["em"] for r in rows], xerr=[0 if math.isnan(r["em_ci95"]) else r["em_ci95"] for r in rows],
          color=["C1" if r["setting"] == "cross_domain" else "C0" for r in rows])
  ax.set(yticks=y, yticklabels=[r["label"] for r in rows], xlabel="test exact match (%)",
         title="closed-book QA on the test documents' facts")
  ax.invert_yaxis()
  ax2 = fig.add_subplot(1, 2, 2)
  names = list(dict.fromkeys(r["name"] for r in records))
  for i, name in enumerate(names):
    group = [r for r in records if r["name"] == name and "doc_ppl" in r]
    ax2.scatter([r["doc_ppl"] for r in group], [r["closed/em"] for r in group], color=f"C{i % 10}", label=name)
  ax2.set(xscale="log", xlabel="test-document perplexity", ylabel="test exact match (%)",
          title="perplexity vs answerable knowledge")
  ax2.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


class Study(reproduce.Study):
  prog = "pit.reproduce"
  out = "runs/pit"
  plot_name = "em_by_variant.png"
  arm_groups = dict(default=DEFAULT_ARMS, ablations=ABLATION_ARMS, all=DEFAULT_ARMS + ABLATION_ARMS)
  arm_of = staticmethod(arm_of)

  @classmethod
  def add_flags(cls, p) -> None:
    cls.add_arms_flag(p)
    p.add_argument("--max_questions", type=int, default=0, help="test questions scored per run (0: all)")

  def check(self) -> str:
    return self.unknown_arm()

  @property
  def tokenizer_path(self) -> str:
    return os.path.join(self.args.out, "tokenizer.model")

  def _data_overrides(self, cfg) -> None:
    if self.args.quick:
      cfg.data.update(QUICK)

  def prepare(self) -> None:
    """One world tokenizer for every run, trained on the documents of both settings and the old entities' and
    test QA pairs (every question template is among them); real data brings its own tokenizer."""
    cfg = load(CONFIG, [tuple(s.split("=", 1)) for s in self.args.set])
    if os.path.exists(self.tokenizer_path) or cfg.data.docs_path:
      return
    self._data_overrides(cfg)
    if self.args.cache_dir:
      cfg.data.cache_dir = self.args.cache_dir
    corpora = []
    for setting in pit_data.SETTINGS:
      cfg.data.setting = setting
      corpora.append(pit_data.corpus_for(cfg.data))
    texts = pit_data.Corpus(train_docs=tuple(d for c in corpora for d in c.train_docs), train_qa=(),
                            test_docs=corpora[0].test_docs, test_qa=corpora[0].test_qa,
                            old_docs=corpora[0].old_docs, old_qa=corpora[0].old_qa)
    source = pit_train.world_tokenizer_path(cfg.data, texts)
    os.makedirs(self.args.out, exist_ok=True)
    with open(source, "rb") as f, open(self.tokenizer_path, "wb") as g:
      g.write(f.read())
    self.log(f"tokenizer: {self.tokenizer_path}")

  def config(self, arm, seed):
    """The arm's config with the study's tokenizer, resolved (train.steps from the schedule), evaluated
    EVALS_PER_RUN times and checkpointed twice."""
    cfg = super().config(arm, seed)
    self._data_overrides(cfg)
    if not cfg.data.docs_path:
      cfg.data.tokenizer, cfg.data.tokenizer_path = "spm", os.path.abspath(self.tokenizer_path)
    pit_train.resolve(cfg)
    return reproduce.paced(cfg, EVALS_PER_RUN)

  @staticmethod
  def make_task(cfg):
    return pit_train.make_task(cfg)

  def scoring(self) -> dict:
    return dict(max_questions=self.args.max_questions)

  def score(self, arm, cfg, task, workdir) -> dict:
    _, tokenizer, corpus = pit_train.schedule_for(cfg)
    model = load_run_model(workdir, cfg, task.build_model, key="--out")[0]
    result = evaluate.evaluate_run(model, tokenizer, corpus, open_book=arm.name == "open_book",
                                   max_questions=self.args.max_questions, train_questions=0 if self.args.quick else 64)
    flops_per_step = task.train_flops_per_example * int(cfg.train.batch_size)
    evals = [m for m in read_metrics(workdir) if "eval/loss" in m]
    result["curves"] = {"test_answer_loss": dict(
        steps=[m["step"] for m in evals], flops=[m["step"] * flops_per_step for m in evals],
        values=[m["eval/loss"] for m in evals])}
    result["answer_nll"] = evals[-1]["eval/loss"] if evals else math.nan
    result.update(steps=int(cfg.train.steps), flops=flops_per_step * int(cfg.train.steps),
                  phases=[dict(name=p.name, rows=p.num_rows, steps=p.steps) for p in task.data.phases])
    self.log(f"{arm.label} seed {cfg.train.seed}: EM {result['closed/em']:.1f}, doc ppl {result['doc_ppl']:.2f}")
    return result

  def report(self, records):
    lines, rows = tables(records)
    return "\n".join(lines), dict(summary=rows)

  def plot(self, records, path):
    return plot(tables(records)[1], records, path)


def main(argv=None) -> int:
  return reproduce.main(Study, __doc__, argv)


if __name__ == "__main__":
  raise SystemExit(main())
