"""The shared checkpoint library: a saved name loads back with bit-identical parameters, its config, its
tokenizer (same ids) and metadata, on one device or sharded on a mesh; listing shows only whole entries;
existing names are never replaced silently; errors name the checkpoint; `publish` turns a LoRA SFT run into a
plain dense entry with the run's logits."""
from __future__ import annotations

import base64

import jax
import numpy as np
import pytest
from flax import nnx

from common import hub
from common.hub import publish
from common.hub.__main__ import main as hub_main
from common.config import ConfigError, run_main
from common.configs.base import dense_model
from common.models import build_model
from common.sharding import make_mesh
from common.tokenizers import ByteTokenizer, Llama3Tokenizer, load_tokenizer

TEXT = "the quick fox, café 123 <|eot_id|>"


def _tiny(seed: int = 0):
  cfg = dense_model(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                    tie_embeddings=False)
  return cfg, build_model(cfg, seed=seed)


def _params(model) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_round_trip_keeps_parameters_config_tokenizer_and_metadata(tmp_path):
  cfg, model = _tiny()
  folder = hub.save("tiny-base", cfg, model, tokenizer=ByteTokenizer(), metadata={"eval/loss": 2.5},
                    root=tmp_path)
  assert folder.name == "tiny-base"
  cfg2, model2, tokenizer, metadata = hub.load("tiny-base", root=tmp_path)
  # the byte tokenizer's eos and pad fill the ids the config left unset
  assert cfg2.to_dict() == {**cfg.to_dict(), "eos_ids": [1], "pad_id": 0}
  for a, b in zip(_params(model), _params(model2), strict=True):
    np.testing.assert_array_equal(a, b)
  assert isinstance(tokenizer, ByteTokenizer) and metadata == {"eval/loss": 2.5}
  assert hub.describe("tiny-base", root=tmp_path)["num_params"] == sum(a.size for a in _params(model))


def test_load_onto_a_mesh_shards_the_same_parameters(tmp_path):
  cfg, model = _tiny()
  hub.save("m", cfg, model, root=tmp_path)
  _, sharded, tokenizer, _ = hub.load("m", root=tmp_path, mesh=make_mesh((2, 4), ("fsdp", "tensor")))
  kernel = sharded.blocks[0].ffn.gate.kernel[...]
  assert tokenizer is None and kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  for a, b in zip(_params(model), _params(sharded), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  import sentencepiece  # pylint: disable=g-import-not-at-top
  prefix = tmp_path_factory.mktemp("spm") / "hub"
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(["the quick brown fox", "a café by the river", "123 and 456"] * 10),
      model_prefix=str(prefix), model_type="bpe", vocab_size=48, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      character_coverage=1.0, minloglevel=2)
  return str(prefix) + ".model"


@pytest.fixture
def llama3_path(tmp_path):
  merges = [b"th", b"the", b" q", b"ca", b"caf"]
  ranks = [bytes([b]) for b in range(256)] + merges
  path = tmp_path / "tokenizer.model"
  path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
  return str(path)


@pytest.mark.parametrize("kind", ["spm", "spm-files", "llama3", "llama3-files"])
def test_tokenizers_come_back_with_the_same_ids(tmp_path, spm_path, llama3_path, kind):
  path = spm_path if kind.startswith("spm") else llama3_path
  base_kind = kind.split("-")[0]
  original = load_tokenizer(base_kind, path)
  stored = (base_kind, path) if kind.endswith("files") else original
  cfg, model = _tiny()
  hub.save("with-tok", cfg, model, tokenizer=stored, root=tmp_path / "hub")
  _, _, tokenizer, _ = hub.load("with-tok", root=tmp_path / "hub")
  assert type(tokenizer) is type(original) and tokenizer.vocab_size == original.vocab_size
  assert tokenizer.encode(TEXT, eos=True) == original.encode(TEXT, eos=True)
  assert tokenizer.special_tokens == original.special_tokens


def test_llama3_renamed_special_tokens_are_kept(tmp_path, llama3_path):
  names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<|python_tag|>"]
  cfg, model = _tiny()
  hub.save("renamed", cfg, model, tokenizer=Llama3Tokenizer(llama3_path, names), root=tmp_path / "hub")
  tokenizer = hub.load("renamed", root=tmp_path / "hub")[2]
  assert tokenizer.special_token_id("<|python_tag|>") == 256 + 5 + 5


