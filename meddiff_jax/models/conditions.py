"""The condition names and the position-box convention: one definition for data, models, train and tasks.

A training sample (data/multilevel.py) and a sampling window (tasks/sliding_window.py) both say where they
sit in the whole volume with a `pos_box` (3, 2): per axis, the coordinate of their first and last voxel in
the whole volume's frame, where voxel i of an axis of size S sits at 2 i / (S - 1) - 1 (0 on a size-1
axis). A box reaching past the volume (a volume smaller than the window, padded) extends linearly beyond
[-1, 1]. The model turns a box into per-voxel coordinates on device (`embeddings.coordinate_grid`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Keys of a training batch / a model's `cond` dict.
IMAGE = "image"  # (N, P, P, P, 1) float32 in [-1, 1]: the clean sample (batches only, not a condition)
POS_BOX = "pos_box"  # (N, 3, 2) float32: position_box below
REGION = "region"  # (N,) int32: preprocess.REGIONS index; num_regions = the "unknown" (guidance null) class
STRUCTURES = "structures"  # (N, P, P, P, K) uint8: structure channels (or one label-id channel)
HINT = "hint"  # (N, P, P, P, 1) float32: a ControlNet's condition volume (thick slices, lesion mask)
COND_KEYS = (POS_BOX, REGION, STRUCTURES, HINT)  # what a batch passes to the model


def axis_coordinate(index, size):
  """Whole-volume coordinate of voxel `index` on an axis of `size` voxels (numpy, broadcasts)."""
  index, size = np.asarray(index, np.float64), np.asarray(size, np.float64)
  return np.where(size > 1, 2.0 * index / np.maximum(size - 1.0, 1.0) - 1.0, 0.0)


def position_boxes(starts, window: int | Sequence[int], volume_shape: Sequence[int]) -> np.ndarray:
  """(..., 3, 2) float32 boxes of windows of `window` voxels per axis starting at `starts` (..., 3) voxels
  (negative: before the volume) in a volume of `volume_shape`."""
  starts = np.asarray(starts, np.float64)
  window = np.broadcast_to(np.asarray(window, np.float64), starts.shape)
  shape = np.asarray(volume_shape, np.float64)
  lo, hi = axis_coordinate(starts, shape), axis_coordinate(starts + window - 1.0, shape)
  return np.stack([lo, hi], axis=-1).astype(np.float32)


def whole_box(batch: int = 1) -> np.ndarray:
  """(batch, 3, 2) boxes of a sample that is the whole volume: [-1, 1] on every axis (model init inputs)."""
  return np.tile(position_boxes(np.zeros(3), 2, (2, 2, 2)), (batch, 1, 1))


# Grouped structures shipped packed (data.pack_structures): one uint8 per voxel, (group id << 1) | body, group id
# 0 (none) .. K from the label -> group LUT; the accelerator expands it to today's K + 1 one-hot channels.
# A host builds and ships 1/(K+1) of the bytes (2 MiB instead of 27 MiB for a 128^3 sample with K = 12).
MAX_PACKED_GROUPS = 127  # group ids use the 7 high bits


def pack_structures(group: np.ndarray, body: np.ndarray) -> np.ndarray:
  """(..., 1) uint8 from per-voxel group ids (0..K, uint8) and the body mask: (group << 1) | body."""
  return ((np.asarray(group, np.uint8) << 1) | np.asarray(body, np.uint8))[..., None]


def expand_structures(packed, num_channels: int):
  """(..., 1) packed -> (..., num_channels) uint8 one-hot groups + body, exactly preprocess.structure_channels.

  One broadcast compare (numpy or jax arrays alike): channel g < K is (packed & ~1) == 2 (g + 1), the last
  channel (body) is (packed & 1) == 1. With K = 0 the packed channel is the body mask itself.
  """
  k = num_channels - 1
  if not 0 <= k <= MAX_PACKED_GROUPS:
    raise ValueError(f"packed structures hold 0..{MAX_PACKED_GROUPS} groups + body, asked for {num_channels} channels")
  masks = np.array([0xFE] * k + [0x01], np.uint8)
  values = np.array([2 * (g + 1) for g in range(k)] + [1], np.uint8)
  return ((packed & masks) == values).astype(np.uint8)


def unpack_if_packed(structures, structure_channels: int, structure_embed_dim: int):
  """A packed batch (one channel where a model takes structure_channels > 1 one-hot channels) expanded to
  them; anything else (already expanded, or one label-id channel for an embedding) unchanged."""
  if structures.shape[-1] == 1 and structure_channels > 1 and not structure_embed_dim:
    return expand_structures(structures, structure_channels)
  return structures


# One label-id channel (data.structures='classes'): class ids 1..C, C + 1 for body without a class, 0 outside the
# body, in the 7 low bits; the high bit carries the HU body mask (HU > BODY_THRESHOLD_HU) of every voxel, also under
# a class (lungs and airways lie mostly outside it). The model reads the low bits (`label_ids`); structure dropout
# reads the bit to build exactly the "organs unknown" map a task builds from the HU alone.
LABEL_BODY_BIT = 0x80
MAX_LABEL_IDS = LABEL_BODY_BIT  # ids 0..127: at most 126 classes


def label_ids(structures):
  """The label ids of a label-id channel, without the body bit (numpy or jax)."""
  return structures & (LABEL_BODY_BIT - 1)


def drop_structures(structures, drop, drop_body=None, *, label_body_id: int = 0):
  """Structure-only dropout: where `drop` (N,) is True the organs become unknown, the body stays; where
  `drop_body` is also True the body goes too (no anatomy at all). The region is not touched here.

  Grouped channels (K group channels, then the body channel): the group channels are zeroed (and the body
  channel). One label-id channel (`label_body_id` > 0: the id of 'body without a class'): every voxel becomes
  `label_body_id` where its body bit is set, else 0 (and 0 everywhere). Either way the result is exactly what a
  task builds without a label map (`preprocess.structure_channels` / `structure_labels` with labels None).
  """
  expand = lambda m: jnp.reshape(m, m.shape + (1,) * (structures.ndim - 1))
  if label_body_id:
    if structures.shape[-1] != 1:
      raise ValueError(f"label-id structures have one channel, got {structures.shape[-1]}")
    body = (structures & LABEL_BODY_BIT) > 0
    unknown = jnp.where(body, label_body_id | LABEL_BODY_BIT, 0).astype(structures.dtype)
    out = jnp.where(expand(drop), unknown, structures)
    if drop_body is not None:
      out = jnp.where(expand(drop & drop_body), jnp.zeros_like(out), out)
    return out
  organs = jnp.where(expand(drop), jnp.zeros_like(structures[..., :-1]), structures[..., :-1])
  body = structures[..., -1:]
  if drop_body is not None:
    body = jnp.where(expand(drop & drop_body), jnp.zeros_like(body), body)
  return jnp.concatenate([organs, body], axis=-1)


def label_body_id(structure_embed_dim: int, num_structure_ids: int) -> int:
  """`drop_structures`' label_body_id for a model: the last id (C + 1) when it embeds label ids, else 0."""
  return num_structure_ids - 1 if structure_embed_dim else 0


def drop_organ_structures(
  cond: dict[str, jax.Array], drop: jax.Array, drop_body: jax.Array | None = None, *, label_body_id: int = 0
) -> dict[str, jax.Array]:
  """`drop_structures` on a condition dict (unchanged when it has no structures); training applies it with
  diffusion.structure_drop_prob / body_drop_prob, which teaches the conditions tasks use without a label map: body
  from the HU with the organs unknown (denoise, anomaly, SR, lesion), or no anatomy at all with a real region
  (synthesis without labels)."""
  if STRUCTURES not in cond:
    return cond
  return {**cond, STRUCTURES: drop_structures(cond[STRUCTURES], drop, drop_body, label_body_id=label_body_id)}
