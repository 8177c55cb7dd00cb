"""One argument parser for every command that is not a trainer (trainers parse `--config` with
`common.config.parse_argv`): `--snake_case` flags, `--help` that exits 0, and bad flags as one line on stderr
with exit status 2 (a ConfigError, reported by `common.config.run_main`), never argparse's two-line usage dump."""
from __future__ import annotations

import argparse

from common.config import ConfigError


class ArgumentParser(argparse.ArgumentParser):
  """argparse with whole flag names only and errors raised as ConfigError."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("allow_abbrev", False)
    kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message):
    raise ConfigError(f"{self.prog}: {message} (see --help)")
