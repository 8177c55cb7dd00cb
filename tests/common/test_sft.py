"""Supervised fine-tuning (common.sft, `python -m common.train.sft`): response-only loss masks, whole-example
first-fit packing, packed loss equal to the unpacked per-example losses, isolation of packed examples,
deterministic batches, and the command line (metrics, resume, config errors exit 2)."""
import base64
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.config import ConfigError
from common.configs.base import dense_model
from common.data import DataError
from common.models.dense_lm import DenseLM
from common.data.sft import SFTData, generate_examples, pack_examples, read_jsonl, tokenize_example
from common.tokenizers import ByteTokenizer, Llama3Tokenizer
from common.tasks.lm import next_token_loss
from common.train.sft import main as sft_main

REPO = pathlib.Path(__file__).resolve().parents[2]
BYTE = ByteTokenizer()


def ids_of(text):
  return [b + 3 for b in text.encode()]


def test_loss_mask_covers_the_response_and_its_eos_only():
  rows, _ = pack_examples([tokenize_example({"prompt": "ab", "response": "c"}, BYTE)], seq_len=5)
  a, b, c = ids_of("abc")
  np.testing.assert_array_equal(rows["inputs"], [[a, b, c, 0, 0]])
  np.testing.assert_array_equal(rows["targets"], [[b, c, BYTE.eos_id, 0, 0]])
  np.testing.assert_array_equal(rows["loss_mask"], [[0, 1, 1, 0, 0]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 0, 0]])


def test_dialogs_train_on_assistant_turns_only():
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
              {"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]
  ids, trained = tokenize_example({"messages": messages}, BYTE)
  assert BYTE.decode(ids) == "user: hiassistant: youser: qassistant: ok"
  np.testing.assert_array_equal(ids[trained], ids_of("yo") + [BYTE.eos_id] + ids_of("ok") + [BYTE.eos_id])


def test_llama3_chat_trains_assistant_content_and_end_of_turn(tmp_path):
  path = tmp_path / "tokenizer.model"
  path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
  tok = Llama3Tokenizer(str(path))
  ids, trained = tokenize_example({"prompt": "2+2?", "response": "4"}, tok)
  dialog = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
  assert ids.tolist() == tok.encode_chat(dialog, add_generation_prompt=False)
  assert tok.decode(ids[trained]) == "4<|eot_id|>"


def test_first_fit_packs_whole_examples_and_restarts_positions():
  # Examples of 5, 4, 3 and 2 positions into rows of 8: row 0 takes 5 then 3, row 1 takes 4 then 2.
  examples = [(np.arange(10 * k, 10 * k + n + 1), np.ones(n + 1, bool)) for k, n in enumerate((5, 4, 3, 2), 1)]
  rows, truncated = pack_examples(examples, seq_len=8)
  assert truncated == 0
  np.testing.assert_array_equal(rows["segment_ids"], [[1] * 5 + [2] * 3, [1] * 4 + [2] * 2 + [0] * 2])
  np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2])
  np.testing.assert_array_equal(rows["targets"][0], [11, 12, 13, 14, 15, 31, 32, 33])
  np.testing.assert_array_equal(rows["targets"][1, :6], [21, 22, 23, 24, 41, 42])


def test_an_overlong_example_is_refused_or_truncated_and_counted():
  long = tokenize_example({"prompt": "p" * 6, "response": "r" * 6}, BYTE)
  short = tokenize_example({"prompt": "p", "response": "r"}, BYTE)
  with pytest.raises(DataError, match="data.seq_len.*example 1"):
    pack_examples([short, long], seq_len=8)
  rows, truncated = pack_examples([short, long], seq_len=8, overlong="truncate")
  assert truncated == 1
  assert rows["segment_ids"].max(axis=1).tolist() == [1, 1]  # neither was split or merged
  # The first 9 tokens survive (6 prompt, 3 response): targets are 5 prompt then 3 response tokens.
  np.testing.assert_array_equal(rows["loss_mask"][1], [0] * 5 + [1] * 3)


