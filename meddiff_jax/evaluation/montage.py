"""Slice montages of 3D volumes: axial, coronal and sagittal mid-planes, one row per volume."""

from __future__ import annotations

import io

import numpy as np

from meddiff_jax import storage


def _to_uint8(plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
  return (np.clip((plane - lo) / (hi - lo), 0.0, 1.0) * 255).astype(np.uint8)


def _fit(plane: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize to size x size (keeps voxel edges crisp)."""
  rows = (np.arange(size) * plane.shape[0] / size).astype(int)
  cols = (np.arange(size) * plane.shape[1] / size).astype(int)
  return plane[rows][:, cols]


def orthogonal_planes(volume: np.ndarray) -> list[np.ndarray]:
  """Mid slices of a RAS-ordered (X, Y, Z) volume in radiological display convention: anterior /
  superior up, patient's right on the image's left (sagittal: anterior on the left)."""
  x, y, z = (s // 2 for s in volume.shape[:3])
  axial = np.fliplr(np.rot90(volume[:, :, z]))
  coronal = np.fliplr(np.rot90(volume[:, y, :]))
  sagittal = np.fliplr(np.rot90(volume[x, :, :]))
  return [axial, coronal, sagittal]


def slice_montage(
  volumes: list[np.ndarray], lo: float = -1.0, hi: float = 1.0, tile: int = 128, gap: int = 2
) -> np.ndarray:
  """(rows * tile, 3 * tile, 3) uint8 RGB montage: one row per volume, columns axial/coronal/sagittal."""
  rows = []
  for vol in volumes:
    vol = np.asarray(vol, np.float32)
    vol = vol[..., 0] if vol.ndim == 4 else vol
    tiles = [_fit(_to_uint8(p, lo, hi), tile) for p in orthogonal_planes(vol)]
    pad = np.zeros((tile, gap), np.uint8)
    rows.append(np.concatenate([tiles[0], pad, tiles[1], pad, tiles[2]], axis=1))
  hpad = np.zeros((gap, rows[0].shape[1]), np.uint8)
  grid = np.concatenate([r for row in rows for r in (row, hpad)][:-1], axis=0)
  return np.repeat(grid[..., None], 3, axis=-1)


def save_png(image: np.ndarray, path: str) -> None:
  """`path`: local or a URL (gs://, s3://, memory://; see meddiff_jax.storage)."""
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  storage.write_bytes(path, buf.getvalue())
