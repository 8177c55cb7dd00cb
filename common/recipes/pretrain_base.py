"""`tiny-base`: pretrain the dense LM on the embedded corpus plus generated instruction-style text, measure
its quality, and register it in the checkpoint library (common.hub).

    python -m common.recipes.pretrain_base [--config=common/configs/tiny_base.py[:steps=N,...]]
        [--workdir=runs/tiny-base] [--name=tiny-base] [--hub_root=DIR] [--overwrite] [--config.KEY=VALUE ...]

The fine-tuning papers reproduced here start from a pretrained model whose instruction-following is then
changed: pre-instruction-tuning on QA over documents (pit), instruction tasks (optiml), true/false beliefs
(slag), arithmetic reasoning (astro), summaries (ease). A base that has seen text of those shapes, as web-scale
pretraining corpora hold them (Brown et al. 2020, Sec. 2.2), makes their small-scale comparisons meaningful;
so a share of every batch (`pretrain.instruction_fraction`) is generated prompt/response text of those kinds,
the rest the embedded corpus. Training is the common loop (checkpoints, resume, SIGTERM, metrics.jsonl);
rerunning the command resumes. The quality written into the entry and printed: loss, perplexity and bits per
byte on the held-out corpus; loss on the responses of held-out generated examples; exact-match accuracy of
greedy answers to held-out generated questions, per kind. Prompts are encoded after id 0, the id that opens
every pretraining document (`common.data.packing.make_inputs`), and so is every prompt the evaluation asks.
"""
from __future__ import annotations

import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import sharding
from common.models import checkpoint_library as hub
from common.config import ConfigError, parse_argv, require, run_main
from common.data import LMData
from common.data.packing import make_inputs, pack_documents
from common.data.sft import SFTData, generate_examples
from common.data.train_tokenizer import train as train_spm
from common.data.vocab import vocab_size
from common.eval import GenerationExample, evaluate_generations
from common.flops import training_flops_per_token
from common.generate import generate
from common.models import build_model, padded_vocab_size, validate_model_config
from common.scoring import score_continuations
from common.tasks.base import Task
from common.tasks.lm import next_token_loss
from common.tokenizers import ByteTokenizer, SentencePieceTokenizer
from common.train.loop import train, validate_loop_config
from common.train.restore import load_run_model
from common.train.step import make_eval_step

DEFAULT_CONFIG = "common/configs/tiny_base.py"
DEFAULT_WORKDIR = "runs/tiny-base"
DEFAULT_NAME = "tiny-base"
DOCUMENT_START_ID = 0
KINDS = ("document_qa", "true_false", "summary", "arithmetic", "instruction")
_NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo",
          "Mia", "Nora", "Oscar", "Paul")
_CITIES = ("Paris", "Rome", "Oslo", "Cairo", "Lima", "Tokyo", "Berlin", "Madrid", "Dublin", "Vienna", "Lisbon",
           "Prague")
_JOBS = ("baker", "pilot", "doctor", "teacher", "farmer", "painter", "singer", "lawyer", "nurse", "chef")
_FOODS = ("tea", "rice", "soup", "bread", "cheese", "honey", "plums", "coffee", "pears", "olives")
_RELATIONS = (  # (sentence, question) of each fact a person has
    ("{name} lives in {city}.", "Where does {name} live?", "city"),
    ("{name} works as a {job}.", "What is {name}'s job?", "job"),
    ("{name} likes {food}.", "What does {name} like?", "food"),
)


# --- generated instruction-style text ----------------------------------------------------------------


def _person(rng, name: str) -> dict[str, str]:
  return {"name": name, "city": str(rng.choice(_CITIES)), "job": str(rng.choice(_JOBS)),
          "food": str(rng.choice(_FOODS))}


def _facts(person: dict[str, str]) -> list[str]:
  return [sentence.format(**person) for sentence, _, _ in _RELATIONS]


