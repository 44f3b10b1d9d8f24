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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from meddiff_jax.models import conditions


def window_starts(size: int, window: int, overlap: float) -> list[int]:
  """Starts of windows covering [0, size) with at least `overlap` fraction shared between neighbours."""
  if size <= window:
    return [0]
  stride = max(1, int(window * (1.0 - overlap)))
  count = int(np.ceil((size - window) / stride)) + 1
  return [int(round(i * (size - window) / (count - 1))) for i in range(count)]


def axis_weight(window: int, sigma_scale: float = 0.125, floor: float = 1e-3) -> np.ndarray:
  """(w,) Gaussian peaking at the window centre, floored so that borders still count a little."""
  ax = np.arange(window) - (window - 1) / 2.0
  return np.maximum(np.exp(-0.5 * (ax / (sigma_scale * window)) ** 2), floor)


def gaussian_weight(window: int, sigma_scale: float = 0.125) -> np.ndarray:
  """(w, w, w) separable weights (nnU-Net style); separable so the blend normaliser factorises per axis."""
  g = axis_weight(window, sigma_scale)
  return (g[:, None, None] * g[None, :, None] * g[None, None, :]).astype(np.float32)


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
  axis_starts: tuple[tuple[int, ...], ...] = ()  # the grid's starts per axis (starts is their product)

  @property
  def num_batches(self) -> int:
    return len(self.starts) // self.batch

  def boxes(self) -> np.ndarray:
    """(num_windows_padded, 3, 2) whole-volume position boxes (models/conditions.py, as training's).

    Coordinates are those of the real volume (`frame_*`), so padding runs beyond [-1, 1] exactly as the
    training crops of a volume smaller than the patch do (data/multilevel.py)."""
    rel = self.starts - np.asarray(self.frame_start)
    return conditions.position_boxes(rel, self.window, self.frame_shape or self.volume_shape)

  def axis_norms(self) -> list[np.ndarray]:
    """Per axis, the sum of the 1D window weights covering each voxel. The 3D normaliser (sum of all
    windows' weights) is their outer product because the weights are separable and the windows a grid."""
    g = axis_weight(self.window)
    norms = []
    for size, starts in zip(self.volume_shape, self.axis_starts):
      n = np.zeros(size, np.float64)
      for s in starts:
        n[s : s + self.window] += g
      norms.append(n.astype(np.float32))
    return norms


def plan_windows(
  volume_shape: tuple[int, int, int],
  window: int,
  overlap: float = 0.5,
  batch: int = 4,
  frame: tuple[slice, ...] | None = None,
) -> WindowPlan:
  if any(s < window for s in volume_shape):
    raise ValueError(f"volume {volume_shape} is smaller than the window {window}; pad it first (pad_to_window)")
  axis_starts = tuple(tuple(window_starts(s, window, overlap)) for s in volume_shape)
  grid = np.stack(np.meshgrid(*axis_starts, indexing="ij"), -1)
  starts = grid.reshape(-1, 3).astype(np.int32)
  n = len(starts)
  padded = int(np.ceil(n / batch)) * batch
  valid = np.r_[np.ones(n), np.zeros(padded - n)].astype(np.float32)
  starts = np.concatenate([starts, np.repeat(starts[:1], padded - n, axis=0)])
  if frame is None:
    return WindowPlan(tuple(volume_shape), window, starts, valid, batch, axis_starts=axis_starts)
  return WindowPlan(
    tuple(volume_shape),
    window,
    starts,
    valid,
    batch,
    tuple(int(f.start) for f in frame[:3]),
    tuple(int(f.stop - f.start) for f in frame[:3]),
    axis_starts,
  )


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


def _scatter_add(acc: jax.Array, starts: jax.Array, values: jax.Array) -> jax.Array:
  """acc[s0:s0+w, s1:s1+w, s2:s2+w] += values[j] for every window j, as one scatter-add (overlaps add up)."""
  w = values.shape[1]
  r = jnp.arange(w)
  ix = (starts[:, 0, None] + r)[:, :, None, None]
  iy = (starts[:, 1, None] + r)[:, None, :, None]
  iz = (starts[:, 2, None] + r)[:, None, None, :]
  return acc.at[ix, iy, iz].add(values, mode="promise_in_bounds")


