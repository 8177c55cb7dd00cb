"""The shared checkpoint library: named checkpoints with their model config and tokenizer, so that one
package's output (a pretrained base, an SFT model) is another's input by name. Storing and reading entries is
model loading (as `hf_llama` is), so it sits on the models floor, where the SFT task and the recipes reach it;
`common.hub` (top floor) is the same library as users see it, plus publishing a training run and the command line.

    common.hub.save("tiny-base", model_cfg, model, tokenizer=tok, metadata={"eval/loss": 2.1})
    model_cfg, model, tokenizer, metadata = common.hub.load("tiny-base", mesh=mesh)
    python -m common.hub list | show NAME [--root=DIR]
    python -m common.hub publish --workdir=RUN --name=NAME [--merge_lora] [--root=DIR]

The library is a folder, `root`, `$META_PAPERS_HUB`, or ~/.cache/meta_papers_jax/hub, in that order of
precedence; any etils path works (gs://bucket/hub included). One entry is a folder:

    NAME/entry.json     name, creation time, parameter count, tokenizer spec, the caller's metadata
    NAME/model.json     the `model.*` config section
    NAME/params/        the parameters (orbax), restorable onto any mesh
    NAME/tokenizer/     the tokenizer's model file, if it has one

An entry is written under a hidden temporary name and renamed into place when complete (atomic on local
disks), so a listed name is always whole; a name is never replaced unless `overwrite=True`.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import tempfile
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from common.config import ConfigError
from common.tokenizers import (HF_CHAT_TEMPLATE_FILE, HF_GENERATION_CONFIG, HF_SPECIAL_TOKENS_MAP,
                               HF_TOKENIZER_CONFIG, HF_TOKENIZER_FILE, ByteTokenizer, HFTokenizer, Llama3Tokenizer,
                               SentencePieceTokenizer, Tokenizer, load_tokenizer, model_special_ids)

ENV_ROOT = "META_PAPERS_HUB"
DEFAULT_ROOT = "~/.cache/meta_papers_jax/hub"
ENTRY_FILE, MODEL_FILE, PARAMS_DIR, TOKENIZER_DIR = "entry.json", "model.json", "params", "tokenizer"
TOKENIZER_FILE = "tokenizer.model"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def hub_root(root: str | os.PathLike | None = None) -> epath.Path:
  """The library folder: `root`, else $META_PAPERS_HUB, else ~/.cache/meta_papers_jax/hub."""
  text = os.fspath(root) if root else os.environ.get(ENV_ROOT) or DEFAULT_ROOT
  return epath.Path(os.path.expanduser(text) if "://" not in text else text)


def _check_name(name: str) -> str:
  if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
    raise ConfigError(f"hub name '{name}': use letters, digits, '.', '_' and '-', starting with a letter or digit")
  return name


def _entry(name: str, root) -> epath.Path:
  folder = hub_root(root) / _check_name(name)
  if not (folder / ENTRY_FILE).exists():
    known = ", ".join(list_checkpoints(root)[:12]) or "none"
    build = "; build it with `python -m common.recipes.pretrain_base`" if name == "tiny-base" else ""
    raise ConfigError(f"hub checkpoint '{name}': not found in '{hub_root(root)}' (known: {known}){build}")
  return folder


# --- tokenizers --------------------------------------------------------------------------------------


def _write_tokenizer(tokenizer: Tokenizer | tuple[str, str] | None, folder: epath.Path) -> dict | None:
  """Copies the tokenizer's model file into `folder`; returns the spec `_read_tokenizer` rebuilds it from.
  `tokenizer` is a Tokenizer or its files as (kind, path) with kind 'byte', 'spm' or 'llama3'."""
  if tokenizer is None:
    return None
  if isinstance(tokenizer, tuple):
    kind, path = tokenizer
    load_tokenizer(kind, path)  # fails here, naming the path, rather than at load time
    if kind == "byte":
      return {"kind": "byte"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TOKENIZER_FILE).write_bytes(epath.Path(os.path.expanduser(path)).read_bytes())
    return {"kind": kind, "file": TOKENIZER_FILE}
  if isinstance(tokenizer, ByteTokenizer):
    return {"kind": "byte"}
  folder.mkdir(parents=True, exist_ok=True)
  if isinstance(tokenizer, SentencePieceTokenizer):
    (folder / TOKENIZER_FILE).write_bytes(tokenizer._model.serialized_model_proto())  # pylint: disable=protected-access
    return {"kind": "spm", "file": TOKENIZER_FILE}
  if isinstance(tokenizer, Llama3Tokenizer):
    # The tiktoken BPE file again: one `base64(token) rank` line per rank; specials follow the ranks.
    import base64  # pylint: disable=g-import-not-at-top
    encoding = tokenizer._encoding  # pylint: disable=protected-access
    n_ranks = tokenizer.vocab_size - len(tokenizer.special_tokens)
    lines = (base64.b64encode(encoding.decode_single_token_bytes(rank)).decode() + f" {rank}"
             for rank in range(n_ranks))
    (folder / TOKENIZER_FILE).write_text("\n".join(lines) + "\n")
    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    return {"kind": "llama3", "file": TOKENIZER_FILE, "special_tokens": specials}
  if isinstance(tokenizer, HFTokenizer):  # the folder's files, as they are
    names = [name for name in (HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG, HF_SPECIAL_TOKENS_MAP,
                               HF_CHAT_TEMPLATE_FILE, HF_GENERATION_CONFIG)
             if os.path.isfile(os.path.join(tokenizer.folder, name))]
    for name in names:
      (folder / name).write_bytes(epath.Path(tokenizer.folder, name).read_bytes())
    return {"kind": "hf", "files": names}
  raise ConfigError(f"tokenizer: cannot store a {type(tokenizer).__name__} (expected a common.tokenizers "
                    "Tokenizer or (kind, path))")


def _local_file(path: epath.Path) -> str:
  """A local filename for `path` (copied to a temporary file when the library is remote)."""
  if os.path.isfile(os.fspath(path)):
    return os.fspath(path)
  handle, local = tempfile.mkstemp(suffix="-" + path.name)
  with os.fdopen(handle, "wb") as f:
    f.write(path.read_bytes())
  return local


def _local_folder(folder: epath.Path, names: list[str]) -> str:
  """A local copy of the files `names` of a remote `folder`."""
  local = tempfile.mkdtemp(suffix="-tokenizer")
  for name in names:
    with open(os.path.join(local, name), "wb") as f:
      f.write((folder / name).read_bytes())
  return local


def _read_tokenizer(spec: dict | None, folder: epath.Path) -> Tokenizer | None:
  if spec is None:
    return None
  if spec["kind"] == "byte":
    return ByteTokenizer()
  if spec["kind"] == "hf":  # a folder, copied when the library is remote
    local = os.fspath(folder) if os.path.isdir(os.fspath(folder)) else _local_folder(folder, spec["files"])
    return HFTokenizer(local)
  local = _local_file(folder / spec["file"])
  if spec["kind"] == "llama3":
    return Llama3Tokenizer(local, spec.get("special_tokens"))
  return load_tokenizer(spec["kind"], local)


# --- save / load -------------------------------------------------------------------------------------


def _sync(tag: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(tag)


def save(name: str, model_cfg: ml_collections.ConfigDict, model: nnx.Module, *,
         tokenizer: Tokenizer | tuple[str, str] | None = None, metadata: dict | None = None,
         root: str | os.PathLike | None = None, overwrite: bool = False) -> epath.Path:
  """Stores `model`'s parameters, `model_cfg` and the tokenizer as library entry `name`; returns its folder.
  The stored config takes the tokenizer's bos/eos/pad ids (`model_special_ids`) where it names none, so a
  generation with the loaded model stops where the tokenizer's text ends. Every process of a multi-host run
  must call it (the parameters are gathered by orbax)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  library = hub_root(root)
  final = library / _check_name(name)
  if final.exists() and not overwrite:
    raise ConfigError(f"hub checkpoint '{name}': already exists in '{library}' (pass overwrite=True to replace it)")
  try:
    metadata_json = json.loads(json.dumps(metadata or {}))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"hub checkpoint '{name}': metadata is not JSON-serialisable ({e})") from None
  params = nnx.state(model, nnx.Param)
  writer = jax.process_index() == 0
  partial = library / f".partial-{name}"
  if writer:
    if partial.exists():
      partial.rmtree()  # left by a save that died part-way
    partial.mkdir(parents=True)
  _sync(f"hub_save_begin_{name}")
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(partial / PARAMS_DIR, nnx.to_pure_dict(params))
      checkpointer.wait_until_finished()
    if writer:
      (partial / MODEL_FILE).write_text(_with_tokenizer_ids(model_cfg, tokenizer).to_json(indent=2))
      created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
      num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
      entry = dict(name=name, created=created, model=model_cfg.get("name", ""), num_params=num_params,
                   tokenizer=_write_tokenizer(tokenizer, partial / TOKENIZER_DIR), metadata=metadata_json)
      (partial / ENTRY_FILE).write_text(json.dumps(entry, indent=2))
      replaced = library / f".replaced-{name}"
      if replaced.exists():
        replaced.rmtree()
      if final.exists():
        final.rename(replaced)
      partial.rename(final)
      if replaced.exists():
        replaced.rmtree()
  except BaseException:
    if writer and partial.exists():
      partial.rmtree()
    raise
  _sync(f"hub_save_end_{name}")
  return final


