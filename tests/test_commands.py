"""Every command of the project (each module with a `__main__` block) answers `--help`: exit status 0, a usage
that names its flags, one flag style (`--snake_case`); trainers tell how to list their config keys. Bad flags are
one line on stderr and exit status 2.

The commands are found in the source, so a new one is checked without being listed here. Their `--help` runs in
one subprocess (`runpy`, each module as `__main__`: JAX is imported once, not once per command); the bad-flag
checks run each command in its own.
"""
from __future__ import annotations

import ast
import functools
import os
import re
import json
import subprocess
import sys

import pytest

from common.config import parse_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHED_FLAG = re.compile(r"(?<![\w-])--[a-z0-9]+-[a-z0-9]")


def _is_main_block(node: ast.stmt) -> bool:
  return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
          and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _commands() -> dict[str, ast.Module]:
  """module name -> parsed source, for every module of a top-level package that runs as a command."""
  out = {}
  for package in sorted(os.listdir(ROOT)):
    if package == "tests" or not os.path.isfile(os.path.join(ROOT, package, "__init__.py")):
      continue
    for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
      dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
      for name in sorted(f for f in files if f.endswith(".py")):
        with open(os.path.join(folder, name)) as f:
          tree = ast.parse(f.read())
        if any(_is_main_block(node) for node in tree.body):
          parts = os.path.relpath(os.path.join(folder, name[:-3]), ROOT).split(os.sep)
          out[".".join(parts[:-1] if parts[-1] == "__main__" else parts)] = tree
  return out


COMMANDS = _commands()


def _declared_flags(tree: ast.Module) -> tuple[set[str], set[str]]:
  """The `--flags` of `add_argument` calls that are shown: (on the command's parser, on a subcommand's)."""
  subparsers = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call) and getattr(node.value.func, "attr", "") == "add_parser"
                for t in node.targets if isinstance(t, ast.Name)}
  main, sub = set(), set()
  for node in ast.walk(tree):
    if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
      continue
    if any(k.arg == "help" and "SUPPRESS" in ast.unparse(k.value) for k in node.keywords):
      continue
    receiver = node.func.value
    on_sub = ((isinstance(receiver, ast.Name) and receiver.id in subparsers)
              or (isinstance(receiver, ast.Call) and getattr(receiver.func, "attr", "") == "add_parser"))
    flags = {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    (sub if on_sub else main).update(flags)
  return main, sub


def _is_trainer(tree: ast.Module) -> bool:
  """Parses `--config=FILE.py` with `common.config.parse_argv` (itself or through `common.train`'s `cli`)."""
  names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
  return bool(names & {"parse_argv", "cli", "common_cli"})


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


# Runs each module given on its command line as `python -m MODULE --help` would, in this one process; prints
# {module: [exit status, stdout, stderr]} as JSON.
_HELP_ALL = """
import contextlib, io, json, runpy, sys
out = {}
for module in sys.argv[1:]:
  stdout, stderr, status = io.StringIO(), io.StringIO(), 0
  sys.argv = [module, "--help"]
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    try:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
      status = e.code if isinstance(e.code, int) else int(e.code is not None)
    except Exception as e:  # reported as a failed command, not a crashed check
      status = 1
      stderr.write(repr(e))
  out[module] = [status, stdout.getvalue(), stderr.getvalue()]
json.dump(out, sys.__stdout__)
"""


@functools.cache
def _helps() -> dict[str, subprocess.CompletedProcess]:
  proc = subprocess.run([sys.executable, "-c", _HELP_ALL, *COMMANDS], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return {m: subprocess.CompletedProcess([m, "--help"], status, out, err)
          for m, (status, out, err) in json.loads(proc.stdout).items()}


def test_the_known_commands_are_found():
  for name in ("common.train", "common.hub", "common.plan", "common.scaling.sweep", "blt.train", "blt.reproduce",
               "bench.gpu_check"):
    assert name in COMMANDS


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_help_names_the_flags_in_one_style(module):
  proc = _helps()[module]
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith("usage: ")
  main, sub = _declared_flags(COMMANDS[module])
  for flag in main | sub:
    assert re.fullmatch(r"--[a-z0-9_]+", flag), f"{module} declares {flag}: flags are --snake_case"
  for flag in main:
    assert re.search(re.escape(flag) + r"\b", proc.stdout), f"{module} --help does not name {flag}"
  assert not DASHED_FLAG.findall(proc.stdout), f"{module} --help shows dashed flags"
  if _is_trainer(COMMANDS[module]):
    assert "--config.KEY=VALUE" in proc.stdout
    # How to list the config keys, or (a command with a default config) the list itself.
    assert "--config=FILE.py --help" in proc.stdout or "config keys (--config.KEY=VALUE):" in proc.stdout


def test_help_with_a_config_lists_its_keys_and_values(capsys):
  with pytest.raises(SystemExit) as e:
    parse_argv(["--help", "--config=common/configs/dense_tiny.py", "--config.train.steps=7"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "  train.steps = 7\n" in out and "  model.d_model = " in out and "--workdir=VALUE" in out


@pytest.mark.parametrize("module,args,bad", [
    ("common.train", ["--config=common/configs/dense_tiny.py", "--workdir=/tmp/x", "--bogus=1"], "--bogus"),
    ("common.scaling.sweep", ["--bogus=1"], "--bogus"),
    ("common.data.train_tokenizer", ["--out=/tmp/x.model", "--vocab_sise=64"], "--vocab_sise"),
])
def test_an_unknown_flag_is_one_line_on_stderr_and_exit_2(module, args, bad):
  proc = _run(module, *args)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and bad in lines[0], proc.stderr


def test_a_dashed_flag_is_still_accepted():
  """Older command lines keep working (`publish --merge-lora`; tests/blt/test_calibrate.py runs `--entropy-model`)."""
  from common.hub.__main__ import parser  # pylint: disable=g-import-not-at-top
  args = parser().parse_args(["publish", "--workdir=RUN", "--name=x", "--merge-lora"])
  assert args.merge_lora and args.workdir == "RUN"