def _loop_add(acc: jax.Array, starts: jax.Array, values: jax.Array) -> jax.Array:
  """The same as `_scatter_add` as a loop of in-place dynamic_update_slices: faster on XLA:CPU, whose
  scatter runs element by element (benchmarks/RESULTS.md #15)."""

  def add(j, acc):
    pos = (starts[j, 0], starts[j, 1], starts[j, 2], 0)
    return jax.lax.dynamic_update_slice(acc, jax.lax.dynamic_slice(acc, pos, values.shape[1:]) + values[j], pos)

  return jax.lax.fori_loop(0, values.shape[0], add, acc)


# Condition windows cut once when they total at most this; else cut per window batch every step, a gather of a few
# MB beside the network's work on them. Cut once they are held for the whole run and cost ~4x their size to make
# on XLA:CPU (a 1024^3 scan at 3 mm: 0.49 GB of windows, +2 GB of peak memory; benchmarks/RESULTS.md #25).
PRECUT_BUDGET_BYTES = 1 << 26


def blended_denoise_fn(
  apply_fn: Callable[[jax.Array, jax.Array, dict], jax.Array],
  plan: WindowPlan,
  cond_volume: dict[str, jax.Array],
  batch_axes: Any = None,
  precompute_budget_bytes: int = PRECUT_BUDGET_BYTES,
  accumulate: str = "auto",
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """(x (1, X, Y, Z, 1), t (1,)) -> blended model output over the whole volume.

  cond_volume: 'region' (1,) plus any per-voxel conditions (X, Y, Z, C) ('structures', ControlNet's 'hint'):
  windows are cut from those once, here, when all of them fit in `precompute_budget_bytes` (they do not change
  between reverse steps), else every step.
  apply_fn(x_windows, t_windows, cond_windows) is the (possibly CFG-guided) model.

  Per step the only work besides the network is one gather of the x windows and one accumulation of the
  weighted outputs per window batch; the normaliser is static and separable (outer product of three 1D sums).
  accumulate: "scatter" (one scatter-add per batch), "loop" (in-place slice updates) or "auto" (loop on CPU,
  scatter elsewhere).
  """
  if accumulate == "auto":
    accumulate = "loop" if jax.default_backend() == "cpu" else "scatter"
  if accumulate not in ("loop", "scatter"):
    raise ValueError(f"accumulate={accumulate!r}; choose auto, loop or scatter")
  add = _scatter_add if accumulate == "scatter" else _loop_add
  weight = jnp.asarray(gaussian_weight(plan.window))[..., None]
  starts = jnp.asarray(plan.starts)
  valid = jnp.asarray(plan.valid)
  boxes = jnp.asarray(plan.boxes())
  nx, ny, nz = (jnp.asarray(n) for n in plan.axis_norms())
  b, w = plan.batch, plan.window
  volumes = {k: v for k, v in cond_volume.items() if k != conditions.REGION}
  window_bytes = sum(len(plan.starts) * w**3 * v.shape[-1] * v.dtype.itemsize for v in volumes.values())
  precut = {k: _take(v, starts, w) for k, v in volumes.items()} if window_bytes <= precompute_budget_bytes else None

  def constrain(a):
    if batch_axes is None:
      return a
    return jax.lax.with_sharding_constraint(a, jax.sharding.PartitionSpec(batch_axes))

  def fn(x: jax.Array, t: jax.Array) -> jax.Array:
    vol = x[0]

    def body(i, acc):
      s = jax.lax.dynamic_slice_in_dim(starts, i * b, b)
      keep = jax.lax.dynamic_slice_in_dim(valid, i * b, b)
      cond = {
        conditions.POS_BOX: constrain(jax.lax.dynamic_slice_in_dim(boxes, i * b, b)),
        conditions.REGION: jnp.broadcast_to(cond_volume[conditions.REGION], (b,)),
      }
      for key, volume in volumes.items():
        cut = jax.lax.dynamic_slice_in_dim(precut[key], i * b, b) if precut is not None else _take(volume, s, w)
        cond[key] = constrain(cut)
      out = apply_fn(constrain(_take(vol, s, w)), jnp.broadcast_to(t, (b,)), cond)
      out = out.astype(jnp.float32) * weight[None] * keep[:, None, None, None, None]
      return add(acc, s, out)

    acc = jax.lax.fori_loop(0, plan.num_batches, body, jnp.zeros(vol.shape, jnp.float32))
    norm = nx[:, None, None, None] * ny[None, :, None, None] * nz[None, None, :, None]
    return (acc / norm)[None].astype(x.dtype)

  return fn
