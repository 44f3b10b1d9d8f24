"""One device mesh from the config, logical-axis rules, and the shardings they imply.

Params carry logical names (models/unet3d.py); the rules map them to mesh axes. A mesh axis is dropped
from a param's spec where the dimension does not divide evenly (a 1-channel output conv cannot be split
8 ways) or where the param is too small for sharding to pay (`min_shard_size`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from meddiff_jax import sections

MESH_AXES = ("data", "fsdp", "spatial", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", ("data", "fsdp")),  # activations and inputs: split over every data-parallel axis
  ("act_depth", "spatial"),  # one sample split along depth over `spatial` devices (XLA adds the halos)
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


AUTO = "auto"  # config.mesh.data / config.training.grad_accum_steps: chosen for the devices (resolve_plan)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """config.mesh: devices per axis, one of them may be -1 (the rest); data may be 'auto' (resolve_plan).
  Whether they fit the devices present is resolve_mesh_sizes' (checks.py runs it with the batch plan)."""

  data: int | str
  fsdp: int
  spatial: int
  tensor: int

  def __post_init__(self):
    sizes = dataclasses.asdict(self)
    for axis, size in sizes.items():
      if axis == "data" and size == AUTO:
        continue
      if isinstance(size, bool) or not isinstance(size, int) or not (size >= 1 or size == -1):
        also = f", or {AUTO!r} (the most devices that each take whole samples)" if axis == "data" else ""
        raise sections.ConfigError(f"config.mesh.{axis}={size!r}; must be a device count >= 1, or -1 (the rest){also}")
    rest = [a for a, n in sizes.items() if n == -1]
    if len(rest) > 1:
      raise sections.ConfigError(f"config.mesh has -1 for {rest}; at most one mesh axis may be -1")

  @classmethod
  def from_config(cls, section: Any) -> MeshSpec:
    return sections.from_config(cls, section, "config.mesh")

  @property
  def sizes(self) -> dict[str, int]:
    """{axis: devices} in MESH_AXES order, -1 for the rest (`resolve_mesh_sizes`, `make_mesh`)."""
    return {axis: getattr(self, axis) for axis in MESH_AXES}


DEFAULT = "default"  # config.sharding.rules: DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class ShardingSpec:
  """config.sharding: logical-axis rules ('default': DEFAULT_RULES) and the replication threshold."""

  rules: tuple[tuple[str, Any], ...] | str
  min_shard_size: int

  def __post_init__(self):
    if self.rules != DEFAULT and not isinstance(self.rules, tuple):
      raise sections.ConfigError(
        f"config.sharding.rules={self.rules!r}; must be {DEFAULT!r} or ((logical name, mesh axes), ...)"
      )
    for rule in () if self.rules == DEFAULT else self.rules:
      axes = rule[1] if isinstance(rule, tuple) and len(rule) == 2 else ()
      axes = axes if isinstance(axes, tuple) else (axes,)
      if not (
        isinstance(rule, tuple)
        and len(rule) == 2
        and isinstance(rule[0], str)
        and all(a is None or a in MESH_AXES for a in axes)
      ):
        raise sections.ConfigError(
          f"config.sharding.rules={self.rules!r}: {rule!r} is not (logical name, mesh axis "
          f"or tuple of mesh axes or None) with mesh axes from {MESH_AXES}"
        )
    sections.count("config.sharding.min_shard_size", self.min_shard_size, 0)

  @classmethod
  def from_config(cls, section: Any) -> ShardingSpec:
    return sections.from_config(cls, section, "config.sharding")

  @property
  def logical_rules(self) -> tuple[tuple[str, Any], ...]:
    """The rules that map logical axis names to mesh axes."""
    return DEFAULT_RULES if self.rules == DEFAULT else self.rules


