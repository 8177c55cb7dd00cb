"""One argument parser for every command that is not a trainer (trainers parse `--config` with
`common.config.parse_argv`): `--snake_case` flags, `--help` that exits 0, and bad flags as one line on stderr
with exit status 2 (a ConfigError, reported by `common.config.run_main`), never argparse's two-line usage dump.
The dashed spelling of a flag (`--merge-lora`), which older command lines used, is accepted and not listed."""
from __future__ import annotations

import argparse
import sys

from common.config import ConfigError


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """The description as written (module docstrings are wrapped already); a flag's default where it has one."""

  def _get_help_string(self, action):
    if action.required or action.default is None or action.default is False or action.default == "":
      return action.help
    return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
  """argparse with whole flag names only and errors raised as ConfigError."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("allow_abbrev", False)
    kwargs.setdefault("formatter_class", HelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message):
    raise ConfigError(f"{self.prog}: {message} (see --help)")

  def parse_known_args(self, args=None, namespace=None):
    args = sys.argv[1:] if args is None else list(args)
    return super().parse_known_args([self._snake_case(token) for token in args], namespace)

  def _snake_case(self, token: str) -> str:
    """'--max-bytes=9' -> '--max_bytes=9' when only the snake_case flag exists."""
    name, eq, value = token.partition("=")
    snake = "--" + name[2:].replace("-", "_")
    if name.startswith("--") and name not in self._option_string_actions and snake in self._option_string_actions:
      return snake + eq + value
    return token