def _with_tokenizer_ids(model_cfg: ml_collections.ConfigDict, tokenizer) -> ml_collections.ConfigDict:
  """`model_cfg` with the special ids of `tokenizer` (a Tokenizer, or (kind, path)) where it has none."""
  if tokenizer is None or "eos_ids" not in model_cfg:
    return model_cfg
  if isinstance(tokenizer, tuple):
    tokenizer = load_tokenizer(*tokenizer)
  current = dict(bos_id=int(model_cfg.bos_id), eos_ids=list(model_cfg.eos_ids), pad_id=int(model_cfg.pad_id))
  filled = {key: value for key, value in model_special_ids(tokenizer).items() if current[key] in (-1, [])}
  return ml_collections.ConfigDict({**model_cfg.to_dict(), **filled})


def _default_build(model_cfg) -> nnx.Module:
  from common.models import build_model  # pylint: disable=g-import-not-at-top
  return build_model(model_cfg, seed=0)


def load(name: str, *, mesh: jax.sharding.Mesh | None = None, root: str | os.PathLike | None = None,
         build: Callable[[ml_collections.ConfigDict], nnx.Module] | None = None
         ) -> tuple[ml_collections.ConfigDict, nnx.Module, Tokenizer | None, dict]:
  """(model config, model, tokenizer or None, metadata) of library entry `name`. Parameters are restored
  onto `mesh` sharded by `common.sharding` (or onto the first device); `build(model_cfg)` makes the module
  (default: `common.models.build_model`), only abstractly: no parameter is initialised."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from common.sharding import state_shardings  # pylint: disable=g-import-not-at-top
  folder = _entry(name, root)
  entry = json.loads((folder / ENTRY_FILE).read_text())
  model_cfg = ml_collections.ConfigDict(json.loads((folder / MODEL_FILE).read_text()))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: (build or _default_build)(model_cfg)), nnx.Param)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda v: v.replace(device), abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
  else:
    shardings = state_shardings(abstract, mesh)
  target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                        nnx.to_pure_dict(abstract), nnx.to_pure_dict(shardings))
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(folder / PARAMS_DIR, target)
  except (ValueError, KeyError, FileNotFoundError) as e:
    reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    raise ConfigError(f"hub checkpoint '{name}': parameters in '{folder / PARAMS_DIR}' do not match "
                      f"its model.json ({reason})") from None
  nnx.replace_by_pure_dict(abstract, restored)
  tokenizer = _read_tokenizer(entry.get("tokenizer"), folder / TOKENIZER_DIR)
  return model_cfg, nnx.merge(graphdef, abstract), tokenizer, dict(entry.get("metadata") or {})


def list_checkpoints(root: str | os.PathLike | None = None) -> list[str]:
  """Names of the complete entries in the library, sorted."""
  library = hub_root(root)
  if not library.exists():
    return []
  return sorted(p.name for p in library.iterdir()
                if not p.name.startswith(".") and (p / ENTRY_FILE).exists())


def describe(name: str, root: str | os.PathLike | None = None) -> dict[str, Any]:
  """entry.json of `name` with its model config under 'model_config'."""
  folder = _entry(name, root)
  entry = json.loads((folder / ENTRY_FILE).read_text())
  entry["model_config"] = json.loads((folder / MODEL_FILE).read_text())
  entry["path"] = os.fspath(folder)
  return entry


def entry_tokenizer(name: str, root: str | os.PathLike | None = None) -> Tokenizer | None:
  """The tokenizer stored with entry `name` (None if it has none), without reading its parameters."""
  folder = _entry(name, root)
  return _read_tokenizer(json.loads((folder / ENTRY_FILE).read_text()).get("tokenizer"), folder / TOKENIZER_DIR)
