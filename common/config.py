"""Config files and command-line overrides, validated once at start-up.

A config is a Python file with `get_config(arg=None) -> ml_collections.ConfigDict`. On the command line it is
named as `path.py[:key=value,...]`, and single keys are overridden with `--config.a.b=value`. Unknown keys and
values of the wrong type are errors that name the key (`ConfigError`); entry points turn them into one line on
stderr and exit status 2 (`run_main`).
"""
from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable, Sequence

import ml_collections


class ConfigError(ValueError):
  """Bad user input: a config key, a value, a path. Entry points exit with status 2."""


class DataError(ValueError):
  """Bad data configuration (missing path, unknown name); the message names the config key. Defined here, the
  lowest floor, so that `run_main` reports it like a ConfigError; `common.data` re-exports it."""


def _load_module(path: str):
  if not os.path.isfile(path):
    raise ConfigError(f"--config: no such config file '{path}'")
  name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"--config: '{path}' line {e.lineno}: syntax error ({e.msg})") from None
  except Exception as e:  # a failing import or statement of the file: the user's file, reported as such
    raise ConfigError(f"--config: '{path}' failed to load: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config: '{path}' defines no get_config()")
  return module


def _literal_or_str(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _parse_sequence(key: str, text: str, current: tuple | list) -> tuple | list:
  """'(2, 4)', '[2, 4]', '2,4', 'data,tensor' or '(data,tensor)' -> a tuple (list) whose elements have the
  type of the current elements (ints may stand for floats)."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    body = text.strip()
    if body[:1] + body[-1:] in ("()", "[]"):
      body = body[1:-1]
    value = tuple(_literal_or_str(part.strip()) for part in body.split(",") if part.strip())
  if not isinstance(value, (tuple, list)):
    value = (value,)
  kinds = {type(v) for v in current}
  if len(kinds) == 1:
    kind = kinds.pop()
    if kind is float:
      value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    for v in value:
      if type(v) is not kind:
        raise ConfigError(f"config key '{key}': expected a {type(current).__name__} of {kind.__name__}, "
                          f"got '{text}'")
  return tuple(value) if isinstance(current, tuple) else list(value)


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse_value(key: str, text: str, current: Any) -> Any:
  """Parses `text` into the type of the value it replaces."""
  if isinstance(current, bool):
    low = text.strip().lower()
    if low in TRUE_WORDS:
      return True
    if low in FALSE_WORDS:
      return False
    raise ConfigError(f"config key '{key}': expected a bool, got '{text}'")
  if isinstance(current, (tuple, list)):
    return _parse_sequence(key, text, current)
  if isinstance(current, (int, float)) or current is None:
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      if current is None:
        return text
      raise ConfigError(f"config key '{key}': cannot parse '{text}' as {type(current).__name__}") from None
    if current is None:
      return value
    if isinstance(value, bool):  # bool is an int subclass: 'True' is not a number
      raise ConfigError(f"config key '{key}': expected {type(current).__name__}, got '{text}'")
    if isinstance(current, float) and isinstance(value, int):
      value = float(value)
    if not isinstance(value, type(current)):
      raise ConfigError(f"config key '{key}': expected {type(current).__name__}, got '{text}'")
    return value
  if isinstance(current, str):
    return text
  raise ConfigError(f"config key '{key}' cannot be set from the command line")


def override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets `cfg.<key>` from a string; the key must already exist."""
  parts = key.split(".")
  node = cfg
  for i, part in enumerate(parts[:-1]):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(f"unknown config key '{key}' (no section '{'.'.join(parts[:i + 1])}')")
    node = node[part]
  leaf = parts[-1]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
    raise ConfigError(f"unknown config key '{key}'" + (f" (known here: {known})" if known else ""))
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise ConfigError(f"config key '{key}' is a section, not a value")
  with node.ignore_type():
    node[leaf] = _parse_value(key, text, node[leaf])


def _split_pairs(arg: str) -> list[str]:
  """'a=1,b=(2,4),c=x,y' -> ['a=1', 'b=(2,4)', 'c=x,y']: commas inside brackets, or before a piece that is
  not key=value, belong to the value."""
  pieces, depth, cur = [], 0, ""
  for ch in arg:
    if ch in "([":
      depth += 1
    elif ch in ")]":
      depth -= 1
    if ch == "," and depth == 0:
      pieces.append(cur)
      cur = ""
    else:
      cur += ch
  pieces.append(cur)
  out: list[str] = []
  for piece in filter(None, (p.strip() for p in pieces)):
    if "=" not in piece and out:
      out[-1] += "," + piece
    else:
      out.append(piece)
  return out


def load(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  """Loads `path.py[:k=v,...]`, then applies `overrides` [(key, value)] in order.

  In the `:` part, dotted keys (`train.steps=5`) override config keys; plain names (`family=moe`) are the
  config file's own arguments, passed on as the string `get_config(arg)` receives (big_vision style)."""
  path, _, arg = spec.partition(":")
  module = _load_module(path)
  pairs, own = [], []
  for item in _split_pairs(arg):
    if "=" not in item:
      raise ConfigError(f"--config: expected key=value after ':', got '{item}'")
    k, _, v = item.partition("=")
    (pairs if "." in k else own).append((k.strip(), v.strip()))
  takes_arg = bool(inspect.signature(module.get_config).parameters)
  if own and not takes_arg:
    raise ConfigError(f"--config: '{path}' takes no arguments, got '{own[0][0]}' (override keys as section.key)")
  try:
    cfg = module.get_config(",".join(f"{k}={v}" for k, v in own) or None) if takes_arg else module.get_config()
  except (ValueError, KeyError) as e:
    raise ConfigError(f"--config: {path}: {e}") from None
  for k, v in [*pairs, *overrides]:
    override(cfg, k, v)
  return cfg


WORKDIR_HELP = "the run's folder: config.json, metrics.jsonl, checkpoints/; rerun on it to resume"


def _main_doc() -> tuple[str, str]:
  """The running command (`python -m PKG.MOD`) and the first two paragraphs of its module docstring."""
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  prog = f"python -m {spec.name.removesuffix('.__main__')}" if spec else f"python {sys.argv[0]}"
  paragraphs = inspect.cleandoc(getattr(main, "__doc__", None) or "").split("\n\n")
  return prog, "\n\n".join(paragraphs[:2])


def _leaves(node: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
  out = []
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += _leaves(value, f"{prefix}{key}.")
    else:
      out.append((prefix + key, value))
  return out


def _help_text(flags: dict[str, str], switches: dict[str, str],
              cfg: ml_collections.ConfigDict | None = None) -> str:
  """The trainer contract, the command's own flags and switches (name -> help) and, given a config, its keys
  with their values."""
  prog, doc = _main_doc()
  usage = " ".join([f"usage: {prog} --config=FILE.py[:name=value,...]", *(f"[--{f}=VALUE]" for f in flags),
                    *(f"[--{f}]" for f in switches), "[--config.KEY=VALUE ...]"])
  rows = [("--config=FILE.py[:name=value,...]", "the config file (get_config(arg)); after ':' its own arguments "
           "and dotted keys (train.steps=5)"), ("--config.KEY=VALUE", "sets one existing config key; the value "
           "keeps the key's type"), *((f"--{f}=VALUE", h) for f, h in flags.items()),
          *((f"--{f}", h) for f, h in switches.items()),
          ("--help", "this text; with --config=FILE also every config key and its value")]
  lines = [usage, "", doc, "", "flags:"] if doc else [usage, "", "flags:"]
  lines += [f"  {flag:36s} {text}".rstrip() for flag, text in rows]
  if cfg is None:
    lines += ["", f"config keys: `{prog} --config=FILE.py --help` lists them with their values"]
  else:
    lines += ["", "config keys (--config.KEY=VALUE):"] + [f"  {k} = {v!r}" for k, v in _leaves(cfg)]
  return "\n".join(lines)


def _named(names: Sequence[str] | dict[str, str]) -> dict[str, str]:
  return dict(names) if isinstance(names, dict) else dict.fromkeys(names, "")


def parse_argv(argv: Sequence[str], extra_flags: Sequence[str] | dict[str, str] = (), *,
               switches: Sequence[str] | dict[str, str] = (),
               workdir: bool = True) -> tuple[ml_collections.ConfigDict, dict[str, str]]:
  """Parses `--config=... --workdir=... --config.a.b=v ...`; returns the config and the other flags.

  `extra_flags` and `switches` name the command's other flags (or map each name to its help); a switch may be
  bare (`--json`) and comes back as 'true' or 'false'. `--help` (or `-h`) prints the usage, exits 0."""
  flag_help, switch_help = _named(extra_flags), _named(switches)
  if workdir:
    flag_help = {"workdir": WORKDIR_HELP, **flag_help}
  spec, wants_help = None, False
  overrides, flags = [], {}
  for token in argv:
    if token in ("--help", "-h"):
      wants_help = True
      continue
    if token.startswith("--") and token[2:] in switch_help:
      token += "=true"
    if not token.startswith("--") or "=" not in token:
      raise ConfigError(f"expected --flag=value, got '{token}' (see --help)")
    name, _, value = token[2:].partition("=")
    if name == "config":
      spec = value
    elif name.startswith("config."):
      overrides.append((name[len("config."):], value))
    elif name in flag_help:
      flags[name] = value
    elif name in switch_help:
      low = value.strip().lower()
      if low not in TRUE_WORDS + FALSE_WORDS:
        raise ConfigError(f"--{name}: expected true or false, got '{value}'")
      flags[name] = "true" if low in TRUE_WORDS else "false"
    else:
      raise ConfigError(f"unknown flag '--{name}' (known: --config, --config.KEY, " +
                        ", ".join(f"--{f}" for f in sorted([*flag_help, *switch_help])) + "; see --help)")
  if wants_help:
    print(_help_text(flag_help, switch_help, load(spec, overrides) if spec else None))
    sys.exit(0)
  if spec is None:
    raise ConfigError("missing --config=PATH.py (see --help)")
  return load(spec, overrides), flags


def config_args(arg: str | None, defaults: dict[str, str]) -> dict[str, str]:
  """The `name=value,...` string a config file's get_config(arg) receives, over `defaults`; an unknown name
  is a ValueError (reported by `load` as a ConfigError naming the file)."""
  out = dict(defaults)
  for pair in filter(None, (arg or "").split(",")):
    key, _, value = pair.partition("=")
    if key not in out:
      raise ValueError(f"unknown config argument '{key}' (known: {', '.join(out)})")
    out[key] = value
  return out


def require(condition: bool, key: str, message: str) -> None:
  """Raises ConfigError naming `key` unless `condition`."""
  if not condition:
    raise ConfigError(f"config key '{key}': {message}")


def run_main(main: Callable[[], int | None]) -> None:
  """Runs an entry point; user errors become one line on stderr and exit status 2."""
  try:
    code = main()
  except (ConfigError, DataError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(code or 0)
