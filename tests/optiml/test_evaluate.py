"""Scoring: exact match and ROUGE-L on hand cases, rank classification equal to `common.scoring.choose`, and
packed instruction rows that train on targets only and never let one example see another."""
import ml_collections
import numpy as np
import pytest

from common.configs.base import dense_model
from common.data.sft import pack_examples, tokenize_example
from common.models import build_model
from common.scoring import choose
from common.tokenizers import ByteTokenizer
from optiml import data as D
from optiml.evaluate import rank_classify, text_score


def tiny_model():
  cfg = dense_model(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, vocab_size=384)
  return build_model(ml_collections.ConfigDict(cfg), seed=0)


def test_exact_match_and_rouge_l_on_hand_cases():
  assert text_score("exact_match", "The Cat.", ["cat"]) == 1.0      # SQuAD normalisation
  assert text_score("exact_match", "cats", ["cat", "dog"]) == 0.0
  # LCS of 'a b c' and 'a c' is 2: precision 2/3, recall 1, F = 0.8
  assert text_score("rouge_l", "a b c", ["a c"]) == pytest.approx(0.8)
  assert text_score("rouge_l", "x", ["a c", "x"]) == 1.0           # the best reference counts
  with pytest.raises(ValueError, match="unknown text metric"):
    text_score("accuracy", "a", ["a"])


def test_rank_classification_picks_what_choose_picks():
  model, tok = tiny_model(), ByteTokenizer()
  prompts = ["Is 4 even or odd?\nOutput:", "Colour?\nOutput:"]
  options = [("even", "odd"), ("red", "blue")]
  expected = [choose(model, tok.encode(p), [tok.encode(" " + o) for o in opts], vocab_size=tok.vocab_size)
              for p, opts in zip(prompts, options)]
  assert rank_classify(model, tok, prompts, options) == expected


def test_packed_rows_train_on_targets_only_and_segments_do_not_see_each_other():
  tok = ByteTokenizer()
  task = D.TaskSpec("rev", "s", "t5", ("Reverse.",), "exact_match", (D.instance("ab", "ba"), D.instance("xyz", "zyx")))
  examples = [{"prompt": D.render_prompt(task, i), "response": " " + i.output} for i in task.instances]
  encoded = [tokenize_example(e, tok) for e in examples]
  rows, truncated = pack_examples(encoded, 128)
  assert truncated == 0 and rows["targets"].shape == (1, 128)   # both fit one row, first fit
  lengths = [len(ids) - 1 for ids, _ in encoded]
  seg = rows["segment_ids"][0]
  assert (seg[:lengths[0]] == 1).all() and (seg[lengths[0]:sum(lengths)] == 2).all() and (seg[sum(lengths):] == 0).all()
  for s, (ex, n) in enumerate(zip(examples, lengths), start=1):
    span = seg == s
    targets = rows["targets"][0][span]
    trained = targets[rows["loss_mask"][0][span] > 0]
    assert tok.decode(trained) == ex["response"] and trained[-1] == tok.eos_id   # the answer and EOS, nothing else
    assert rows["positions"][0][span].tolist() == list(range(n))
  # block-diagonal attention: the second example's logits in the packed row equal its logits alone
  model = tiny_model()
  packed = np.asarray(model(rows["inputs"], rows["positions"], rows["segment_ids"]))[0][seg == 2]
  alone_ids = encoded[1][0][:-1][None]
  alone = np.asarray(model(alone_ids, np.arange(alone_ids.shape[1])[None], np.ones_like(alone_ids)))[0]
  np.testing.assert_allclose(packed, alone, atol=1e-5)