def tiny_lm():
  cfg = dense_model(vocab_size=BYTE.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
  return DenseLM(cfg, rngs=nnx.Rngs(params=0))


forward = nnx.jit(lambda model, tokens, positions, segment_ids: model(tokens, positions, segment_ids))


def test_packed_loss_equals_the_mean_of_unpacked_per_example_losses():
  model = tiny_lm()
  examples = [tokenize_example(e, BYTE) for e in generate_examples(6, seed=1)]
  rows, _ = pack_examples(examples, seq_len=96)
  assert rows["segment_ids"].max() > 1  # something was packed together
  total, weight, _ = nnx.jit(next_token_loss)(model, {k: jnp.asarray(v) for k, v in rows.items()})
  # Reference: each example alone at the start of its own row (causal attention never reaches the padding
  # after it), the loss summed over its trained targets by hand.
  alone = np.zeros((len(examples), 96), np.int32)
  for r, (ids, _) in enumerate(examples):
    alone[r, :len(ids) - 1] = ids[:-1]
  positions = np.broadcast_to(np.arange(96), alone.shape)
  log_probs = np.asarray(jax.nn.log_softmax(forward(model, alone, positions, np.ones_like(alone)), axis=-1))
  nll_sum, count = 0.0, 0
  for r, (ids, trained) in enumerate(examples):
    for t in np.flatnonzero(trained[1:]):
      nll_sum -= float(log_probs[r, t, ids[t + 1]])
      count += 1
  assert int(weight) == count
  np.testing.assert_allclose(float(total / weight), nll_sum / count, rtol=2e-6)


def test_packed_examples_never_see_each_other():
  model = tiny_lm()
  first = tokenize_example({"prompt": "Copy: ab\n", "response": "ab"}, BYTE)
  second = tokenize_example({"prompt": "Add: 1+2\n", "response": "3"}, BYTE)
  changed = tokenize_example({"prompt": "Sort: zy\n", "response": "yz"}, BYTE)
  assert len(changed[0]) == len(first[0])
  logits = []
  for one in (first, changed):
    rows, _ = pack_examples([one, second], seq_len=32)
    assert rows["segment_ids"].shape[0] == 1
    logits.append(np.asarray(forward(model, rows["inputs"], rows["positions"], rows["segment_ids"])))
  span = slice(len(first[0]) - 1, len(first[0]) + len(second[0]) - 2)
  assert not np.array_equal(logits[0][0, :span.start], logits[1][0, :span.start])
  np.testing.assert_array_equal(logits[0][0, span], logits[1][0, span])


def test_batches_are_a_pure_function_of_seed_and_position():
  rows, _ = pack_examples([tokenize_example(e, BYTE) for e in generate_examples(60, seed=0)], seq_len=96)
  make = lambda seed: SFTData(rows, rows, batch_size=4, seed=seed)
  n = make(0).num_train_rows
  np.testing.assert_array_equal(make(0).train_batch(8)["inputs"], make(0).train_batch(8)["inputs"])
  assert not np.array_equal(make(0).train_batch(0)["inputs"], make(1).train_batch(0)["inputs"])
  epoch = np.concatenate([make(0).train_batch(p)["inputs"] for p in range(0, n - n % 4, 4)])
  assert len({r.tobytes() for r in epoch}) == len(epoch)  # no row twice within an epoch
  last = list(make(0).eval_batches())[-1]
  assert last["loss_mask"][n % 4 or 4:].sum() == 0  # the padding rows of the last eval batch count nothing


def test_jsonl_examples_are_read_and_a_bad_line_is_named(tmp_path):
  good = tmp_path / "sft.jsonl"
  good.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n\n"
                  + json.dumps({"messages": [{"role": "user", "content": "u"}]}) + "\n")
  assert len(read_jsonl(str(good), "data.sft_path")) == 2
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n" + json.dumps({"prompt": "p"}) + "\n")
  with pytest.raises(DataError, match=r"data.sft_path.*bad.jsonl:2"):
    read_jsonl(str(bad), "data.sft_path")