def make_mesh(axis_sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh with axes (data, fsdp, spatial, tensor); one size may be -1 (= whatever devices remain). The devices
  are placed on the physical topology by `device_grid`.

  Axis types are Auto: with jax 0.10's default Explicit axes, linen's logical constraints raise
  (STACK_NOTES section 3).
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = resolve_mesh_sizes(axis_sizes, len(devices))
  grid = device_grid(tuple(sizes.values()), devices)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def num_slices(devices: Sequence[jax.Device]) -> int:
  """How many TPU slices (joined over the data-centre network, DCN) `devices` span; 1 off TPU."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(shape: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
  """`devices` arranged as a logical mesh of `shape` (MESH_AXES order: data, fsdp, spatial, tensor), any sizes
  whose product is the device count, on the physical topology (like maxtext's create_device_mesh).

  MESH_AXES is ordered by increasing traffic, which is the order `mesh_utils.create_device_mesh` expects: on a
  TPU torus it gives tensor, then spatial (halo exchanges every conv), then fsdp (weight gathers) whole physical
  axes first, the fastest links, and data the rest; a logical axis that is no product of whole physical axes
  (data=8 spatial=8 on a 4x4x4 v5p) splits a physical axis instead of failing (`allow_split_physical_axes`).
  Several TPU slices: the slices go on `data` (else `fsdp`), the only traffic that crosses the slow DCN being a
  gradient all-reduce per step (`create_hybrid_device_mesh`). GPUs: ordered by global id (hosts contiguous, so
  the innermost axes stay inside a node's NVLink); CPU: as listed."""
  shape = tuple(int(n) for n in shape)
  slices = num_slices(devices)
  if slices == 1:
    return mesh_utils.create_device_mesh(shape, list(devices), allow_split_physical_axes=True)
  dcn_axis = next((i for i in (0, 1) if shape[i] % slices == 0), None)  # data, else fsdp
  if dcn_axis is None:
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, shape))} on {slices} TPU slices: config.mesh.data (or fsdp) must be a multiple "
      f"of the slice count {slices} (only data-parallel traffic crosses slices)"
    )
  dcn = [1] * len(shape)
  dcn[dcn_axis] = slices
  ici = [n // d for n, d in zip(shape, dcn)]
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, list(devices), allow_split_physical_axes=True)


def resolve_plan(
  batch_size: int,
  grad_accum_steps: int | str,
  axis_sizes: dict[str, int | str],
  num_devices: int,
  rules: Sequence[tuple[str, Any]],
) -> tuple[int, dict[str, int]]:
  """(grad_accum_steps, mesh sizes) for `num_devices`, with the 'auto' values chosen; the batch shards are the
  mesh axes `rules` map batch to (data x fsdp by default), as check_plan counts them:

  - mesh.data 'auto': gcd(batch_size / the other numbered batch axes, the devices the numbered axes leave): as
    many devices as can take whole samples; the -1 axis (spatial in the paper presets) takes the rest. A sample
    split along depth pays halo exchanges and the partitioner's re-layouts (#27: the folded paper step on
    v5p:2x2x1 moves 1.7x the bytes per sample split 4 ways as whole on each chip), so samples go whole first.
  - grad_accum_steps 'auto': one sample per batch shard and micro-step, the most memory-lean plan (the paper's
    batch 1 x 4 accumulation on one GPU).
  The result is then checked by check_plan (which names the fix when it does not fit)."""
  b_axes = _axes_tuple(batch_axes(rules))
  sizes = dict(axis_sizes)
  if sizes.get("data") == AUTO:
    numbered = {a: int(v) for a, v in sizes.items() if a != "data" and v != -1}
    other_batch = int(np.prod([numbered.get(a, 1) for a in b_axes if a != "data"]))
    left = max(num_devices // int(np.prod(list(numbered.values()))), 1)
    sizes["data"] = math.gcd(batch_size // math.gcd(batch_size, other_batch), left)
  resolved = resolve_mesh_sizes(sizes, num_devices)
  if grad_accum_steps == AUTO:
    grad_accum_steps = max(batch_size // int(np.prod([resolved[a] for a in b_axes])), 1)
  return int(grad_accum_steps), resolved


def resolve_mesh_sizes(axis_sizes: dict[str, int], num_devices: int) -> dict[str, int]:
  """{axis: size} for every mesh axis (those not given: 1) with the -1 resolved (MeshSpec allows one); no
  devices needed (plan checks, dry runs)."""
  sizes = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not split into mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, {num_devices} available")
  return dict(zip(MESH_AXES, sizes))


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


def tree_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]], min_shard_size: int = 0) -> Any:
  """NamedShardings for the *unboxed* version of a tree that holds linen LogicallyPartitioned boxes."""
  logical_specs = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  unboxed = strip_boxes(abstract_boxed)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  return jax.tree_util.tree_map(
    lambda spec, leaf: NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh, min_shard_size)),
    mesh_specs,
    unboxed,
    is_leaf=is_spec,
  )


