"""Typed config sections: the helper behind every `XSpec.from_config` (a leaf: imports nothing of ours).

A spec is a frozen dataclass beside the module that consumes its section (`models/unet3d.py` UNetSpec,
`diffusion/spec.py` DiffusionSpec, `data/spec.py` DataSpec, `train/state.py` OptimizerSpec, `train/spec.py`
TrainingSpec / EvalSpec / CheckpointSpec and the whole training configs, `sharding.py` MeshSpec / ShardingSpec,
`pretrained.py` ControlNetSpec, `tasks/` TaskSpec and one per task, `protocols/spec.py` EvaluateSpec). Its
fields have **no defaults**: configs/*.py are the only place a default lives, and `from_config` refuses a
section with unknown or missing keys. `__post_init__` checks choices and ranges and names the key, the bad
value and what to choose, in one line. checks.py builds the typed config of a command once (main.py's entry
point), and the code runs on it: nothing reads the ConfigDict afterwards or checks a value again.

A key whose value says where the value comes from instead of giving it (`spacing='checkpoint'`,
`noise_sigma_hu='estimate'`) is declared in configs/ with `keyword(...)` and checked with `keyword_or`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import ml_collections
import numpy as np

T = TypeVar("T")


class ConfigError(ValueError):
  """A config mistake, said in one line that names the key."""


def frozen(value: Any) -> Any:
  """Lists (configs read back from JSON) and tuples -> tuples, recursively; anything else as is."""
  if isinstance(value, (list, tuple)):
    return tuple(frozen(v) for v in value)
  return value


def from_config(
  cls: type[T],
  section: Mapping[str, Any],
  name: str,
  nested: Mapping[str, Any] | None = None,
  ignore: Iterable[str] = (),
) -> T:
  """`cls(**section)` for the dataclass `cls`: unknown or missing keys are a ConfigError naming the valid
  ones; `nested` maps a key to the spec class (or a function of the sub-section) that builds it; keys in
  `ignore` are not the spec's to check (another spec or check owns them)."""
  values = {k: v for k, v in dict(section).items() if k not in set(ignore)}
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(values) - set(names))
  if unknown:
    raise ConfigError(f"{name} has unknown keys {unknown}; valid keys: {sorted(names)}")
  missing = sorted(set(names) - set(values))
  if missing:
    raise ConfigError(f"{name} lacks keys {missing} (every default is in configs/*.py)")
  nested = nested or {}
  kwargs = {}
  for key, value in values.items():
    build = nested.get(key)
    kwargs[key] = build(value) if build is not None else frozen(value)
  return cls(**kwargs)


def to_dict(spec: Any) -> Any:
  """A spec (nested specs, tuples, dtypes) as the plain JSON-able values of the config it was built from."""
  if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
    return {f.name: to_dict(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
  if isinstance(spec, (list, tuple)):
    return [to_dict(v) for v in spec]
  if isinstance(spec, np.dtype):
    return spec.name
  return spec


def keyword(default: Any) -> ml_collections.FieldReference:
  """A config value that is either a keyword (e.g. 'checkpoint', 'auto') or a value of another type (a tuple, a
  number), `default` being either: ml_collections locks a key to the type of its first value, so such a key is typed
  `object` and `--config.KEY=` parses a literal (`'(1.0,1.0,1.0)'`, `30`) or takes a word as a string."""
  return ml_collections.FieldReference(default, field_type=object)


# ------------------------------------------------------------------------------------------ value checks
# Each raises a ConfigError `KEY=VALUE; what to choose` with KEY the full dotted name (config.SECTION.KEY).


def choice(key: str, value: Any, choices: Iterable[Any]) -> None:
  choices = tuple(choices)
  if value not in choices:
    raise ConfigError(f"{key}={value!r}; choose one of {choices}")


def at_least(key: str, value: Any, low: float) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
    raise ConfigError(f"{key}={value!r}; must be a number >= {low}")


def positive(key: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ConfigError(f"{key}={value!r}; must be a number > 0")


def count(key: str, value: Any, low: int = 1) -> None:
  """An integer >= low (steps, sizes, counts)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ConfigError(f"{key}={value!r}; must be an integer >= {low}")


def fraction(key: str, value: Any, upper_open: bool = False) -> None:
  """A probability / fraction in [0, 1] (or [0, 1) with upper_open)."""
  ok = (
    not isinstance(value, bool)
    and isinstance(value, (int, float))
    and 0.0 <= value
    and (value < 1.0 if upper_open else value <= 1.0)
  )
  if not ok:
    raise ConfigError(f"{key}={value!r}; must be a fraction in [0, 1{')' if upper_open else ']'}")


def flag(key: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise ConfigError(f"{key}={value!r}; must be True or False")


def text(key: str, value: Any) -> None:
  if not isinstance(value, str):
    raise ConfigError(f"{key}={value!r}; must be a string")


def sizes(key: str, value: Any, length: int | None = 3, allow_empty: bool = False, integer: bool = False) -> None:
  """A tuple of `length` positive numbers (a shape or a spacing); `()` too with allow_empty."""
  if allow_empty and value == ():
    return
  kind = int if integer else (int, float)
  ok = (
    isinstance(value, tuple)
    and (length is None or len(value) == length)
    and len(value) > 0
    and all(isinstance(v, kind) and not isinstance(v, bool) and v > 0 for v in value)
  )
  if not ok:
    n = f"{length} " if length else ""
    raise ConfigError(
      f"{key}={value!r}; must be a tuple of {n}positive {'integers' if integer else 'numbers'}"
      + (" or ()" if allow_empty else "")
    )


def keyword_or(key: str, value: Any, keywords: tuple[str, ...], check: Any, *args: Any, **kwargs: Any) -> None:
  """`value` is one of `keywords` or passes `check(key, value, *args, **kwargs)` (one of the checks here)."""
  if isinstance(value, str) and value in keywords:
    return
  try:
    check(key, value, *args, **kwargs)
  except ConfigError as e:
    raise ConfigError(f"{e}, or one of {keywords}") from None


def regexes(key: str, value: Any) -> None:
  """A non-empty tuple of valid regular expressions."""
  if not isinstance(value, tuple) or not value or not all(isinstance(v, str) for v in value):
    raise ConfigError(f"{key}={value!r}; must be a non-empty tuple of regular expressions")
  for pattern in value:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"{key}={value!r}: {pattern!r} is not a regular expression ({e})") from None
