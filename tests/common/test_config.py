"""common.config: config files named as `path.py[:k=v,...]` plus `--config.a.b=v` overrides, parsed into the
type of the value they replace; bad keys and values raise ConfigError naming the key."""
import pathlib
import textwrap

import pytest

from common.config import ConfigError, load, parse_argv

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = str(REPO / "common" / "configs" / "dense_tiny.py")


@pytest.fixture
def cfg_file(tmp_path):
  """A config file with one value of every overridable type, independent of the repo's configs."""
  path = tmp_path / "cfg.py"
  path.write_text(textwrap.dedent("""
      import ml_collections
      def get_config(arg=None):
        return ml_collections.ConfigDict(dict(
            a=dict(n=3, x=0.5, flag=False, name="adamw", shape=(-1,), axes=("data",), scales=(1.0, 2.0)),
        ))
  """))
  return str(path)


@pytest.mark.parametrize("key,text,expected", [
    ("a.n", "7", 7),
    ("a.x", "1e-3", 1e-3),
    ("a.x", "2", 2.0),  # an int literal where a float is expected becomes that float
    ("a.flag", "true", True),
    ("a.flag", "0", False),
    ("a.name", "sgd", "sgd"),
    ("a.shape", "(2,4)", (2, 4)),
    ("a.shape", "8", (8,)),
    ("a.axes", "('fsdp', 'tensor')", ("fsdp", "tensor")),
    ("a.axes", "fsdp,tensor", ("fsdp", "tensor")),  # bare names, as typed on a command line
    ("a.axes", "(fsdp,tensor)", ("fsdp", "tensor")),
    ("a.scales", "(1, 3)", (1.0, 3.0)),
])
def test_override_takes_the_type_of_the_value_it_replaces(cfg_file, key, text, expected):
  cfg = load(cfg_file, [(key, text)])
  section, name = key.split(".")
  value = cfg[section][name]
  assert value == expected
  assert type(value) is type(expected)
  if isinstance(expected, tuple):
    assert [type(v) for v in value] == [type(v) for v in expected]


def test_colon_pairs_and_flags_apply_in_order_flags_last(cfg_file):
  cfg = load(f"{cfg_file}:a.n=4,a.shape=(2,4),a.axes=fsdp,tensor,a.x=0.25", [("a.n", "5")])
  assert cfg.a.n == 5  # the --config.a.n flag comes after the ':' pair
  assert cfg.a.shape == (2, 4)  # the comma inside the parentheses belongs to the value
  assert cfg.a.axes == ("fsdp", "tensor")  # 'tensor' is not key=value: it continues the value before it
  assert cfg.a.x == 0.25


def test_parse_argv_splits_config_overrides_from_other_flags():
  cfg, flags = parse_argv([f"--config={TINY}:train.steps=11", "--workdir=/w", "--config.train.seed=3",
                           "--config.mesh.shape=(2,4)", "--config.mesh.axes=data,tensor"])
  assert (cfg.train.steps, cfg.train.seed) == (11, 3)
  assert (cfg.mesh.shape, cfg.mesh.axes) == ((2, 4), ("data", "tensor"))
  assert flags == {"workdir": "/w"}


@pytest.mark.parametrize("key,text,named", [
    ("a.nn", "3", "a.nn"),
    ("b.n", "3", "b.n"),
    ("a.n.deeper", "3", "a.n.deeper"),
    ("a", "3", "'a'"),  # a section is not a value
])
def test_unknown_key_is_an_error_naming_it(cfg_file, key, text, named):
  with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
    load(cfg_file, [(key, text)])


@pytest.mark.parametrize("key,text", [
    ("a.n", "2.5"),  # float for int
    ("a.n", "True"),  # bool is not a number
    ("a.n", "many"),
    ("a.x", "'high'"),
    ("a.flag", "maybe"),
    ("a.shape", "(a,b)"),  # strings in a tuple of ints
    ("a.shape", "(2.5,)"),
    ("a.axes", "(1,2)"),  # ints in a tuple of names
])
def test_value_of_the_wrong_type_is_an_error_naming_the_key(cfg_file, key, text):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    load(cfg_file, [(key, text)])


def test_colon_piece_without_equals_first_is_an_error(cfg_file):
  with pytest.raises(ConfigError, match="key=value"):
    load(f"{cfg_file}:oops")


def test_missing_config_file_is_an_error_naming_the_path(tmp_path):
  missing = str(tmp_path / "nope.py")
  with pytest.raises(ConfigError, match="nope.py"):
    load(missing)


def test_unknown_flag_is_an_error():
  with pytest.raises(ConfigError, match="--wrokdir"):
    parse_argv([f"--config={TINY}", "--wrokdir=/w"])


def test_plain_names_after_colon_go_to_get_config_and_dotted_keys_override(tmp_path):
  path = tmp_path / "variant.py"
  path.write_text(textwrap.dedent("""
      import ml_collections
      def get_config(arg=None):
        c = ml_collections.ConfigDict(dict(train=dict(steps=1), arg=""))
        c.arg = arg or ""
        return c
  """))
  cfg = load(f"{path}:size=big,train.steps=7,mode=x")
  assert cfg.arg == "size=big,mode=x"
  assert cfg.train.steps == 7


def test_config_file_without_arguments_rejects_plain_names(tmp_path):
  path = tmp_path / "plain.py"
  path.write_text("import ml_collections\ndef get_config():\n  return ml_collections.ConfigDict(dict(a=1))\n")
  with pytest.raises(ConfigError, match="takes no arguments"):
    load(f"{path}:size=big")