def test_listing_shows_only_complete_entries(tmp_path, capsys):
  cfg, model = _tiny()
  assert hub.list_checkpoints(tmp_path / "empty") == []
  for name in ("zeta", "alpha"):
    hub.save(name, cfg, model, root=tmp_path)
  (tmp_path / ".partial-beta").mkdir()  # a save that died part-way
  (tmp_path / "stray").mkdir()          # not an entry
  assert hub.list_checkpoints(tmp_path) == ["alpha", "zeta"]
  assert hub_main(["list", f"--root={tmp_path}"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [line.split()[0] for line in lines[2:]] == ["alpha", "zeta"]
  assert lines[2].split()[1] == f"{sum(a.size for a in _params(model)):,}"
  assert hub_main(["show", "alpha", f"--root={tmp_path}"]) == 0
  assert '"d_model": 32' in capsys.readouterr().out


def test_an_existing_name_is_replaced_only_with_overwrite(tmp_path):
  cfg, first = _tiny(seed=0)
  _, second = _tiny(seed=1)
  hub.save("base", cfg, first, metadata={"v": 1}, root=tmp_path)
  with pytest.raises(ConfigError, match="'base': already exists"):
    hub.save("base", cfg, second, metadata={"v": 2}, root=tmp_path)
  _, kept, _, metadata = hub.load("base", root=tmp_path)
  assert metadata == {"v": 1}
  np.testing.assert_array_equal(_params(kept)[0], _params(first)[0])
  hub.save("base", cfg, second, metadata={"v": 2}, root=tmp_path, overwrite=True)
  _, replaced, _, metadata = hub.load("base", root=tmp_path)
  assert metadata == {"v": 2} and hub.list_checkpoints(tmp_path) == ["base"]
  np.testing.assert_array_equal(_params(replaced)[0], _params(second)[0])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_a_failed_save_leaves_nothing_behind(tmp_path):
  cfg, model = _tiny()
  with pytest.raises(ConfigError, match="'/nope.model'"):
    hub.save("broken", cfg, model, tokenizer=("spm", "/nope.model"), root=tmp_path)
  with pytest.raises(ConfigError, match="metadata is not JSON"):
    hub.save("broken", cfg, model, metadata={"when": object()}, root=tmp_path)
  assert list(tmp_path.iterdir()) == []


def test_missing_and_malformed_names_are_clear_errors(tmp_path, monkeypatch, capsys):
  cfg, model = _tiny()
  monkeypatch.setenv(hub.ENV_ROOT, str(tmp_path))  # the environment variable picks the library
  hub.save("present", cfg, model)
  assert hub.list_checkpoints() == ["present"]
  with pytest.raises(ConfigError, match=r"'absent': not found in .* \(known: present\)"):
    hub.load("absent")
  with pytest.raises(ConfigError, match=r"'tiny-base': not found .*`python -m common\.recipes\.pretrain_base`"):
    hub.load("tiny-base")  # the entry every reproduction starts from names the command that builds it
  with pytest.raises(ConfigError, match="hub name '../up'"):
    hub.save("../up", cfg, model)
  with pytest.raises(SystemExit) as exit_info:
    run_main(lambda: hub_main(["show", "absent"]))
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines() == [
      f"error: hub checkpoint 'absent': not found in '{tmp_path}' (known: present)"]


def test_publish_merges_a_lora_run_into_a_dense_entry_with_the_same_logits(tmp_path, monkeypatch, capsys):
  import pathlib  # pylint: disable=g-import-not-at-top
  from common.nn.lora import LoRALinear, LoRAParam, apply_lora  # pylint: disable=g-import-not-at-top
  from common.train.restore import load_run_model, read_run_config  # pylint: disable=g-import-not-at-top
  from common.train.sft import main as sft_main  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[2])
  run, root = tmp_path / "run", tmp_path / "hub"
  assert sft_main(["--config=common/configs/sft_tiny.py:rank=2", f"--workdir={run}", "--config.model.d_model=32",
                   "--config.model.n_layers=1", "--config.model.d_ff=48", "--config.data.num_examples=60",
                   "--config.data.seq_len=96", "--config.train.batch_size=8", "--config.train.steps=2",
                   "--config.train.warmup_steps=1", "--config.train.learning_rate=0.05",
                   "--config.eval.every_steps=2", "--config.eval.batches=1", "--config.checkpoint.every_steps=2",
                   "--config.checkpoint.async_save=false"]) == 0
  with pytest.raises(ConfigError, match="--merge_lora"):
    publish(str(run), "sft-merged", root=root)
  run_main_args = ["publish", f"--workdir={run}", "--name=sft-merged", "--merge_lora", f"--root={root}"]
  with pytest.raises(SystemExit) as exit_info:
    run_main(lambda: hub_main(run_main_args))
  assert exit_info.value.code == 0 and "published" in capsys.readouterr().out

  cfg = read_run_config(str(run), "--workdir")
  def build():
    return apply_lora(build_model(cfg.model, seed=0), 2, float(cfg.lora.alpha), tuple(cfg.lora.targets),
                      rngs=nnx.Rngs(params=0))
  lora_model, step = load_run_model(str(run), cfg, build, key="--workdir", trainable=LoRAParam)
  assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(nnx.state(lora_model, LoRAParam))) > 0
  _, merged, tokenizer, metadata = hub.load("sft-merged", root=root)
  assert not any(isinstance(node, LoRALinear) for _, node in nnx.iter_graph(merged))
  tokens = np.asarray([tokenizer.encode("Add: 12+30\nAnswer: 42")], np.int32)
  np.testing.assert_allclose(np.asarray(merged(tokens)), np.asarray(lora_model(tokens)), atol=1e-5)
  assert metadata["step"] == step == 2 and metadata["lora_rank_merged"] == 2
  assert metadata["eval"]["step"] == 2 and np.isfinite(metadata["eval"]["eval/loss"])

  entry = (root / "sft-merged" / "entry.json").read_text()
  with pytest.raises(SystemExit) as exit_info:
    run_main(lambda: hub_main(run_main_args))
  assert exit_info.value.code == 2
  assert "'sft-merged': already exists" in capsys.readouterr().err
  assert (root / "sft-merged" / "entry.json").read_text() == entry
