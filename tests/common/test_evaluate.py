"""`common.evaluate` on a tiny random dense LM with the byte tokenizer: what the harness logs equals scoring and
generating a hand-written few-shot prompt directly (`common.scoring`, `common.generate`), rolling perplexity
equals a slow sum of one forward pass per token, a rerun computes only what is not logged yet, and the
command line refuses bad input with one line and exit status 2 before writing anything."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from common.config import ConfigError
from common.configs.base import dense_model
from common.eval import filters
from common.eval.tasks import get_tasks
from common.evaluate import LanguageModel, prepare, run
from common.evaluate.__main__ import main
from common.generate import generate, stop_string_cut
from common.models import checkpoint_library
from common.models.dense_lm import DenseLM
from common.scoring import score_continuations
from common.tokenizers import ByteTokenizer

TOKENIZER = ByteTokenizer()


def _model_cfg():
  return dense_model(vocab_size=TOKENIZER.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                     max_len=256)


@pytest.fixture(scope="module")
def model():
  return DenseLM(_model_cfg(), rngs=nnx.Rngs(params=0))


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def _samples(folder, task):
  with open(os.path.join(folder, f"samples_{task}.jsonl")) as f:
    return {line["doc_id"]: line for line in map(json.loads, f)}


def _results(folder):
  with open(os.path.join(folder, "results.json")) as f:
    return json.load(f)["results"]


CHOICE_ROWS = [{"id": "ice", "question": "Is ice cold?", "choices": ["yes", "no"], "gold": 0},
               {"id": "fire", "question": "Is fire cold?", "choices": ["yes", "no", "maybe so"], "gold": 1}]


def test_multiple_choice_equals_scoring_the_hand_written_prompt(model, tmp_path):
  data = _jsonl(tmp_path / "mc.jsonl", CHOICE_ROWS)
  prepared = prepare(get_tasks("arith_choice"), num_fewshot=1, data_paths={"arith_choice": data})
  run(LanguageModel(model, TOKENIZER, batch_size=2), prepared, str(tmp_path / "out"), log=lambda _: None)
  # With two documents and one shot, each document's example is the other one.
  prompts = {"ice": "Question: Is fire cold?\nAnswer: no\n\nQuestion: Is ice cold?\nAnswer:",
             "fire": "Question: Is ice cold?\nAnswer: yes\n\nQuestion: Is fire cold?\nAnswer:"}
  logged, acc, acc_norm = _samples(tmp_path / "out", "arith_choice"), [], []
  for row in CHOICE_ROWS:
    line, prompt = logged[row["id"]], prompts[row["id"]]
    assert line["prompt"] == prompt
    scored = score_continuations(model, [TOKENIZER.encode(prompt)] * len(row["choices"]),
                                 [TOKENIZER.encode(" " + c) for c in row["choices"]], vocab_size=TOKENIZER.vocab_size)
    logliks = [s.logprob for s in scored]
    np.testing.assert_allclose(line["logliks"], logliks, rtol=1e-5)
    acc.append(float(np.argmax(logliks) == row["gold"]))
    acc_norm.append(float(np.argmax([ll / len(c) for ll, c in zip(logliks, row["choices"])]) == row["gold"]))
    assert line["metrics"] == {"acc": acc[-1], "acc_norm": acc_norm[-1]}
  metrics = _results(tmp_path / "out")["arith_choice"]["metrics"]
  assert metrics["acc"]["value"] == pytest.approx(np.mean(acc))
  assert metrics["acc_norm"]["value"] == pytest.approx(np.mean(acc_norm))


def test_generation_equals_generating_from_the_hand_written_prompt(model, tmp_path):
  rows = [{"question": "Tom has 3 cats and gets 2 more. How many cats?", "answer": "3 + 2 = 5\n#### 5"},
          {"question": "A box holds 4 pens; how many in 3 boxes?", "answer": "4 * 3 = 12\n#### 12"}]
  data = _jsonl(tmp_path / "gsm.jsonl", rows)
  prepared = prepare(get_tasks("gsm8k"), num_fewshot=1, data_paths={"gsm8k": data}, max_new_tokens=12)
  run(LanguageModel(model, TOKENIZER, batch_size=2), prepared, str(tmp_path / "out"), log=lambda _: None)
  line = _samples(tmp_path / "out", "gsm8k")["1"]
  prompt = (f"Question: {rows[1]['question']}\nAnswer: 4 * 3 = 12\n#### 12\n\n"
            f"Question: {rows[0]['question']}\nAnswer:")
  assert line["prompt"] == prompt and line["target"] == "5"
  ids = generate(model, [TOKENIZER.encode(prompt)], max_new_tokens=12, stop_ids=TOKENIZER.stop_ids,
                 stop_strings=("Question:", "\n\n"), tokenizer=TOKENIZER)[0]
  text = TOKENIZER.decode(ids)
  assert line["output"] == text[:stop_string_cut(text, ("Question:", "\n\n"))]
  strict, flexible = filters.strict_match(line["output"]), filters.flexible_extract(line["output"])
  assert line["filtered"] == {"strict-match": strict, "flexible-extract": flexible}
  assert line["metrics"] == {"exact_match,strict-match": float(strict == "5"),
                             "exact_match,flexible-extract": float(flexible == "5")}


class _ScriptedModel:
  """Stands in for LanguageModel: generations read from a table, so that right answers occur."""

  def __init__(self, outputs):
    self.outputs, self.batch_size, self.max_length, self.rolling_stride, self.rows_computed = outputs, 4, 64, 64, 0

  def generate_until(self, prompts, until, max_new_tokens):
    self.rows_computed += len(prompts)
    return [self.outputs[p.rsplit("Question: ", 1)[1].split("\n")[0]] for p in prompts]


def test_exact_match_and_its_standard_error_over_scripted_generations(tmp_path):
  questions = [f"What is {i} + 1?" for i in range(4)]
  data = _jsonl(tmp_path / "gsm.jsonl", [{"question": q, "answer": f"#### {i + 1}"} for i, q in enumerate(questions)])
  outputs = {questions[0]: " 0 + 1 = 1.\n#### 1", questions[1]: " It is 2.", questions[2]: " #### 7",
             questions[3]: " 3 + 1 = 4\n#### 4"}
  run(_ScriptedModel(outputs), prepare(get_tasks("gsm8k"), data_paths={"gsm8k": data}), str(tmp_path),
      log=lambda _: None)
  metrics = _results(tmp_path)["gsm8k"]["metrics"]
  # strict: [1, 0, 0, 1], mean 1/2, sample std sqrt(1/3), se sqrt(1/3) / 2; flexible: [1, 1, 0, 1].
  assert metrics["exact_match,strict-match"] == {"value": 0.5, "stderr": pytest.approx(math.sqrt(1 / 3) / 2)}
  assert metrics["exact_match,flexible-extract"] == {"value": 0.75, "stderr": pytest.approx(0.25)}


def _slow_rolling_logliks(model, texts, max_len, stride):
  """Per text, the sum over its tokens of log p(token | its window's context), one row per token: token t of
  window [s, e) is read after ([eos] + ids)[e - max_len : t + 1], the first window starting at the eos. The
  rows go right-padded through one forward pass, where causal attention keeps the padding after a row's end
  invisible."""
  rows, reads = [], []  # reads: (text index, token id, position of the last context id)
  for i, text in enumerate(texts):
    ids = TOKENIZER.encode(text)
    padded = [TOKENIZER.eos_id] + ids
    for t in range(len(ids)):
      end = max_len if t < max_len else min(max_len + ((t - max_len) // stride + 1) * stride, len(ids))
      rows.append(padded[max(0, end - max_len):t + 1])
      reads.append((i, ids[t], len(rows[-1]) - 1))
  inputs = np.zeros((len(rows), max_len), np.int32)
  for r, row in enumerate(rows):
    inputs[r, :len(row)] = row
  logits = np.asarray(model(inputs), np.float64)
  totals = [0.0] * len(texts)
  for r, (i, token, position) in enumerate(reads):
    last = logits[r, position]
    totals[i] += last[token] - (last.max() + np.log(np.exp(last - last.max()).sum()))
  return totals


@pytest.mark.parametrize("stride", [16, 5])
def test_rolling_perplexity_equals_a_sum_of_one_forward_per_token(model, tmp_path, stride):
  texts = ["The cat sat on the mat, and then it slept.", "Short doc"]
  data = _jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
  lm = LanguageModel(model, TOKENIZER, batch_size=4, max_length=16, rolling_stride=stride)
  run(lm, prepare(get_tasks("stdlib_text"), data_paths={"stdlib_text": data}), str(tmp_path), log=lambda _: None)
  expected = _slow_rolling_logliks(model, texts, 16, stride)
  logged = _samples(tmp_path, "stdlib_text")
  np.testing.assert_allclose([logged["1"]["loglik"], logged["2"]["loglik"]], expected, rtol=1e-4)
  metrics = _results(tmp_path)["stdlib_text"]["metrics"]
  words, num_bytes = 10 + 2, sum(len(t) for t in texts)
  assert metrics["word_perplexity"]["value"] == pytest.approx(math.exp(-sum(expected) / words), rel=1e-4)
  assert metrics["bits_per_byte"]["value"] == pytest.approx(-sum(expected) / num_bytes / math.log(2), rel=1e-4)


def test_a_rerun_reuses_logged_lines_and_computes_only_new_documents(model, tmp_path):
  def evaluate(limit):
    lm = LanguageModel(model, TOKENIZER, batch_size=2)
    summary = run(lm, prepare(get_tasks("arith_choice"), num_fewshot=2, limit=limit), str(tmp_path),
                  log=lambda _: None)
    return lm.rows_computed, summary["results"]

  computed, first = evaluate(3)
  assert computed == 3 * 4  # four choices a document
  assert evaluate(3) == (0, first)
  assert evaluate(5)[0] == 2 * 4  # a run stopped at --limit=3, continued to 5
  path = tmp_path / "samples_arith_choice.jsonl"
  lines = path.read_text().splitlines()
  path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])  # a kill in the middle of the last line
  computed, results = evaluate(5)
  assert computed == 4 and results["arith_choice"]["num_docs"] == 5
  assert len(path.read_text().splitlines()) == 5


def test_command_line_runs_a_hub_model(model, tmp_path):
  checkpoint_library.save("tiny-eval", _model_cfg(), model, tokenizer=TOKENIZER, root=tmp_path / "hub")
  args = ["--model=tiny-eval", f"--hub_root={tmp_path / 'hub'}", "--tasks=arith_choice", "--limit=2",
          "--num_fewshot=1", f"--output={tmp_path / 'cli'}"]
  assert main(args) == 0
  direct = run(LanguageModel(model, TOKENIZER), prepare(get_tasks("arith_choice"), num_fewshot=1, limit=2),
               str(tmp_path / "direct"), log=lambda _: None)
  cli = _results(tmp_path / "cli")["arith_choice"]
  assert cli["metrics"] == direct["results"]["arith_choice"]["metrics"] and cli["num_docs"] == 2


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
  out = tmp_path / "out"
  data = _jsonl(tmp_path / "mc.jsonl", CHOICE_ROWS)
  cases = [(["--tasks=arith_choice", "--num_fewshot=2", "--data_path", f"arith_choice={data}"], "num_fewshot=2"),
           (["--tasks=gsm8k", "--data_path", "gsm8k=/no/such.jsonl"], "/no/such.jsonl"),
           (["--tasks=arith_choice", "--data_path", f"gsm8k={data}"], "not one of --tasks"),
           (["--tasks=arith_choice"], "not found")]
  for flags, message in cases:
    with pytest.raises(ConfigError, match=message):
      main(["--model=missing", f"--hub_root={tmp_path / 'hub'}", f"--output={out}"] + flags)
  assert not out.exists()
  proc = subprocess.run([sys.executable, "-m", "common.evaluate", "--model=x", "--tasks=gsm8k,nope",
                         f"--output={out}"], capture_output=True, text=True, check=False)
  assert proc.returncode == 2 and "unknown task 'nope'" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_command_line_runs_a_training_run_directory(tmp_path):
  """--model=WORKDIR reads the run's newest checkpoint: the same scores as the hub entry published from it."""
  from common.hub.publish import publish  # pylint: disable=g-import-not-at-top
  from common.train.__main__ import main as train_main  # pylint: disable=g-import-not-at-top
  run_dir = tmp_path / "run"
  config = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "common", "configs", "dense_tiny.py")
  assert train_main([f"--config={config}", f"--workdir={run_dir}", "--config.train.steps=1",
                     "--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.d_ff=64",
                     "--config.data.seq_len=64", "--config.log.progress=lines"]) == 0
  publish(str(run_dir), "from-run", root=tmp_path / "hub")
  common_flags = ["--tasks=arith_choice", "--limit=2"]
  assert main([f"--model={run_dir}", f"--output={tmp_path / 'a'}"] + common_flags) == 0
  assert main(["--model=from-run", f"--hub_root={tmp_path / 'hub'}", f"--output={tmp_path / 'b'}"] + common_flags) == 0
  assert _results(tmp_path / "a") == _results(tmp_path / "b")
