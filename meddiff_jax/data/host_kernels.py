"""Compiled loops (numba) for per-sample host work that numpy can only do in several passes over memory.

zoom2's 2P^3 -> P^3 resize (`multilevel.halve`) as numpy passes went over its 32 MB window slab by slab, some
fifteen array operations on float32 temporaries per slab; fused, each window voxel is read once and each output
voxel written once (13.5 -> 3.2 ms per 256^3 window, benchmarks/RESULTS.md "#24"). The arithmetic is numpy's, in
the same order and float32 (no fused multiply-add: numba contracts only under fastmath), so the result is bitwise
the numpy version's (tests/test_decode.py compares it with the float64 resize). Imported on first use
(multilevel.halve): numba costs ~0.3 s to import and each kernel ~0.7 s to compile, once per process and array
layout. Not cached on disk: Grain's worker processes start together, and numba's cache written by several processes
at once is a known crash (numba#4807), where the compile is a second per worker."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(inline="always")
def _pair_lerp(window, weights, i: int, j: int, k: int) -> np.float32:
  """Output voxel (i, j, k): the voxel pairs (2i, 2i + 1), (2j, 2j + 1), (2k, 2k + 1) lerped depth, height, width,
  each as even + w (odd - even) in float32."""
  wi, wj, wk = weights[i], weights[j], weights[k]
  d, h, w = 2 * i, 2 * j, 2 * k
  e00, o00 = np.float32(window[d, h, w]), np.float32(window[d + 1, h, w])
  e01, o01 = np.float32(window[d, h, w + 1]), np.float32(window[d + 1, h, w + 1])
  e10, o10 = np.float32(window[d, h + 1, w]), np.float32(window[d + 1, h + 1, w])
  e11, o11 = np.float32(window[d, h + 1, w + 1]), np.float32(window[d + 1, h + 1, w + 1])
  r00 = (o00 - e00) * wi + e00  # depth
  r01 = (o01 - e01) * wi + e01
  r10 = (o10 - e10) * wi + e10
  r11 = (o11 - e11) * wi + e11
  c0 = (r10 - r00) * wj + r00  # height
  c1 = (r11 - r01) * wj + r01
  return (c1 - c0) * wk + c0  # width


@numba.njit(nogil=True)
def halve_into(window: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
  """out (P, P, P) float32 <- `window` (2P, 2P, 2P) lerped pairwise along each axis by `weights` (P,) float32
  (the weight of each pair's odd voxel)."""
  p = out.shape[0]
  for i in range(p):
    for j in range(p):
      for k in range(p):
        out[i, j, k] = _pair_lerp(window, weights, i, j, k)


@numba.njit(nogil=True)
def halve_fixed_into(
  window: np.ndarray, weights: np.ndarray, scale: np.float32, lo: np.float32, hi: np.float32, out: np.ndarray
) -> None:
  """As `halve_into`, each value then stored as int16 ceil(value * scale) saturated to [lo, hi]: the fixed-point
  conversion in the same pass."""
  p = out.shape[0]
  for i in range(p):
    for j in range(p):
      for k in range(p):
        out[i, j, k] = np.int16(min(max(np.ceil(_pair_lerp(window, weights, i, j, k) * scale), lo), hi))