def cli_args(workdir, *extra):
  return ["--config=common/configs/sft_tiny.py:rank=2", f"--workdir={workdir}", "--config.model.d_model=32",
          "--config.model.n_layers=1", "--config.model.d_ff=48", "--config.data.num_examples=120",
          "--config.data.seq_len=96", "--config.train.batch_size=8", "--config.train.warmup_steps=1",
          "--config.log.every_steps=1", "--config.eval.every_steps=2", "--config.eval.batches=1",
          "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=false", *extra]


def flat_arrays(tree, prefix=()):
  """{path: array} of a restored (nested dict) parameter tree, `value` path components dropped."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(flat_arrays(value, prefix if key == "value" else (*prefix, str(key))))
    return out
  return {prefix: np.asarray(tree)}


def test_cli_fine_tunes_a_hub_model_with_lora_writes_metrics_resumes_and_keeps_the_base(tmp_path, capsys,
                                                                                      monkeypatch):
  import orbax.checkpoint as ocp
  from common import hub
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("META_PAPERS_HUB", str(tmp_path / "hub"))
  base = tiny_lm()
  hub.save("sft-test-base", base.cfg, base, tokenizer=BYTE)
  workdir = tmp_path / "run"
  # Weight decay on: the optimizer holds the adapters only, so the base still cannot move.
  args = lambda steps: cli_args(workdir, "--config.model.init_from=sft-test-base", f"--config.train.steps={steps}",
                                "--config.train.weight_decay=0.1")
  assert sft_main(args(2)) == 0
  assert sft_main(args(4)) == 0
  assert "resumed from" in capsys.readouterr().out
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in lines if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and r["tokens_per_sec"] > 0 and r["mfu"] > 0 for r in train)
  assert [r["step"] for r in lines if "eval/loss" in r] == [2, 4]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["lora"]["rank"] == 2 and saved["model"]["n_layers"] == 2  # the hub model's shape, not the flags'
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(workdir / "checkpoints" / "4" / "state")
  trained = flat_arrays(restored["params"])
  adapter_size = sum(v.size for p, v in trained.items() if p[-1] in ("lora_a", "lora_b"))
  moment_size = sum(np.size(x) for x in jax.tree.leaves(restored["opt_state"]) if np.size(x) > 1)
  assert moment_size == 2 * adapter_size  # Adam's two moments of the adapters, none of the base
  original = flat_arrays(nnx.to_pure_dict(nnx.state(base, nnx.Param)))
  assert set(original) == {p for p in trained if p[-1] not in ("lora_a", "lora_b")}
  for path, value in original.items():
    np.testing.assert_array_equal(trained[path], value, err_msg=str(path))
  assert max(np.abs(v).max() for p, v in trained.items() if p[-1] == "lora_b") > 0


@pytest.mark.parametrize("override, key", [
    ("--config.lora.rank=-1", "lora.rank"),
    ("--config.lora.alpha=0.0", "lora.alpha"),
    ("--config.lora.targets=('q','qkv')", "lora.targets"),
    ("--config.data.overlong=drop", "data.overlong"),
    ("--config.model.init_from=no-such-model", "model.init_from"),
    ("--config.data.sft_path=/no/such.jsonl", "data.sft_path"),
])
def test_bad_input_names_the_key_before_the_workdir_is_touched(tmp_path, monkeypatch, override, key):
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("META_PAPERS_HUB", str(tmp_path / "hub"))
  with pytest.raises((ConfigError, DataError), match=key):
    sft_main(cli_args(tmp_path / "run", override))
  assert not (tmp_path / "run").exists()


def test_command_line_exits_2_with_one_line_naming_the_key(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  command = [sys.executable, "-m", "common.train.sft", *cli_args(tmp_path / "run", "--config.lora.rank=-1")]
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
  assert "lora.rank" in proc.stderr
