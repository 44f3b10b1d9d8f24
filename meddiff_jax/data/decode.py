"""The accelerator half of a multi-level sample (config.data.decode_on_device): a batch of what the store holds
(data/multilevel.shipped_layout) -> the batch data/multilevel.make_sample's host path makes (image in [-1, 1],
packed / one-hot / label-id structures), inside the jitted train / eval step.

The HU as shipped (`hu`, int16 steps of multilevel.HU_STEP on the sample's grid), or with resize_on_device, per
sample by its operation:
patch -> its int16 crop as float32; zoom2 -> its 2P^3 window resized to P^3 with the host's align-corners positions
and linear weights (`resize_half`, the same operations as multilevel.halve); whole -> the float32 level. Then the
region's HU window (preprocess.hu_to_unit), the body mask (HU > preprocess.BODY_THRESHOLD_HU), each label's
structure group / class (`label_groups`: the host's table, gathered) and the structures: (group << 1) | body packed,
its one-hot expansion, or class ids with body (`preprocess`'s encodings).

What it costs the device: ~10 FLOPs and a few bytes per voxel (benchmarks/RESULTS.md "#24"). Depth splits need no
halo: output depth k reads window rows 2k, 2k + 1.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from meddiff_jax.data import multilevel, preprocess
from meddiff_jax.models import conditions

Batch = dict[str, jax.Array]


def resize_half(window: jax.Array, patch: int) -> jax.Array:
  """(N, 2P, 2P, 2P, C) -> (N, P, P, P, C) float32: multilevel.resize(order=1) of each window, one axis at a time
  (depth, height, width as the host does), as a lerp of the voxel pairs of each axis (a reshape, no gather)."""
  w = jnp.asarray(multilevel.pair_weights(patch), jnp.float32)
  x = window.astype(jnp.float32)
  for axis in (1, 2, 3):
    pairs = x.reshape(x.shape[:axis] + (patch, 2) + x.shape[axis + 1 :])
    even = jax.lax.index_in_dim(pairs, 0, axis + 1, keepdims=False)
    odd = jax.lax.index_in_dim(pairs, 1, axis + 1, keepdims=False)
    # even + w (odd - even): equal neighbours give themselves exactly (a uniform -500 HU region stays out of the
    # body, as on the host); otherwise the host's float64 lerp within float32 rounding
    x = even + w.reshape([patch if a == axis else 1 for a in range(x.ndim)]) * (odd - even)
  return x


def window_bounds_table() -> tuple[np.ndarray, np.ndarray]:
  """(lo, hi) HU per region id, the unknown region included (preprocess.window_bounds), float32."""
  bounds = [preprocess.window_bounds(r) for r in range(preprocess.UNKNOWN_REGION + 1)]
  lo = np.array([b[0] for b in bounds], np.float32)
  return lo, np.array([b[1] - b[0] for b in bounds], np.float32)


def hu_to_unit(hu: jax.Array, region: jax.Array) -> jax.Array:
  """preprocess.hu_to_unit per sample of a batch (N, ...) by its region id: the same float32 operations."""
  lo, width = (jnp.asarray(t)[region].reshape((-1,) + (1,) * (hu.ndim - 1)) for t in window_bounds_table())
  return jnp.clip((hu - lo) / width * 2.0 - 1.0, -1.0, 1.0)


def decode(batch: Batch, spec: multilevel.SampleSpec) -> Batch:
  """A shipped batch (multilevel.shipped_layout, batched) -> the host path's batch for `spec` (no `operation`)."""
  hu = batch.get(multilevel.HU)
  if hu is not None:  # int16 steps of HU_STEP: exact in float32
    hu = hu.astype(jnp.float32) * multilevel.HU_STEP
  for name in multilevel.OPERATIONS:  # resize_on_device: each sample's HU in its operation's key
    key = multilevel.SHIPPED_HU[name]
    if key not in batch:
      continue
    op = batch[multilevel.OPERATION].reshape((-1, 1, 1, 1, 1))
    value = resize_half(batch[key], spec.patch) if name == "zoom2" else batch[key].astype(jnp.float32)
    hu = value if hu is None else jnp.where(op == multilevel.OPERATIONS.index(name), value, hu)
  region = batch[conditions.REGION]
  out = {
    conditions.IMAGE: hu_to_unit(hu, region),
    conditions.POS_BOX: batch[conditions.POS_BOX],
    conditions.REGION: region,
  }
  if conditions.HINT in batch:
    out[conditions.HINT] = batch[conditions.HINT]
  if multilevel.LABELS in batch:
    groups = label_groups(batch[multilevel.LABELS], spec.lut)
    out[conditions.STRUCTURES] = structures(groups, hu > preprocess.BODY_THRESHOLD_HU, spec)
  return out


def label_groups(codes: jax.Array, lut: np.ndarray) -> jax.Array:
  """uint8 label codes (multilevel.label_codes) -> their uint8 structure group / class ids: the host's
  multilevel.label_groups, as a gather from the same table (multilevel.group_table, a 256-byte constant)."""
  return jnp.asarray(multilevel.group_table(lut))[codes.astype(jnp.int32)]


def structures(groups: jax.Array, body: jax.Array, spec: multilevel.SampleSpec) -> jax.Array:
  """The host path's structures from group / class ids (N, P, P, P, 1) and the body mask: class ids with body
  (preprocess.structure_labels), packed (conditions.pack_structures) or one-hot (preprocess.structure_channels)."""
  groups = groups.astype(jnp.uint8)
  if spec.structure_labels:  # (every body voxel carries conditions.LABEL_BODY_BIT, as on the host)
    ids = jnp.where(groups > 0, groups, jnp.where(body, jnp.uint8(spec.num_groups + 1), jnp.uint8(0)))
    return ids | jnp.where(body, jnp.uint8(conditions.LABEL_BODY_BIT), jnp.uint8(0))
  packed = (groups << 1) | body.astype(jnp.uint8)
  if spec.pack_structures:
    return packed
  return conditions.expand_structures(packed, spec.num_groups + 1)


def decoder(spec: multilevel.SampleSpec) -> Callable[[Batch], Batch]:
  """batch -> the model's batch: `decode` when samples ship the store's values, else the batch as it is."""
  if not spec.decode_on_device:
    return lambda batch: batch
  return lambda batch: decode(batch, spec)


def batch_shapes(spec: multilevel.SampleSpec, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a shipped batch of `batch_size` samples (multilevel.shipped_layout)."""
  return {
    k: jax.ShapeDtypeStruct((batch_size, *shape), jnp.dtype(dtype))
    for k, (shape, dtype) in multilevel.shipped_layout(spec).items()
  }
