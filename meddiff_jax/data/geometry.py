"""Voxel-grid geometry: exact resampling between grids, orientation to and from RAS, affine sanity checks.

Resampling maps every output voxel centre through the two affines to a continuous source index and
interpolates there (scipy.ndimage.affine_transform, trilinear for images, nearest for labels). The
output grid of `resample_grid` starts at the source's first voxel centre and never reaches past its last
one, so no output voxel needs a value from outside the data: a linear ramp comes back exact on every
face, and no border is filled with invented air.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Output voxels whose source position lies within this many source voxels outside the data take the
# nearest edge value (float round-off, or the < 1 voxel sliver when going back to a finer input grid);
# farther out they get `fill` (a grid that really extends past the data).
EDGE_TOLERANCE_VOXELS = 1.0


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
  return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def box_grid(
  shape: tuple[int, ...], affine: np.ndarray, index: tuple[slice, ...]
) -> tuple[tuple[int, ...], np.ndarray]:
  """(shape, affine) of the block data[index] of a grid (shape, affine): slices with steps of 1 (None ends: the
  grid's); the affine's origin moves to the block's first voxel (exact)."""
  ranges = [sl.indices(n)[:2] for sl, n in zip(index, shape)]
  out = np.asarray(affine, np.float64).copy()
  out[:3, 3] += out[:3, :3] @ np.array([a for a, _ in ranges], np.float64)
  return tuple(b - a for a, b in ranges), out


def resample_grid(
  shape: tuple[int, ...], affine: np.ndarray, new_spacing: tuple[float, ...]
) -> tuple[tuple[int, ...], np.ndarray]:
  """(shape, affine) of the grid with `new_spacing` mm, the same axes and first voxel centre, and as many
  voxels as fit inside the source's voxel-centre extent (n' = floor((n - 1) s / s') + 1)."""
  old = np.array(spacing_of(affine))
  new = np.asarray(new_spacing, np.float64)
  if new.shape != (3,) or not np.all(np.isfinite(new)) or np.any(new <= 0):
    raise ValueError(f"spacing {tuple(new_spacing)} must be three positive numbers (mm)")
  extent = (np.asarray(shape[:3], np.float64) - 1) * old
  out_shape = tuple(int(np.floor(e / s + 1e-6)) + 1 for e, s in zip(extent, new))
  scale = np.eye(4)
  scale[:3, :3] = np.diag(new / old)
  return out_shape, np.asarray(affine, np.float64) @ scale


def resample_to(
  data: np.ndarray,
  affine: np.ndarray,
  out_shape: tuple[int, ...],
  out_affine: np.ndarray,
  *,
  order: int = 1,
  fill: float = 0.0,
) -> np.ndarray:
  """`data` (on `affine`) sampled at the voxel centres of the grid (out_shape, out_affine): float32 when interpolated
  (float64 stays float64), the input's type with order 0 (labels)."""
  index_map = np.linalg.solve(np.asarray(affine, np.float64), np.asarray(out_affine, np.float64))
  matrix, offset = index_map[:3, :3], index_map[:3, 3]
  if np.allclose(matrix, np.diag(np.diag(matrix)), atol=1e-12):
    matrix = np.diag(matrix)  # axis-aligned: scipy's faster separable path
  src = np.asarray(data)
  # interpolated: float32 (an int16 scan is read as it is, not copied to float first); nearest: the labels' own type
  out_dtype = np.float32 if order and not np.issubdtype(src.dtype, np.float64) else src.dtype
  out = ndimage.affine_transform(
    src,
    matrix,
    offset=offset,
    output_shape=tuple(out_shape),
    output=np.dtype(out_dtype),
    order=order,
    mode="nearest",
    prefilter=False,
  )
  outside = _outside(index_map, src.shape, tuple(out_shape))
  if outside is not None:
    out[outside] = fill
  return out


def _outside(index_map: np.ndarray, src_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> np.ndarray | None:
  """Mask of output voxels that map farther than EDGE_TOLERANCE_VOXELS outside the source (None: none).

  The source index is affine in the output index, so its range over the grid comes from the 8 corners;
  the mask is built (by broadcasting, no per-voxel coordinate arrays for axis-aligned maps) only when needed."""
  corners = (
    np.array(
      [[i, j, k, 1.0] for i in (0, out_shape[0] - 1) for j in (0, out_shape[1] - 1) for k in (0, out_shape[2] - 1)]
    )
    @ index_map[:3].T
  )
  lo_ok = corners.min(axis=0) >= -EDGE_TOLERANCE_VOXELS
  hi_ok = corners.max(axis=0) <= np.asarray(src_shape[:3], np.float64) - 1 + EDGE_TOLERANCE_VOXELS
  if np.all(lo_ok & hi_ok):
    return None
  axes = [
    np.arange(n, dtype=np.float64).reshape([-1 if a == b else 1 for b in range(3)]) for a, n in enumerate(out_shape)
  ]
  mask = np.zeros((1, 1, 1), bool)
  for d in range(3):
    if lo_ok[d] and hi_ok[d]:
      continue
    coord = sum(index_map[d, a] * axes[a] for a in range(3) if index_map[d, a] != 0.0) + index_map[d, 3]
    mask = mask | (coord < -EDGE_TOLERANCE_VOXELS) | (coord > src_shape[d] - 1 + EDGE_TOLERANCE_VOXELS)
  return np.broadcast_to(mask, out_shape)


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(data in RAS voxel order, its affine, the orientation transform `from_ras` undoes)."""
  import nibabel as nib

  ornt = nib.orientations.io_orientation(affine)
  ras = nib.orientations.apply_orientation(data, ornt)
  return np.ascontiguousarray(ras), affine @ nib.orientations.inv_ornt_aff(ornt, data.shape[:3]), ornt


def from_ras(data_ras: np.ndarray, ornt: np.ndarray) -> np.ndarray:
  """Back to the file's voxel order: the exact inverse of `to_ras` for the same orientation transform."""
  import nibabel as nib

  inverse = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), np.asarray(ornt, np.float64))
  return nib.orientations.apply_orientation(data_ras, inverse)  # a view: writers take any strides


