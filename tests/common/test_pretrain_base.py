"""`python -m common.recipes.pretrain_base`: a few-step run registers a hub entry whose parameters are the run's
(same logits), with its tokenizer and the measured quality; a second run never replaces the entry without
--overwrite (exit 2, one line); the generated instruction text is deterministic, of every kind, and its
held-out questions are never training prompts."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from common import hub
from common.config import run_main
from common.models import build_model
from common.recipes.pretrain_base import (KINDS, example_kind, instruction_examples, main, split_held_out)
from common.train.restore import load_run_model, read_run_config
from common.tokenizers import model_special_ids

REPO = pathlib.Path(__file__).resolve().parents[2]


def _args(workdir, root, *extra):
  return ["--config=common/configs/tiny_base.py:steps=3,tokenizer=byte", f"--workdir={workdir}",
          f"--hub_root={root}", "--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.d_ff=64",
          "--config.train.batch_size=8", "--config.data.seq_len=64", "--config.data.max_train_bytes=40000",
          "--config.data.max_eval_bytes=8000", "--config.pretrain.num_instruction_examples=200",
          "--config.pretrain.eval_questions=6", "--config.pretrain.max_answer_tokens=3",
          "--config.checkpoint.async_save=false", "--config.log.every_steps=1", "--config.eval.every_steps=3",
          "--config.eval.batches=1", *extra]


def test_instruction_text_is_deterministic_and_has_every_kind():
  examples = instruction_examples(200, 7)
  assert examples == instruction_examples(200, 7)
  assert examples != instruction_examples(200, 8)
  assert {example_kind(e) for e in examples} == set(KINDS)
  assert all(e["response"] and e["prompt"].endswith(" ") for e in examples)


def test_held_out_questions_are_never_training_prompts():
  train = instruction_examples(500, 0)
  held_out = split_held_out(train, instruction_examples(500, 1) + train[:50])
  prompts = [e["prompt"] for e in held_out]
  assert held_out and len(set(prompts)) == len(prompts)
  assert not set(prompts) & {e["prompt"] for e in train}


def test_a_short_run_registers_its_parameters_and_quality_and_never_overwrites(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(REPO)
  workdir, root = tmp_path / "run", tmp_path / "hub"
  assert main(_args(workdir, root)) == 0
  printed = capsys.readouterr().out
  assert "registered 'tiny-base'" in printed and "answer_accuracy" in printed

  model_cfg, model, tokenizer, metadata = hub.load("tiny-base", root=root)
  cfg = read_run_config(str(workdir), "--workdir")
  trained, step = load_run_model(str(workdir), cfg, lambda: build_model(cfg.model, seed=0), key="--workdir")
  # the entry's config is the run's, with the special ids of its tokenizer filled in (generation stops on eos)
  assert step == 3 and metadata["step"] == 3
  assert model_cfg.to_dict() == {**cfg.model.to_dict(), **model_special_ids(tokenizer)}
  tokens = np.asarray([[0] + tokenizer.encode("Question: What is 2 + 3?\nAnswer: ")], np.int32)
  np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(trained(tokens)), atol=1e-6)
  for key in ("eval/corpus_loss", "eval/corpus_bits_per_byte", "eval/instruction_loss", "eval/answer_accuracy"):
    assert np.isfinite(metadata[key]), key
  assert metadata["eval/corpus_perplexity"] == pytest.approx(np.exp(metadata["eval/corpus_loss"]))
  assert 0.0 <= metadata["eval/answer_accuracy"] <= 1.0 and metadata["eval/num_questions"] == 6

  entry = (root / "tiny-base" / "entry.json").read_text()
  with pytest.raises(SystemExit) as exit_info:
    run_main(lambda: main(_args(tmp_path / "other", root)))
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and "'tiny-base'" in lines[0] and "--overwrite" in lines[0]
  assert (root / "tiny-base" / "entry.json").read_text() == entry
  assert not (tmp_path / "other").exists()  # refused before anything was trained or written
  assert json.loads(entry)["metadata"]["source_run"] == str(workdir)
