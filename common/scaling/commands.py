"""One shell command per planned run, for a cluster scheduler (`python -m common.scaling.sweep --emit_commands`).

Each command is the trainer's own command line (ARCHITECTURE.md): the skeleton config `family_config.py` plus
`--config.KEY=VALUE` for every key on which the run's config differs from it, so a scheduler needs nothing
but the repository. Rerunning a command resumes its run, as with any trainer.
"""
from __future__ import annotations

import os
import shlex

import ml_collections

from common.config import ConfigError, load

SKELETON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "family_config.py")


def _text(value) -> str:
  """The `--config.k=` text that common.config parses back into `value`."""
  if isinstance(value, (list, tuple)):
    return repr(tuple(value)) if isinstance(value, tuple) else repr(list(value))
  return str(value) if not isinstance(value, float) else repr(value)


def _leaves(d: dict, prefix: str = ""):
  for key, value in d.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      yield from _leaves(value, name + ".")
    else:
      yield name, value


def config_overrides(cfg: ml_collections.ConfigDict, family: str) -> list[tuple[str, str]]:
  """(key, text) pairs that turn the skeleton into `cfg`; checked by loading them back."""
  skeleton = load(SKELETON).to_dict()
  flat_skeleton = dict(_leaves(skeleton))
  pairs = []
  for key, value in _leaves(cfg.to_dict()):
    if key not in flat_skeleton:
      if isinstance(value, dict) or value == {}:
        continue
      raise ConfigError(f"--family: {family} sets config key '{key}', which {SKELETON} does not have; "
                        "run this family in-process (without --emit_commands) or give it a config file")
    if flat_skeleton[key] != value:
      pairs.append((key, _text(value)))
  if load(SKELETON, pairs).to_dict() != cfg.to_dict():
    raise ConfigError(f"--family: the config of {family} does not survive as command-line overrides "
                      "(a value type common.config cannot parse); run it in-process instead")
  return pairs


def _display_path(path: str) -> str:
  rel = os.path.relpath(path)
  return path if rel.startswith("..") else rel


def train_command(cfg: ml_collections.ConfigDict, workdir: str, *, family: str,
                  trainer: str = "common.train", python: str = "python") -> str:
  """`python -m common.train --config=.../family_config.py --workdir=DIR --config.K=V ...`."""
  args = [python, "-m", trainer, f"--config={_display_path(SKELETON)}", f"--workdir={workdir}"]
  args += [f"--config.{k}={v}" for k, v in config_overrides(cfg, family)]
  return " ".join(shlex.quote(a) for a in args)
