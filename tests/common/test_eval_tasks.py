"""The pure parts of the evaluation harness: the task registry, the few-shot sampler and prompt, GSM8K and MATH
answer filters, the text boundary of (context, continuation), rolling windows, standard errors and perplexities,
each against hand-written cases."""
import math

import pytest

from common.config import ConfigError
from common.eval import fewshot, filters, lm_metrics, requests
from common.eval.tasks import Doc, Task, TASKS, get_tasks, load_docs, load_pool
from common.tokenizers import ByteTokenizer, Tokenizer


def test_gsm8k_strict_match_reads_only_the_number_after_the_marks():
  assert filters.strict_match("48 / 2 = 24 clips.\n#### 1,234") == "1234"
  assert filters.strict_match("#### $15.") == "15"
  assert filters.strict_match("#### -7\nQuestion: 9") == "-7"
  assert filters.strict_match("so the answer is 72") is None


def test_gsm8k_flexible_extract_reads_the_last_number_anywhere():
  assert filters.flexible_extract("so the answer is 72") == "72"
  assert filters.flexible_extract("3 boxes hold $1,250.50 in all.") == "1250.50"
  assert filters.flexible_extract("#### 5 and then 6 more") == "6"
  assert filters.flexible_extract("no digits here") is None


def test_boxed_filter_reads_the_last_box_with_nested_braces():
  assert filters.boxed("first \\boxed{1}, then $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
  assert filters.boxed("no box") is None


def test_answer_scores_exact_and_math():
  assert lm_metrics.answer_score("exact_match", "1234", "1234") == 1.0
  assert lm_metrics.answer_score("exact_match", "123", "1234") == 0.0
  assert lm_metrics.answer_score("exact_match", None, "1234") == 0.0
  assert lm_metrics.answer_score("math_equal", "\\frac{1}{2}", "\\dfrac12") == 1.0


def test_standard_error_is_sample_std_over_root_n():
  # [1, 0, 1, 1]: mean 3/4, squared deviations 3 * (1/4)^2 + (3/4)^2 = 3/4, sample variance 1/4, se 0.5 / 2.
  assert lm_metrics.mean_stderr([1.0, 0.0, 1.0, 1.0]) == (0.75, 0.25)
  mean, stderr = lm_metrics.mean_stderr([2.0, 4.0, 9.0])
  assert mean == 5.0 and stderr == pytest.approx(math.sqrt(13 / 3))  # variance (9 + 1 + 16) / 2 = 13
  assert lm_metrics.mean_stderr([0.5]) == (0.5, None)


def test_choice_metrics_normalise_by_characters():
  # loglik per character: -3/1 = -3, -4/4 = -1: acc picks the short choice, acc_norm the long one.
  assert lm_metrics.choice_metrics([-3.0, -4.0], [" a", " abc"], gold=1) == {"acc": 0.0, "acc_norm": 1.0}


def test_rolling_metrics_divide_the_total_by_words_and_bytes():
  metrics = lm_metrics.rolling_metrics([-6.0, -4.0], ["one two", "three  four\nfive"])  # 5 words, 23 bytes
  assert metrics["word_perplexity"] == pytest.approx(math.exp(10 / 5))
  assert metrics["byte_perplexity"] == pytest.approx(math.exp(10 / 23))
  assert metrics["bits_per_byte"] == pytest.approx(10 / 23 / math.log(2))


class _WordTokenizer(Tokenizer):
  """Greedy longest match over a few pieces; ' 12' (space glued to the number) is one piece, as in BPE."""
  PIECES = {"Answer:": 5, " 12": 6, " ": 7, "12": 8}

  def __init__(self):
    self.vocab_size, self.bos_id, self.eos_id, self.pad_id = 9, 1, 2, 0

  def _encode(self, text):
    ids = []
    while text:
      piece = max((p for p in self.PIECES if text.startswith(p)), key=len)
      ids.append(self.PIECES[piece])
      text = text[len(piece):]
    return ids

  def decode(self, ids):
    names = {v: k for k, v in self.PIECES.items()}
    return "".join(names.get(i, "") for i in ids)


def test_trailing_space_of_the_context_moves_to_the_continuation():
  assert requests.move_trailing_space("Answer: ", "12") == ("Answer:", " 12")
  tokenizer = _WordTokenizer()
  # Tokenised apart, 'Answer: ' + '12' would be [5, 7] + [8]; in running text the model reads [5, 6].
  assert requests.encode_pair(tokenizer, "Answer: ", "12", [1]) == ([1, 5], [6])
  assert requests.encode_pair(tokenizer, "Answer:", " 12", []) == ([5], [6])


def test_truncated_context_keeps_its_last_ids_and_the_whole_continuation():
  assert requests.truncate_context([1, 2, 3, 4, 5], [6, 7], max_len=4) == [3, 4, 5]  # input 3, 4, 5, 6
  assert requests.truncate_context([1, 2], [3], max_len=0) == [1, 2]


@pytest.mark.parametrize("stride", [1, 3, 4])
def test_rolling_windows_score_every_id_once_within_the_window(stride):
  ids = list(range(10, 21))
  windows = requests.rolling_windows(ids, prefix=0, max_len=4, stride=stride)
  assert [t for _, continuation in windows for t in continuation] == ids
  assert windows[0] == ([0], ids[:4])
  padded = [0] + ids
  for context, continuation in windows:  # a window is running text: a slice of the padded ids
    row, end = context + continuation, padded.index(continuation[-1]) + 1
    assert len(row) - 1 <= 4 and row == padded[end - len(row):end]
  if stride == 1:  # every later id sees exactly the 4 ids before it
    assert all(context == ids[ids.index(c[0]) - 4:ids.index(c[0])] for context, c in windows[1:])


def _pool(n):
  return [Doc(f"p{i}", question=f"q{i}", answer=str(i), solution=f"s{i}") for i in range(n)]


def test_fewshot_sampling_is_deterministic_in_the_seed():
  pool, doc = _pool(20), Doc("d", question="evaluated")
  first = fewshot.sample_fewshot(pool, doc, 4, seed=3, task="t")
  assert fewshot.sample_fewshot(pool, doc, 4, seed=3, task="t") == first
  assert len({d.id for d in first}) == 4
  others = [fewshot.sample_fewshot(pool, doc, 4, seed=s, task="t") for s in range(4, 10)]
  assert any(o != first for o in others)


def test_fewshot_never_includes_the_evaluated_document():
  pool = _pool(5)
  for seed in range(30):
    for doc in pool:
      shots = fewshot.sample_fewshot(pool, doc, 4, seed=seed, task="t")
      assert doc not in shots and len(shots) == 4
  same_question = Doc("other-id", question="q0")  # the same example under another id is left out too
  assert all(d.question != "q0" for d in fewshot.sample_fewshot(pool, same_question, 4, seed=0, task="t"))
  with pytest.raises(ConfigError, match="num_fewshot=5"):
    fewshot.check_pool(Task("t", "generate_until", lambda p: pool), pool, pool, 5)
  fewshot.check_pool(Task("t", "generate_until", lambda p: pool), pool, pool, 4)


def test_prompt_joins_examples_with_the_configured_delimiters():
  task = Task("t", "generate_until", lambda p: [], template="Q: {question}", target_template="{solution} = {answer}",
              target_delimiter=" -> ", fewshot_delimiter="\n###\n", description="Solve.\n")
  shots, doc = _pool(2), Doc("d", question="last")
  assert fewshot.build_context(task, doc, shots) == "Solve.\nQ: q0 -> s0 = 0\n###\nQ: q1 -> s1 = 1\n###\nQ: last"
  assert fewshot.build_context(task, doc, []) == "Solve.\nQ: last"


def test_registry_names_errors_and_offline_defaults():
  assert [t.name for t in get_tasks("gsm8k, math500")] == ["gsm8k", "math500"]
  with pytest.raises(ConfigError, match="unknown task 'nope'"):
    get_tasks("gsm8k,nope")
  with pytest.raises(ConfigError, match="--data_path aime="):
    load_docs(TASKS["aime"])
  with pytest.raises(ConfigError, match="--data_path gsm8k=/no/such.jsonl"):
    load_docs(TASKS["gsm8k"], "/no/such.jsonl")
  for name in ("gsm8k", "math500", "arith_choice"):
    task = TASKS[name]
    docs, pool = load_docs(task), load_pool(task, "", "", [])
    assert docs and pool and not {d.question for d in docs} & {d.question for d in pool}
  math_doc = load_docs(TASKS["math500"])[0]
  assert filters.boxed(math_doc.solution) == math_doc.answer
  gsm_doc = load_docs(TASKS["gsm8k"])[0]
  assert filters.strict_match(TASKS["gsm8k"].target(gsm_doc)) == gsm_doc.answer
  assert load_docs(TASKS["stdlib_text"])[0].text


def test_user_files_load_through_the_math_loaders(tmp_path):
  path = tmp_path / "gsm.jsonl"
  path.write_text('{"question": "2 + 2?", "answer": "2 + 2 = <<2+2=4>>4\\n#### 4"}\n'
                  '{"question": "3 + 3?", "answer": "#### 1,006"}\n')
  docs = load_docs(TASKS["gsm8k"], str(path))
  assert [(d.question, d.answer, d.solution) for d in docs] == [("2 + 2?", "4", "2 + 2 = 4"), ("3 + 3?", "1006", "")]
  assert load_pool(TASKS["gsm8k"], str(path), "", docs) == docs
  assert ByteTokenizer().decode(ByteTokenizer().encode(TASKS["gsm8k"].prompt(docs[0]))) == "Question: 2 + 2?\nAnswer:"
