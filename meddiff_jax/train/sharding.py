"""One device mesh from the config, logical-axis rules, and the shardings they imply.

Params carry logical names (models/unet3d.py); the rules map them to mesh axes. A mesh axis is dropped
from a param's spec where the dimension does not divide evenly (a 1-channel output conv cannot be split
8 ways) or where the param is too small for sharding to pay (`min_shard_size`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),  # activations and inputs: split over every data-parallel axis
    ("act_depth", None),
    ("act_height", None),
    ("act_width", None),
    ("act_channels", "tensor"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("vocab", None),
    ("norm", None),
)


def make_mesh(axis_sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh with axes (data, fsdp, tensor); one size may be -1 (= whatever devices remain).

  Axis types are Auto: with jax 0.10's default Explicit axes, linen's logical constraints raise
  (STACK_NOTES section 3).
  """
  devices = list(devices if devices is not None else jax.devices())
  unknown = set(axis_sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} unknown; use {MESH_AXES}")
  sizes = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not split into mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"{len(devices)} available")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
  if not rules:
    return DEFAULT_RULES
  out = []
  for name, axes in rules:
    out.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
  return tuple(out)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
  """Mesh + logical rules for tracing: jitted functions must first be called inside this."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _axis_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return int(np.prod([mesh.shape[a] for a in axes]))


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, min_shard_size: int = 0) -> PartitionSpec:
  """Drop mesh axes that do not divide their dimension; replicate params smaller than min_shard_size."""
  if int(np.prod(shape)) < min_shard_size:
    return PartitionSpec()
  entries = list(spec) + [None] * (len(shape) - len(spec))
  used: set[str] = set()
  fitted = []
  for dim, axes in zip(shape, entries):
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    names = tuple(a for a in names if a not in used)  # a mesh axis may shard only one dim
    if names and dim % _axis_size(mesh, names) == 0:
      fitted.append(names if len(names) > 1 else names[0])
      used.update(names)
    else:
      fitted.append(None)
  return PartitionSpec(*fitted)


def tree_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]],
                   min_shard_size: int = 0) -> Any:
  """NamedShardings for the *unboxed* version of a tree that holds linen LogicallyPartitioned boxes."""
  logical_specs = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  unboxed = strip_boxes(abstract_boxed)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  return jax.tree_util.tree_map(
      lambda spec, leaf: NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh, min_shard_size)),
      mesh_specs, unboxed, is_leaf=is_spec)


def strip_boxes(tree: Any) -> Any:
  """Replace LogicallyPartitioned boxes by their values, without applying sharding constraints."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree_util.tree_map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def batch_axes(rules: Sequence[tuple[str, Any]]) -> Any:
  """Mesh axes the leading (batch) dimension of inputs is split over."""
  return dict(rules).get("batch")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
