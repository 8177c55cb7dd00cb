"""What a rerun on an existing workdir may change, and the record of what it did change.

Every config key changes the training trajectory (the numbers a resumed run produces) unless FREE_KEYS lists
it. A rerun whose config differs in such a key from DIR/config.json is refused, naming the key, unless the
user allows that key (`--allow_config_change=KEY,...`); the change is then recorded in config.json under
`config_history`: which steps ran under which values (RECORDED_KEYS, the run's length, are recorded without
being allowed). Keys only in the new config (added to the code since the run started, with their defaults) do
not count; paths are compared normalised ('dir/' is 'dir').
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from common.config import ConfigError
from common.train.workdir import run_path

# Keys (or whole sections) that do not change the trajectory: how often and what is logged, evaluated and
# checkpointed, the mesh (it changes placement only, common.sharding) and what the backward pass recomputes
# (model.remat: memory, not numbers). Everything else is compared.
FREE_KEYS = ("log", "eval", "checkpoint", "mesh", "model.remat", "train.init_from", "data.max_eval_bytes",
             "data.tfds_eval_split")
# Keys whose change a rerun accepts without being told, recorded like an allowed one: the run's length
# (rerunning with more steps is how a run is extended; the schedule's new horizon is in the history).
RECORDED_KEYS = ("train.steps",)
HISTORY_KEY = "config_history"
MISSING = "<absent>"


def is_free(key: str) -> bool:
  return any(key == free or key.startswith(free + ".") for free in FREE_KEYS)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(node, dict):
    out = {}
    for key, value in node.items():
      out.update(_flat(value, f"{prefix}{key}."))
    return out if out or not prefix else {prefix[:-1]: {}}
  return {prefix[:-1]: node}


def _normalised(value: Any) -> Any:
  if isinstance(value, str) and os.sep in value:
    return os.path.normpath(value)
  if isinstance(value, (list, tuple)):
    return [_normalised(v) for v in value]
  return value


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """{key: (old value, new value)} for every compared key of `old` whose value `new` changes or drops."""
  old = {k: v for k, v in old.items() if k != HISTORY_KEY}
  flat_old, flat_new = _flat(old), _flat(new)
  return {key: (value, flat_new.get(key, MISSING)) for key, value in flat_old.items()
          if not is_free(key) and (key not in flat_new or _normalised(value) != _normalised(flat_new[key]))}


def read_config(workdir: str) -> dict | None:
  """DIR/config.json, or None when the workdir holds none."""
  path = run_path(workdir) / "config.json"
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f"--workdir '{workdir}': its config.json is unreadable ({e}); use another workdir") from None


def parse_allowed(text: str, cfg) -> tuple[str, ...]:
  """'train.learning_rate,train.seed' -> the keys, each checked to be a key (or section) of `cfg`."""
  keys = tuple(k.strip() for k in text.split(",") if k.strip())
  flat = _flat(json.loads(cfg.to_json_best_effort()))
  for key in keys:
    if not any(k == key or k.startswith(key + ".") for k in flat):
      raise ConfigError(f"--allow_config_change: unknown config key '{key}'")
  return keys


def check_changes(workdir: str, cfg, allowed: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
  """The allowed changes of `cfg` against the run in `workdir` ({} for a new workdir); a ConfigError naming
  the first key that changes the trajectory and is not allowed."""
  old = read_config(workdir)
  if old is None:
    return {}
  changes = config_changes(old, json.loads(cfg.to_json_best_effort()))
  for key, (before, after) in changes.items():
    if key not in RECORDED_KEYS and not any(key == a or key.startswith(a + ".") for a in allowed):
      raise ConfigError(
          f"--workdir '{workdir}' holds a run with {key}={before!r}, this config has {after!r}: a different "
          f"'{key}' changes the training trajectory; pass --allow_config_change={key} to continue under the "
          "new value (config.json records the change), or use another workdir")
  return changes


def config_record(workdir: str, cfg, changes: dict[str, tuple[Any, Any]], from_step: int) -> str:
  """The text of the new config.json: the resolved config, and the history of earlier runs' values, to which
  `changes` is added when steps 1..from_step (kept in the checkpoint) ran under the old values."""
  old = read_config(workdir) or {}
  history = list(old.get(HISTORY_KEY, []))
  if changes and from_step > 0:
    history.append({"until_step": from_step,
                    "changed": {k: {"before": before, "after": after} for k, (before, after) in changes.items()}})
  record = json.loads(cfg.to_json_best_effort())
  if history:
    record[HISTORY_KEY] = history
  return json.dumps(record, indent=2, sort_keys=True)