def _example(rng, kind: str) -> dict[str, str]:
  """One prompt/response pair of `kind`: the document, statement or question in the prompt, the answer a
  short span the model can be graded on by exact match."""
  if kind in ("document_qa", "true_false", "summary"):
    names = [str(n) for n in rng.choice(_NAMES, size=int(rng.integers(1, 4)), replace=False)]
    people = [_person(rng, n) for n in names]
    sentences = [s for p in people for s in _facts(p)]
    rng.shuffle(sentences)
    document = " ".join(sentences)
    person = people[int(rng.integers(len(people)))]
    _, question, field = _RELATIONS[int(rng.integers(len(_RELATIONS)))]
    if kind == "document_qa":
      return {"prompt": f"Document: {document}\nQuestion: {question.format(**person)}\nAnswer: ",
              "response": person[field]}
    if kind == "summary":
      facts = _facts(person)
      rng.shuffle(facts)
      return {"prompt": f"Document: {' '.join(facts)}\nSummary: ",
              "response": f"{person['name']} is a {person['job']} in {person['city']} who likes {person['food']}."}
    claimed = dict(person)
    truth = bool(rng.integers(2))
    if not truth:
      choices = {"city": _CITIES, "job": _JOBS, "food": _FOODS}[field]
      claimed[field] = str(rng.choice([c for c in choices if c != person[field]]))
    statement = next(s for s, _, f in _RELATIONS if f == field).format(**claimed)
    return {"prompt": f"Document: {document}\nStatement: {statement}\nTrue or false? Answer: ",
            "response": "true" if truth else "false"}
  if kind == "arithmetic":
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    op = str(rng.choice(["+", "-", "*"]))
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"prompt": f"Question: What is {a} {op} {b}?\nAnswer: ", "response": str(value)}
  return generate_examples(1, int(rng.integers(2**31)))[0]


def instruction_examples(n: int, seed: int) -> list[dict[str, str]]:
  """`n` prompt/response examples, a pure function of `seed`, the kinds of `KINDS` in equal shares:
  question answering over a short document, true/false statements about it, one-sentence summaries,
  two-digit arithmetic, and the instruction tasks of `common.data.sft.generate_examples` (addition,
  reversal, copying, sorting)."""
  rng = np.random.default_rng(seed)
  return [dict(_example(rng, KINDS[int(rng.integers(len(KINDS)))])) for _ in range(n)]


def example_kind(example: dict[str, str]) -> str:
  prompt = example["prompt"]
  if prompt.startswith("Question: What is"):
    return "arithmetic"
  if "\nQuestion: " in prompt:
    return "document_qa"
  if "\nStatement: " in prompt:
    return "true_false"
  if "\nSummary: " in prompt:
    return "summary"
  return "instruction"


def encode_example(example: dict[str, str], tokenizer) -> tuple[list[int], list[int]]:
  """(prompt ids after the document-start id, response ids and EOS): the prompt and response are encoded
  apart, so the ids the model is trained on are those the evaluation prompts it with."""
  return ([DOCUMENT_START_ID] + tokenizer.encode(example["prompt"]),
          tokenizer.encode(example["response"], eos=True))


