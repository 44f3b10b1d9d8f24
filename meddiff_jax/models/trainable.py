"""Which parameters train: labels from path patterns, and the split / merge of a param tree by them.

A path is the '/'-joined keys of a leaf ('controlnet/encoder/conv_in/kernel'); a pattern is a regular
expression that must match a whole path (big_vision style). The labels feed `optax.partition`; frozen
leaves get no gradient, no optimizer state and no EMA.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from flax import traverse_util

TRAINABLE, FROZEN = "trainable", "frozen"


def labels(params: Any, patterns: Sequence[str]) -> dict:
  """{path: 'trainable' | 'frozen'} nested like `params` (linen boxes count as leaves).

  Raises ValueError for a pattern that matches nothing (a typo would otherwise silently freeze).
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  compiled = [re.compile(p) for p in patterns]
  unused = [p.pattern for p in compiled if not any(p.fullmatch(path) for path in flat)]
  if unused:
    raise ValueError(
      f"config.optimizer.trainable patterns {unused} match no parameter (paths look like {next(iter(flat))!r})"
    )
  out = {path: TRAINABLE if any(p.fullmatch(path) for p in compiled) else FROZEN for path in flat}
  return traverse_util.unflatten_dict(out, sep="/")


def split(tree: Any, label_tree: dict) -> tuple[dict, dict]:
  """(trainable leaves, frozen leaves) of any tree shaped like the params, as two pruned nested dicts."""
  flat, flat_labels = traverse_util.flatten_dict(tree), traverse_util.flatten_dict(label_tree)
  parts = {TRAINABLE: {}, FROZEN: {}}
  for path, leaf in flat.items():
    parts[flat_labels[path]][path] = leaf
  return tuple(traverse_util.unflatten_dict(parts[k]) for k in (TRAINABLE, FROZEN))


def merge(*trees: dict) -> dict:
  """Inverse of `split`: the union of disjoint pruned trees."""
  flat = {}
  for tree in trees:
    flat.update(traverse_util.flatten_dict(tree))
  return traverse_util.unflatten_dict(flat)


def has_frozen(label_tree: dict) -> bool:
  return FROZEN in traverse_util.flatten_dict(label_tree).values()
