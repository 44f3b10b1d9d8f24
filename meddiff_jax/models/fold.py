"""Activations with W sub-positions folded into channels: a lane-dense layout for narrow levels on TPU.

A level with fold f stores its (N, D, H, W, C) activation as (N, D, H, W/f, f*C): stored channel i*C + c
holds voxel W = f*w + i of channel c. On TPU the minor (lane) dimension is 128 wide, and a 32-channel
activation stored channels-minor is padded to 128 lanes, so every pass over it moves 4x its bytes and
its convolutions use a quarter of the MXU (benchmarks/RESULTS.md "#27"); folded by 4 it is 128 channels.

Every layer computes the same function on the same params as its unfolded form:
- elementwise ops are per voxel, so any channel order is fine;
- GroupNorm counts each model channel's f stored copies (`Layout.model_channel` -> norm_act's layout);
- a conv over the folded array uses a kernel built from the model's (k, k, k, Cin, Cout) kernel: along W it
  becomes a conv over blocks of f voxels whose taps say which (input block, sub-position) each output
  sub-position reads (`w_taps`). It has f x the unfolded conv's multiply-adds, on a f x wider array.
A decoder's concatenation keeps each part's stored order (`Layout.parts`), so it is a lane-aligned concat;
the kernels and norms that read it are built for that order.

Folds shrink with resolution (f at level 0, f / 2 at level 1, ... down to 1), so a stride-2 conv from fold
2g to fold g, and a x2 upsampling from fold g to 2g, map whole blocks to whole blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a stored (N, D, H, W/fold, fold * sum(parts)) array holds the model's activation: parts are the
  model channels of each concatenated piece, each stored sub-position-major."""

  fold: int
  parts: tuple[int, ...]

  @property
  def channels(self) -> int:
    return sum(self.parts)

  @property
  def stored(self) -> int:
    return self.fold * self.channels

  def model_channel(self) -> np.ndarray:
    """For each stored channel, the model channel it holds."""
    out, offset = [], 0
    for c in self.parts:
      out += [offset + np.arange(c)] * self.fold
      offset += c
    return np.concatenate(out)

  def sub_position(self) -> np.ndarray:
    """For each stored channel, the W sub-position (0..fold-1) it holds."""
    return np.concatenate([np.repeat(np.arange(self.fold), c) for c in self.parts])