def affine_from_codes(codes: str, zooms: tuple[float, float, float]) -> np.ndarray:
  """Affine for an array whose axes point along `codes` (e.g. 'LPS'), origin at voxel 0."""
  import nibabel as nib

  codes = codes.upper()
  if len(codes) != 3 or sorted(codes.translate(str.maketrans("LPI", "RAS"))) != ["A", "R", "S"]:
    raise ValueError(f"orientation {codes!r} must be three letters, one of R/L, A/P, S/I each (e.g. RAS, LPS)")
  ornt = nib.orientations.axcodes2ornt(tuple(codes))
  affine = np.eye(4)
  affine[:3, :3] = 0.0
  for axis, (ras_axis, sign) in enumerate(ornt):
    affine[int(ras_axis), axis] = sign * zooms[axis]
  return affine


def shear_degrees(affine: np.ndarray) -> float:
  """Largest deviation from 90 degrees between two voxel axes (0 for an orthogonal grid)."""
  cols = np.asarray(affine, np.float64)[:3, :3]
  cols = cols / np.linalg.norm(cols, axis=0, keepdims=True)
  worst = 0.0
  for a, b in ((0, 1), (0, 2), (1, 2)):
    cos = abs(float(cols[:, a] @ cols[:, b]))
    worst = max(worst, 90.0 - float(np.degrees(np.arccos(min(1.0, cos)))))
  return worst


def corner_distance_mm(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
  """Largest distance between where two affines put the volume's corner voxels."""
  corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
  return float(np.max(np.linalg.norm((corners @ np.asarray(a).T - corners @ np.asarray(b).T)[:, :3], axis=1)))


def file_grid(
  shape_ras: tuple[int, ...], affine_ras: np.ndarray, ornt: np.ndarray
) -> tuple[tuple[int, ...], np.ndarray]:
  """(shape, affine) in a file's voxel order of a grid given in RAS order (inverse of `to_ras`'s grid)."""
  import nibabel as nib

  ornt = np.asarray(ornt, np.float64)
  file_shape = tuple(int(shape_ras[int(axis)]) for axis, _ in ornt)
  return file_shape, np.asarray(affine_ras, np.float64) @ np.linalg.inv(nib.orientations.inv_ornt_aff(ornt, file_shape))
