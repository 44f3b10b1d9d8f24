"""Config files by name or by path: `--config=denoise`, `--config=pretrain:paper+classes`, `--config=my.py:arg`.

The shipped configs are the repository's top-level configs/ folder, which is also the package
`meddiff_jax.configs` (meddiff_jax/configs is a link to it): a checkout, an editable install and the wheel
see the same files, and a config of one's own anywhere imports them as `from meddiff_jax.configs import pretrain`.
A config file is a Python file with `get_config(arg=None)`; the text after the first colon is its argument.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
import traceback
from types import ModuleType

import ml_collections
from absl import flags
from ml_collections.config_flags import config_flags  # the module: its flag class is not exported

from meddiff_jax import configs as shipped_configs

flags.disclaim_key_flags()  # the --config flag belongs to the module that defines it (main.py), as in config_flags


def _modules() -> set[str]:
  return {m.name for m in pkgutil.iter_modules(shipped_configs.__path__) if not m.ispkg}


def _shipped(name: str) -> ModuleType:
  return importlib.import_module(f"{shipped_configs.__name__}.{name}")


def names() -> list[str]:
  """The shipped configs: the modules of meddiff_jax.configs with a get_config (not the shared option helpers)."""
  return sorted(n for n in _modules() if hasattr(_shipped(n), "get_config"))


def _from_file(path: str) -> ModuleType:
  """The config file at `path`, executed as a module of its own (as config_flags does; not on sys.path)."""
  name = "meddiff_config_file"
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:  # e.g. a file whose name importlib cannot load as Python source
    raise ValueError(f"{path}: not a Python config file")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses and pickling in a config file look their module up here
  spec.loader.exec_module(module)
  return module


def _located(error: Exception, path: str) -> str:
  """`error` as one line naming the deepest line of `path` it passed through (a user's config file)."""
  here = os.path.realpath(path)
  lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if os.path.realpath(f.filename) == here]
  if isinstance(error, SyntaxError) and error.lineno:
    lines.append(error.lineno)
  where = f"{path}:{lines[-1]}" if lines else path
  message = str(error).replace("\n", " ")
  return f"{where}: {type(error).__name__}: {message}"


def load(spec: str) -> ml_collections.ConfigDict:
  """The config `spec` names: `NAME[:ARG]` (a shipped config) or `PATH[:ARG]` (a config file), unlocked.

  A shipped name wins over a file of that name in the working directory. A name that is neither, or a
  config file that fails to import or to build, is a ValueError of one line (the file and its line).
  """
  target, colon, arg = spec.partition(":")
  args = (arg,) if colon else ()  # as config_flags: `get_config()` without a colon, `get_config(ARG)` with one
  if target in _modules():
    module = _shipped(target)
    if not hasattr(module, "get_config"):
      raise ValueError(f"{target!r} is a helper of the shipped configs; choose one of {', '.join(names())}")
    return module.get_config(*args)  # a ValueError here is the config's own message (e.g. an unknown preset)
  path = os.path.expanduser(target)
  if not os.path.isfile(path):
    raise ValueError(f"{target!r} is neither a shipped config ({', '.join(names())}) nor a file")
  try:
    return _from_file(path).get_config(*args)
  except Exception as e:
    raise ValueError(_located(e, path)) from e


class _Parser(flags.ArgumentParser):
  """The --config flag's value: `load(spec)`, locked like config_flags' own (an unknown key is an error)."""

  def __init__(self, lock_config: bool):
    self._lock_config = lock_config

  def parse(self, argument: str) -> ml_collections.ConfigDict:
    config = load(argument)
    if self._lock_config:
      config.lock()
    return config

  def flag_type(self) -> str:
    return "config object"


def define_config_flag(
  name: str,
  help_string: str,
  lock_config: bool = True,
  flag_values: flags.FlagValues = flags.FLAGS,
  sys_argv: list[str] | None = None,
) -> flags.FlagHolder:
  """config_flags.DEFINE_config_file with `load` as the parser: names as well as paths, and the same
  `--NAME.key=value` overrides. config_flags has no public hook for the parser, so its flag class is used
  directly (ml_collections is pinned below 2 in pyproject)."""
  flag = config_flags._ConfigFlag(
    parser=_Parser(lock_config),
    serializer=flags.ArgumentSerializer(),
    name=name,
    default=None,
    help_string=help_string,
    flag_values=flag_values,
    sys_argv=sys_argv,
  )
  return flags.DEFINE_flag(flag, flag_values)