def instruction_rows(examples: list[dict[str, str]], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """Examples as pretraining documents (prompt and response, EOS), packed like the corpus
  (`common.data.packing`), with the loss on every token."""
  documents = (np.asarray(sum(encode_example(e, tokenizer), [])[1:], np.int32) for e in examples)
  rows = pack_documents(documents, seq_len)
  rows["inputs"] = make_inputs(rows["targets"], rows["positions"])
  rows["loss_mask"] = (rows["segment_ids"] > 0).astype(np.float32)
  return rows


def split_held_out(train: list[dict], candidates: list[dict]) -> list[dict]:
  """The candidates whose prompt no training example has, each prompt once: questions the model never saw."""
  seen = {e["prompt"] for e in train}
  out = []
  for example in candidates:
    if example["prompt"] not in seen:
      seen.add(example["prompt"])
      out.append(example)
  return out


# --- data: corpus rows and instruction rows in every batch ---------------------------------------------


class MixedData:
  """Batches of `batch_size` rows: the first `batch_size - instruction_per_batch` from the packed corpus
  (`common.data.LMData`), the rest packed instruction text (`SFTData`); each a pure function of (seed, step),
  so resuming gives the same data. Eval batches are the held-out corpus."""

  def __init__(self, data_cfg, instructions: dict[str, np.ndarray], *, batch_size: int,
               instruction_per_batch: int, seed: int):
    self.batch_size = batch_size
    self.corpus_per_batch = batch_size - instruction_per_batch
    self.corpus = LMData(data_cfg, batch_size=max(self.corpus_per_batch, 1), seed=seed)
    self.corpus_eval = LMData(data_cfg, batch_size=batch_size, seed=seed)
    held = {k: v[:0] for k, v in instructions.items()}
    self.instructions = SFTData(instructions, held, batch_size=max(instruction_per_batch, 1), seed=seed + 1)
    self.vocab_size = self.corpus.vocab_size

  def train_batch(self, position: int) -> dict[str, np.ndarray]:
    step = position // self.batch_size
    parts = []
    if self.corpus_per_batch:
      parts.append(self.corpus.train_batch(step * self.corpus_per_batch))
    n = self.batch_size - self.corpus_per_batch
    if n:
      parts.append(self.instructions.train_batch(step * n))
    keys = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
    return {k: np.concatenate([p[k] for p in parts]).astype(np.float32 if k == "loss_mask" else np.int32)
            for k in keys}

  def eval_batches(self, max_batches: int = 0):
    return self.corpus_eval.eval_batches(max_batches)


# --- tokenizer -----------------------------------------------------------------------------------------


def _own_tokenizer(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "tokenizer.model")


def prepare_tokenizer(cfg, workdir: str):
  """The run's tokenizer (of a resolved config): bytes, or SentencePiece from `data.spm_model`, trained once
  into DIR/tokenizer.model (common.data.train_tokenizer) when the run trains its own."""
  if cfg.data.vocab == "byte":
    return ByteTokenizer()
  if cfg.data.spm_model == _own_tokenizer(workdir) and not os.path.exists(cfg.data.spm_model):
    os.makedirs(workdir, exist_ok=True)
    train_spm(cfg.data.spm_model, vocab_size=int(cfg.pretrain.tokenizer_vocab_size))
  return SentencePieceTokenizer(cfg.data.spm_model)


# --- quality -------------------------------------------------------------------------------------------


def corpus_quality(model, data: MixedData) -> dict[str, float]:
  """Mean next-token loss over every held-out corpus token, its perplexity, and bits per byte of text."""
  graphdef, params = nnx.split(model, nnx.Param)
  loss_sums = jax.jit(make_eval_step(graphdef, next_token_loss))
  total, weight = 0.0, 0.0
  for batch in data.corpus_eval.eval_batches(0):
    nll, count, _ = jax.device_get(loss_sums(params, {k: jnp.asarray(v) for k, v in batch.items()}))
    total, weight = total + float(nll), weight + float(count)
  loss = total / weight
  return {"corpus_loss": loss, "corpus_perplexity": math.exp(loss),
          "corpus_bits_per_byte": total / math.log(2) / data.corpus_eval.eval_bytes}


def instruction_quality(model, tokenizer, held_out: list[dict], *, max_answer_tokens: int) -> dict[str, float]:
  """Loss per response token (EOS included) of the held-out examples, and the exact-match accuracy of the
  greedy answer (up to the first newline or EOS) to each of their prompts, overall and per kind."""
  encoded = [encode_example(e, tokenizer) for e in held_out]
  scored = score_continuations(model, [p for p, _ in encoded], [r for _, r in encoded], batch_size=32,
                               vocab_size=tokenizer.vocab_size)
  loss = -sum(s.logprob for s in scored) / sum(len(r) for _, r in encoded)
  prompt_ids = {e["prompt"]: p for e, (p, _) in zip(held_out, encoded)}

  def generate_fn(prompts: list[str], n: int) -> list[list[str]]:
    rows = generate(model, [prompt_ids[p] for p in prompts for _ in range(n)], max_new_tokens=max_answer_tokens,
                    stop_ids=tokenizer.stop_ids, stop_strings=("\n",), tokenizer=tokenizer)
    texts = [tokenizer.decode(row) for row in rows]
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

  records = [GenerationExample(e["prompt"], (e["response"],)) for e in held_out]
  result = evaluate_generations(records, generate_fn, "exact_match", batch_size=64)
  out = {"instruction_loss": loss, "instruction_perplexity": math.exp(loss), "answer_accuracy": result["mean"],
         "num_questions": len(held_out)}
  kinds = [example_kind(e) for e in held_out]
  for kind in KINDS:
    scores = [x["scores"][0] for x, k in zip(result["examples"], kinds) if k == kind]
    if scores:
      out[f"answer_accuracy/{kind}"] = float(np.mean(scores))
  return out


# --- the run -------------------------------------------------------------------------------------------


def resolve(cfg, workdir: str):
  """Fills what the config derives (in place; returns it), before anything is trained: an empty
  data.spm_model is the tokenizer this run trains into DIR/tokenizer.model with pretrain.tokenizer_vocab_size
  pieces; model.vocab_size 0 is the vocabulary's size padded to a multiple of 128."""
  require(cfg.data.vocab in ("spm", "byte"), "data.vocab", f"must be 'spm' or 'byte', got '{cfg.data.vocab}'")
  if cfg.data.vocab == "spm" and not cfg.data.spm_model:
    cfg.data.spm_model = _own_tokenizer(workdir)
  if int(cfg.model.vocab_size) == 0:
    untrained = cfg.data.spm_model == _own_tokenizer(workdir) and not os.path.exists(cfg.data.spm_model)
    ids = int(cfg.pretrain.tokenizer_vocab_size) if untrained else vocab_size(cfg.data)
    cfg.model.vocab_size = padded_vocab_size(ids)
  return cfg


def validate(cfg) -> None:
  """The checks of a resolved config (`resolve`), each naming its key."""
  validate_model_config(cfg.model)
  p = cfg.pretrain
  require(0.0 <= float(p.instruction_fraction) <= 1.0, "pretrain.instruction_fraction",
          f"must be in [0, 1], got {p.instruction_fraction}")
  require(int(p.num_instruction_examples) > 0, "pretrain.num_instruction_examples",
          f"must be positive, got {p.num_instruction_examples}")
  require(int(p.eval_questions) > 0, "pretrain.eval_questions", f"must be positive, got {p.eval_questions}")
  require(int(p.tokenizer_vocab_size) >= 512, "pretrain.tokenizer_vocab_size",
          f"must be >= 512 (byte fallback needs 256 pieces), got {p.tokenizer_vocab_size}")


def instruction_per_batch(cfg) -> int:
  return int(round(cfg.train.batch_size * float(cfg.pretrain.instruction_fraction)))


def build_data(cfg, tokenizer) -> tuple[MixedData, list[dict]]:
  """(the mixed training data, the held-out generated examples)."""
  p = cfg.pretrain
  train_examples = instruction_examples(int(p.num_instruction_examples), int(p.instruction_seed))
  candidates = instruction_examples(4 * int(p.eval_questions), int(p.instruction_seed) + 1)
  held_out = split_held_out(train_examples, candidates)[:int(p.eval_questions)]
  rows = instruction_rows(train_examples, tokenizer, int(cfg.data.seq_len))
  data = MixedData(cfg.data, rows, batch_size=int(cfg.train.batch_size),
                   instruction_per_batch=instruction_per_batch(cfg), seed=int(cfg.train.seed))
  return data, held_out


def make_task(cfg, data: MixedData):
  require(cfg.model.vocab_size >= data.vocab_size, "model.vocab_size",
          f"{cfg.model.vocab_size} is smaller than the vocabulary's {data.vocab_size} ids")
  seq_len = int(cfg.data.seq_len)
  return Task(build_model=lambda: build_model(cfg.model, seed=cfg.train.seed), loss_fn=next_token_loss, data=data,
              train_flops_per_example=training_flops_per_token(cfg.model, seq_len) * seq_len,
              units_per_example=seq_len)


def main(argv: list[str]) -> int:
  if not any(a.startswith("--config=") for a in argv):
    argv = [f"--config={DEFAULT_CONFIG}"] + argv
  cfg, flags = parse_argv(argv, extra_flags={
      "name": f"the library entry to register (default {DEFAULT_NAME})",
      "hub_root": "library folder (default: $META_PAPERS_HUB, else ~/.cache/meta_papers_jax/hub)"},
      switches={"overwrite": "replace an existing entry of that name"})
  workdir = flags.get("workdir") or DEFAULT_WORKDIR
  name, root = flags.get("name") or DEFAULT_NAME, flags.get("hub_root") or None
  overwrite = flags.get("overwrite") == "true"
  if name in hub.list_checkpoints(root) and not overwrite:
    raise ConfigError(f"hub checkpoint '{name}': already exists in '{hub.hub_root(root)}' (pass --overwrite "
                      "to replace it, or --name=OTHER)")
  mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes, dcn_shape=cfg.mesh.get("dcn_shape", ()))
  validate_loop_config(cfg, mesh)
  validate(resolve(cfg, workdir))
  tokenizer = prepare_tokenizer(cfg, workdir)
  data, held_out = build_data(cfg, tokenizer)
  task = make_task(cfg, data)
  start = time.time()
  status = train(cfg, workdir, task, mesh=mesh)
  train_seconds = time.time() - start
  if status:
    return status
  model, step = load_run_model(workdir, cfg, task.build_model, key="--workdir")
  quality = corpus_quality(model, data)
  quality.update(instruction_quality(model, tokenizer, held_out, max_answer_tokens=int(cfg.pretrain.max_answer_tokens)))
  metadata = {"source_run": os.path.abspath(workdir), "step": step, "tokenizer": cfg.data.vocab,
              "prompt_prefix_ids": [DOCUMENT_START_ID], "train_seconds_this_process": round(train_seconds, 1),
              **{f"eval/{k}": v for k, v in quality.items()}}
  folder = hub.save(name, cfg.model, model, tokenizer=tokenizer, metadata=metadata, root=root,
                    overwrite=overwrite)
  print(f"registered '{name}' at {folder} (step {step}, {train_seconds / 60:.1f} min of training here)")
  for key, value in quality.items():
    print(f"  {key:32s} {value:.4f}" if isinstance(value, float) else f"  {key:32s} {value}")
  return 0


if __name__ == "__main__":
  run_main(lambda: main(sys.argv[1:]))