def fold(x: Array, f: int) -> Array:
  """(N, D, H, W, C) -> (N, D, H, W/f, f*C), Layout(f, (C,))."""
  n, d, h, w, c = x.shape
  return x.reshape(n, d, h, w // f, f * c)


def unfold(x: Array, layout: Layout) -> Array:
  """The stored array -> (N, D, H, W, C) in model channel order."""
  if len(layout.parts) > 1:  # to sub-position-major over all channels, then the plain reshape
    natural = layout.sub_position() * layout.channels + layout.model_channel()
    x = x[..., np.argsort(natural)]
  n, d, h, blocks, _ = x.shape
  return x.reshape(n, d, h, blocks * layout.fold, layout.channels)


def w_taps(
  fold_in: int, fold_out: int, k: int, source: Callable[[int, int], int]
) -> tuple[np.ndarray, tuple[int, int]]:
  """A conv along W over blocks: T[s, i, j, t] = 1 where output sub-position j's tap t reads input block
  (b + s - lo) at sub-position i, for `source(j, t)` = that input voxel's offset from voxel fold_in * b.
  Returns (T, (lo, hi)): the block conv's taps run over offsets -lo..hi, so it pads lo before and hi after."""
  offsets = {(j, t): source(j, t) for j in range(fold_out) for t in range(k)}
  blocks = {key: off // fold_in for key, off in offsets.items()}
  lo, hi = -min(blocks.values()), max(blocks.values())
  taps = np.zeros((lo + hi + 1, fold_in, fold_out, k), np.float32)
  for (j, t), off in offsets.items():
    taps[blocks[j, t] + lo, off - blocks[j, t] * fold_in, j, t] = 1.0
  return taps, (lo, hi)


def folded_kernel(kernel: Array, taps: np.ndarray, layout_in: Layout, fold_out: int) -> Array:
  """(kd, kh, kw, Cin, Cout) model kernel -> (kd, kh, S, stored in, fold_out * Cout) block kernel along W, rows
  in layout_in's stored order. Built per part as one small einsum with the taps (a few x the kernel's size)."""
  kd, kh, _, _, cout = kernel.shape
  t = jnp.asarray(taps, kernel.dtype)
  rows, offset = [], 0
  for c in layout_in.parts:
    part = jnp.einsum("sijt,abtco->absicjo", t, kernel[:, :, :, offset : offset + c])
    rows.append(part.reshape(kd, kh, t.shape[0], layout_in.fold * c, fold_out * cout))
    offset += c
  return jnp.concatenate(rows, axis=3) if len(rows) > 1 else rows[0]


# Per axis, which taps t of a 3-tap conv over the x2 nearest-upsampled signal land on low-resolution tap s
# (offsets -1, 0, +1) for output phase p (even, odd output voxel): out[2i + p] = sum_s x[i + s] K'_p[s].
SUBPIXEL_TAPS = np.array(  # numpy: a jax array made at import would start the backend before jax.distributed
  [
    [[1, 0, 0], [0, 1, 1], [0, 0, 0]],  # even: x[i-1] K[0] + x[i] (K[1] + K[2])
    [[0, 0, 0], [1, 1, 0], [0, 0, 1]],  # odd:  x[i] (K[0] + K[1]) + x[i+1] K[2]
  ],
  np.float32,
)


class FoldedConv(nn.Module):
  """The model's k^3 conv (params as nn.Conv: kernel (k, k, k, Cin, Cout), bias) on folded arrays.

  mode 'same': stride 1, SAME padding, fold kept (k = 1 or 3); 'down': stride 2 with flax's SAME padding for
  even sizes (0 before, 1 after), fold_in = 2 fold_out; 'up': nearest x2 along D, H, W then the 3^3 SAME conv,
  fold_out = 2 fold_in: D and H as sub-pixel phases (models/unet3d.py's SubpixelUpConv), W through the fold.
  Between two unfolded levels the UNet uses its plain modules."""

  features: int
  kernel_size: int
  mode: str
  layout_in: Layout
  fold_out: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  kernel_init: Callable
  bias_init: Callable

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, lin = self.kernel_size, self.layout_in
    wanted = {"same": lin.fold, "down": lin.fold // 2, "up": 2 * lin.fold}[self.mode]
    if self.fold_out != wanted or (self.mode == "down" and lin.fold % 2):
      raise ValueError(f"FoldedConv {self.mode!r} from fold {lin.fold} makes fold {wanted}, not {self.fold_out}")
    lout = Layout(self.fold_out, (self.features,))
    kernel = self.param("kernel", self.kernel_init, (k, k, k, lin.channels, self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    half = (k - 1) // 2
    source = {
      "same": lambda j, t: j + t - half,
      "down": lambda j, t: 2 * j + t,
      "up": lambda j, t: (j + t - 1) // 2,
    }[self.mode]
    taps, (lo, hi) = w_taps(lin.fold, self.fold_out, k, source)
    kernel = folded_kernel(kernel, taps, lin, self.fold_out)  # (k, k, S, Si, So)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    dims = ("NDHWC", "DHWIO", "NDHWC")
    if self.mode == "up":
      m = jnp.asarray(SUBPIXEL_TAPS, kernel.dtype)
      phases = jnp.einsum("psd,qte,deWio->stWipqo", m, m, kernel)
      phases = phases.reshape(3, 3, kernel.shape[2], lin.stored, 4 * lout.stored)
      y = jax.lax.conv_general_dilated(x, phases, (1, 1, 1), [(1, 1), (1, 1), (lo, hi)], dimension_numbers=dims)
      n, d, h, wb, _ = y.shape
      y = y.reshape(n, d, h, wb, 2, 2, lout.stored).transpose(0, 1, 4, 2, 5, 3, 6).reshape(n, 2 * d, 2 * h, wb, -1)
    else:
      stride = 2 if self.mode == "down" else 1
      pad_dh = (0, 1) if self.mode == "down" else (half, half)
      y = jax.lax.conv_general_dilated(
        x, kernel, (stride, stride, 1), [pad_dh, pad_dh, (lo, hi)], dimension_numbers=dims
      )
    return y + jnp.tile(bias, self.fold_out)