def strip_boxes(tree: Any) -> Any:
  """Replace LogicallyPartitioned boxes by their values, without applying sharding constraints."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree_util.tree_map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def batch_axes(rules: Sequence[tuple[str, Any]]) -> Any:
  """Mesh axes the leading (batch) dimension of inputs is split over."""
  return dict(rules).get("batch")


def _axes_tuple(axes: Any) -> tuple[str, ...]:
  return () if axes is None else (axes if isinstance(axes, tuple) else (axes,))


def input_spec(rules: Sequence[tuple[str, Any]], ndim: int) -> PartitionSpec:
  """Inputs: batch dim over the batch axes; volumes (N, D, H, W, C) also along depth (act_depth)."""
  r = dict(rules)
  if ndim == 5:
    return PartitionSpec(r.get("batch"), r.get("act_depth"))
  return PartitionSpec(r.get("batch"))


def input_shardings(mesh: Mesh, rules: Sequence[tuple[str, Any]], batch: Any) -> Any:
  """NamedSharding per leaf of a batch (arrays or ShapeDtypeStructs), by `input_spec` of its rank."""
  return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, input_spec(rules, len(x.shape))), batch)


def input_layout(
  mesh: Mesh, rules: Sequence[tuple[str, Any]], batch: dict[str, Any]
) -> dict[str, jax.ShapeDtypeStruct]:
  """A global batch's layout: each key's global shape and dtype (`batch`) with its `input_shardings` sharding."""
  shardings = input_shardings(mesh, rules, batch)
  return {k: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=shardings[k]) for k, x in batch.items()}


def constrain_inputs(batch: Any, rules: Sequence[tuple[str, Any]]) -> Any:
  """Inside jit: keep (micro-)batches laid out like `input_shardings`."""
  return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, input_spec(rules, x.ndim)), batch)


def check_plan(
  batch_size: int,
  grad_accum_steps: int,
  patch_size: int,
  levels: int,
  mesh_sizes: dict[str, int],
  rules: Sequence[tuple[str, Any]],
) -> None:
  """Raise one ValueError line (what to set) when the batch plan does not fit the mesh.

  Called before anything compiles. A micro-batch must split evenly over the mesh axes `batch` maps to
  (data x fsdp by default): XLA would otherwise pad it, and every device would pay a whole sample's
  FLOPs for a fraction of one. Samples split along depth need the coarsest feature map's depth to divide.
  """
  r = dict(rules)
  b_axes, d_axes = _axes_tuple(r.get("batch")), _axes_tuple(r.get("act_depth"))
  clash = set(b_axes) & set(d_axes)
  if clash:
    raise ValueError(
      f"sharding rules map both batch and act_depth to mesh axes {sorted(clash)}; "
      "give act_depth its own axis (default: spatial)"
    )
  n_batch = int(np.prod([mesh_sizes[a] for a in b_axes])) if b_axes else 1
  n_depth = int(np.prod([mesh_sizes[a] for a in d_axes])) if d_axes else 1
  if batch_size % grad_accum_steps:
    raise ValueError(
      f"config.training.batch_size={batch_size} must be divisible by grad_accum_steps={grad_accum_steps}"
    )
  micro = batch_size // grad_accum_steps
  if micro % n_batch:
    hints = []
    if batch_size % n_batch == 0:  # one sample per batch shard and micro-step
      hints.append(f"--config.training.grad_accum_steps={batch_size // n_batch}")
    total = n_batch * n_depth
    if total % micro == 0:  # keep the micro-batch, split each sample along depth instead
      hints.append(f"--config.mesh.data={micro} --config.mesh.fsdp=1 --config.mesh.spatial={total // micro}")
    hints.append(f"--config.training.batch_size={grad_accum_steps * n_batch}")
    raise ValueError(
      f"micro-batch {micro} (config.training.batch_size={batch_size} / grad_accum_steps={grad_accum_steps}) "
      f"does not split over the {n_batch} devices of mesh axes {' x '.join(b_axes) or '()'} "
      f"(mesh {mesh_sizes}); set " + " or ".join(hints)
    )
  coarsest = patch_size // 2 ** (levels - 1)
  if n_depth > 1 and coarsest % n_depth:
    raise ValueError(
      f"mesh axes {' x '.join(d_axes)} split depth {n_depth} ways, but the coarsest feature map "
      f"has depth {coarsest} (patch_size={patch_size}, {levels} levels); set "
      f"--config.mesh.spatial to a divisor of {coarsest} or a larger --config.data.patch_size"
    )


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> NamedSharding:
  """Inputs: the leading (batch) dimension split over the rules' batch axes."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(rules)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
