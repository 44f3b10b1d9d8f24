"""Whole-volume denoising by overlapping windows, blended into one noise estimate per reverse step.

At every reverse step each window (with its own whole-volume position box and conditions) predicts the
model output; the predictions are blended with a Gaussian weight (nnU-Net style) before the sampler
step, so the *state* stays one global volume and the noise is consistent across windows (MedDiff-FM's
"smoothed noise estimates"; MultiDiffusion). Windows run in fixed-size batches inside a `fori_loop`, so
activation memory is bounded by the window batch, not the volume; the batch is split over the mesh's
batch axes, so devices share the windows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def window_starts(size: int, window: int, overlap: float) -> list[int]:
  """Starts of windows covering [0, size) with at least `overlap` fraction shared between neighbours."""
  if size <= window:
    return [0]
  stride = max(1, int(window * (1.0 - overlap)))
  count = int(np.ceil((size - window) / stride)) + 1
  return [int(round(i * (size - window) / (count - 1))) for i in range(count)]


def gaussian_weight(window: int, sigma_scale: float = 0.125) -> np.ndarray:
  """(w, w, w) weights peaking at the centre; floored so that borders still count a little."""
  ax = np.arange(window) - (window - 1) / 2.0
  g = np.exp(-0.5 * (ax / (sigma_scale * window)) ** 2)
  w = g[:, None, None] * g[None, :, None] * g[None, None, :]
  w = w / w.max()
  return np.maximum(w, 1e-3).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class WindowPlan:
  """Static description of the windows over one volume shape."""

  volume_shape: tuple[int, int, int]
  window: int
  starts: np.ndarray  # (num_windows_padded, 3) int32
  valid: np.ndarray  # (num_windows_padded,) float32: 0 for padding windows
  batch: int
  # The position frame: the real volume sits at frame_start with frame_shape inside the (padded) volume.
  frame_start: tuple[int, int, int] = (0, 0, 0)
  frame_shape: tuple[int, int, int] | None = None

  @property
  def num_batches(self) -> int:
    return len(self.starts) // self.batch

  def boxes(self) -> np.ndarray:
    """(num_windows_padded, 3, 2) whole-volume position boxes (voxel i of size S -> 2i/(S-1) - 1).

    Coordinates are those of the real volume (`frame_*`), so padding runs beyond [-1, 1] exactly as the
    training crops of a volume smaller than the patch do (data/multilevel.py)."""
    sizes = np.array(self.frame_shape or self.volume_shape, np.float32)
    denom = np.maximum(sizes - 1, 1.0)
    rel = self.starts - np.array(self.frame_start, np.float32)
    lo = np.where(sizes > 1, 2.0 * rel / denom - 1.0, 0.0)
    hi = np.where(sizes > 1, 2.0 * (rel + self.window - 1) / denom - 1.0, 0.0)
    return np.stack([lo, hi], axis=-1).astype(np.float32)


def plan_windows(volume_shape: tuple[int, int, int], window: int, overlap: float = 0.5, batch: int = 4,
                 frame: tuple[slice, ...] | None = None) -> WindowPlan:
  if any(s < window for s in volume_shape):
    raise ValueError(f"volume {volume_shape} is smaller than the window {window}; pad it first (pad_to_window)")
  grid = np.stack(np.meshgrid(*[window_starts(s, window, overlap) for s in volume_shape], indexing="ij"), -1)
  starts = grid.reshape(-1, 3).astype(np.int32)
  n = len(starts)
  padded = int(np.ceil(n / batch)) * batch
  valid = np.r_[np.ones(n), np.zeros(padded - n)].astype(np.float32)
  starts = np.concatenate([starts, np.repeat(starts[:1], padded - n, axis=0)])
  if frame is None:
    return WindowPlan(tuple(volume_shape), window, starts, valid, batch)
  return WindowPlan(tuple(volume_shape), window, starts, valid, batch, tuple(int(f.start) for f in frame[:3]),
                    tuple(int(f.stop - f.start) for f in frame[:3]))


def pad_to_window(volume: np.ndarray, window: int, fill: float) -> tuple[np.ndarray, tuple[slice, ...]]:
  """Pad each spatial side shorter than the window up to it, centred (as training's crops of a small
  volume are); returns the crop back, which is also the position frame (`plan_windows(frame=...)`)."""
  pads = [((window - s) // 2, window - s - (window - s) // 2) if s < window else (0, 0) for s in volume.shape[:3]]
  crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, volume.shape[:3]))
  pads += [(0, 0)] * (volume.ndim - 3)
  return np.pad(volume, pads, constant_values=fill), crop


def _take(volume: jax.Array, starts: jax.Array, window: int) -> jax.Array:
  """(B, w, w, w, C) windows of a (X, Y, Z, C) volume."""
  c = volume.shape[-1]
  return jax.vmap(lambda s: jax.lax.dynamic_slice(volume, (s[0], s[1], s[2], 0), (window, window, window, c)))(starts)


def blended_denoise_fn(apply_fn: Callable[[jax.Array, jax.Array, dict], jax.Array], plan: WindowPlan,
                       cond_volume: dict[str, jax.Array], batch_axes: Any = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """(x (1, X, Y, Z, 1), t (1,)) -> blended model output over the whole volume.

  cond_volume: 'region' (1,) plus any per-voxel conditions (X, Y, Z, C) ('structures', ControlNet's 'hint'):
  windows are cut from those.
  apply_fn(x_windows, t_windows, cond_windows) is the (possibly CFG-guided) model.
  """
  weight = jnp.asarray(gaussian_weight(plan.window))[..., None]
  starts = jnp.asarray(plan.starts)
  valid = jnp.asarray(plan.valid)
  boxes = jnp.asarray(plan.boxes())
  b, w = plan.batch, plan.window
  volumes = {k: v for k, v in cond_volume.items() if k != "region"}

  def constrain(a):
    if batch_axes is None:
      return a
    return jax.lax.with_sharding_constraint(a, jax.sharding.PartitionSpec(batch_axes))

  def fn(x: jax.Array, t: jax.Array) -> jax.Array:
    vol = x[0]
    acc = jnp.zeros(vol.shape, jnp.float32)
    norm = jnp.zeros(vol.shape[:3] + (1,), jnp.float32)

    def body(i, carry):
      acc, norm = carry
      s = jax.lax.dynamic_slice_in_dim(starts, i * b, b)
      keep = jax.lax.dynamic_slice_in_dim(valid, i * b, b)
      cond = {"pos_box": constrain(jax.lax.dynamic_slice_in_dim(boxes, i * b, b)),
              "region": jnp.broadcast_to(cond_volume["region"], (b,))}
      for key, volume in volumes.items():
        cond[key] = constrain(_take(volume, s, w))
      out = apply_fn(constrain(_take(vol, s, w)), jnp.broadcast_to(t, (b,)), cond)
      out = out.astype(jnp.float32) * weight[None] * keep[:, None, None, None, None]

      def add(j, carry):
        acc, norm = carry
        pos = (s[j, 0], s[j, 1], s[j, 2], 0)
        acc = jax.lax.dynamic_update_slice(acc, jax.lax.dynamic_slice(acc, pos, out.shape[1:]) + out[j], pos)
        wj = weight * keep[j]
        norm = jax.lax.dynamic_update_slice(norm, jax.lax.dynamic_slice(norm, pos, wj.shape) + wj, pos)
        return acc, norm

      return jax.lax.fori_loop(0, b, add, (acc, norm))

    acc, norm = jax.lax.fori_loop(0, plan.num_batches, body, (acc, norm))
    return (acc / jnp.maximum(norm, 1e-8))[None]

  return fn
