"""Condition encodings for the 3D UNet: timestep, voxel position, region class.

Positions travel through the data pipeline as a per-sample *box* (the whole-volume-frame coordinate of
the first and last voxel along each axis) instead of three dense coordinate channels: every multi-level
sample is an axis-aligned crop or resize, so the box determines every voxel's coordinate exactly, and it
costs 6 floats per sample instead of 3 x P^3 floats of host-to-device traffic.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, as in ADM / guided-diffusion.

  Args:
    timesteps: (N,) integer or float timesteps.
    dim: embedding width (even or odd; an odd width gets a zero last column).
    max_period: lowest frequency is 1 / max_period.

  Returns:
    (N, dim) float32 embedding, [cos | sin] halves.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def coordinate_grid(box: jax.Array, spatial_shape: tuple[int, int, int]) -> jax.Array:
  """Whole-volume-frame coordinates of every voxel of an axis-aligned sample.

  Args:
    box: (N, 3, 2) per axis the coordinate (in [-1, 1] of the whole volume) of the first and the last
      voxel of the sample. Values outside [-1, 1] are legal (padding beyond the volume).
    spatial_shape: (D, H, W) of the sample.

  Returns:
    (N, D, H, W, 3) float32 coordinates, linear between the box ends along each axis.
  """
  box = box.astype(jnp.float32)
  axes = []
  for axis, size in enumerate(spatial_shape):
    frac = jnp.linspace(0.0, 1.0, size, dtype=jnp.float32) if size > 1 else jnp.full((1,), 0.5)
    lo, hi = box[:, axis, 0:1], box[:, axis, 1:2]
    axes.append(lo + (hi - lo) * frac[None, :])  # (N, size)
  n = box.shape[0]
  d, h, w = spatial_shape
  zz = jnp.broadcast_to(axes[0][:, :, None, None], (n, d, h, w))
  yy = jnp.broadcast_to(axes[1][:, None, :, None], (n, d, h, w))
  xx = jnp.broadcast_to(axes[2][:, None, None, :], (n, d, h, w))
  return jnp.stack([zz, yy, xx], axis=-1)


def fourier_features(coords: jax.Array, num_freqs: int, include_input: bool = True) -> jax.Array:
  """NeRF / Patch-Diffusion style sin-cos encoding of coordinates at frequencies 2^0 .. 2^(F-1).

  Matches Patch Diffusion's `Pos_Embedding` (no pi factor), optionally keeping the raw coordinates.
  Output width: 3 * (2F + include_input).
  """
  if num_freqs == 0:
    return coords
  freqs = 2.0 ** jnp.arange(num_freqs, dtype=jnp.float32)
  scaled = coords[..., :, None] * freqs  # (..., 3, F)
  scaled = scaled.reshape(*coords.shape[:-1], -1)
  parts = [coords] if include_input else []
  parts += [jnp.sin(scaled), jnp.cos(scaled)]
  return jnp.concatenate(parts, axis=-1)


def position_channels(num_freqs: int, include_input: bool = True) -> int:
  """Number of input channels `fourier_features` produces."""
  return 3 * (2 * num_freqs + (1 if include_input or num_freqs == 0 else 0))


class IdEmbedding(nn.Module):
  """A learned vector per integer id: (...) ids -> (..., features); ids outside [0, num_ids) are clipped.

  Two uses in the UNet:
  - the coarse region class, added to the timestep embedding: ids 0..num_regions-1 are real regions
    (head-and-neck, chest, abdomen), id `num_regions` the "unknown" class of unconditional samples and
    classifier-free-guidance dropout (num_ids = num_regions + 1, stddev 0.02);
  - the anatomical label id per voxel, (N, D, H, W) -> (N, D, H, W, features) (stddev 1: one-hot scale). The
    paper conditions on 117 TotalSegmentator classes + a body mask. As one-hot input channels that is
    118 x 128^3 x 4 B = 0.99 GB per 128^3 sample in float32 (0.49 GB bf16) before the first conv; as a label
    map it is 2 MiB (uint8) on the wire and features x 128^3 after this lookup (8 x bf16: 34 MB). Id 0 is
    background (and the classifier-free-guidance null).
  """

  num_ids: int
  features: int
  stddev: float
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    table = self.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(stddev=self.stddev), ("vocab", "embed")),
      (self.num_ids, self.features),
      self.param_dtype,
    )
    return jnp.take(table, jnp.clip(ids.astype(jnp.int32), 0, self.num_ids - 1), axis=0)
