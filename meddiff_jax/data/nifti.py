"""NIfTI I/O with validation: canonical RAS orientation, spacing, resampling that keeps the affine exact.

Every error is a `VolumeError` whose message starts with the file name and says what is wrong, so a
preparation run can log it and skip the file.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import nibabel as nib
import numpy as np
from scipy import ndimage


class VolumeError(ValueError):
  """A volume that cannot be used, with the file and the reason in the message."""

  def __init__(self, path: str | os.PathLike | None, problem: str):
    self.path, self.problem = str(path) if path else "<array>", problem
    super().__init__(f"{self.path}: {problem}")


@dataclasses.dataclass
class Volume:
  """Array in RAS voxel order (axis 0 -> Right, 1 -> Anterior, 2 -> Superior) and its RAS affine."""

  data: np.ndarray
  affine: np.ndarray
  path: str = ""

  @property
  def spacing(self) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.data.shape)

  def world(self, index: np.ndarray) -> np.ndarray:
    """World (mm, RAS) coordinates of voxel indices (..., 3)."""
    index = np.asarray(index, np.float64)
    return index @ self.affine[:3, :3].T + self.affine[:3, 3]


def _check_affine(affine: np.ndarray, path: str) -> None:
  if not np.all(np.isfinite(affine)):
    raise VolumeError(path, "affine contains NaN/inf")
  det = float(np.linalg.det(affine[:3, :3]))
  if abs(det) < 1e-6:
    raise VolumeError(path, f"singular affine (det={det:.3g}): voxel-to-world mapping is broken")


def load(path: str | os.PathLike, *, is_mask: bool = False, canonical: bool = True) -> Volume:
  """Load a 3D NIfTI, reoriented to RAS.

  Images come back as float32 (scl_slope/inter applied), masks as int16 labels. Raises VolumeError on
  unreadable/truncated files, non-3D data (4D with a singleton last axis is squeezed), RGB, a singular
  affine, NaN/inf voxels, or non-integer mask labels.
  """
  path = str(path)
  if not os.path.exists(path):
    raise VolumeError(path, "file does not exist")
  try:
    img = nib.load(path)
  except Exception as e:  # nibabel raises many types for bad headers
    raise VolumeError(path, f"not a readable NIfTI ({type(e).__name__}: {e})") from e
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise VolumeError(path, f"not a NIfTI image ({type(img).__name__})")
  if img.get_data_dtype().names:
    raise VolumeError(path, f"RGB/structured voxel type {img.get_data_dtype()}; expected a scalar CT volume")
  shape = img.shape
  if len(shape) == 4 and shape[3] == 1:
    img = img.slicer[..., 0]
  elif len(shape) != 3:
    raise VolumeError(path, f"expected a 3D volume, got shape {shape}")
  if min(img.shape) < 2:
    raise VolumeError(path, f"degenerate shape {img.shape} (a 2D slice, not a volume)")
  _check_affine(img.affine, path)
  if canonical:
    img = nib.as_closest_canonical(img)
  try:
    data = np.asarray(img.dataobj)
  except (EOFError, zlib.error, OSError, ValueError) as e:
    raise VolumeError(path, f"truncated or corrupt data ({type(e).__name__}: {e})") from e
  if is_mask:
    if np.issubdtype(data.dtype, np.floating):
      if not np.all(np.isfinite(data)) or not np.allclose(data, np.round(data)):
        raise VolumeError(path, "mask has non-integer or non-finite labels")
    data = np.asarray(np.round(data), np.int16)
  else:
    data = np.asarray(data, np.float32)
    bad = ~np.isfinite(data)
    if bad.any():
      raise VolumeError(path, f"{int(bad.sum())} NaN/inf voxels")
  return Volume(data=data, affine=np.asarray(img.affine, np.float64), path=path)


def check_ct(volume: Volume) -> None:
  """Reject data that does not look like CT in Hounsfield units.

  CT in HU contains air (about -1000) around or inside the body, and spans a wide range. A constant
  volume, 0-255 / 0-4095 data without negatives (MR, screenshots, unrescaled DICOM) fail here.
  """
  lo, hi = float(volume.data.min()), float(volume.data.max())
  if hi - lo < 1e-3:
    raise VolumeError(volume.path, f"constant volume (all voxels = {lo:g})")
  if lo > -200.0:
    raise VolumeError(volume.path, f"intensities in [{lo:g}, {hi:g}] have no air (< -200 HU): not CT in "
                      "Hounsfield units (MR, 0-255 image or DICOM without rescale slope/intercept?)")
  if lo < -10_000 or hi > 40_000:
    raise VolumeError(volume.path, f"intensities in [{lo:g}, {hi:g}] are outside any CT HU range")


def check_same_grid(image: Volume, mask: Volume, atol_mm: float = 1e-2) -> None:
  """A mask must share its image's voxel grid: same shape and same affine."""
  if image.shape != mask.shape:
    raise VolumeError(mask.path, f"mask shape {mask.shape} does not match image {image.path} shape {image.shape}")
  if not np.allclose(image.affine, mask.affine, atol=atol_mm):
    raise VolumeError(mask.path, f"mask affine differs from image {image.path} affine (different grid)")


def check_crop_position(crop: Volume, parent: Volume, tolerance_hu: float = 1.0) -> None:
  """Verify that a crop's affine places it where its voxels actually are inside `parent`.

  Cropping a volume without shifting the affine's origin (a common preprocessing bug) leaves the crop
  claiming the parent's position: every world-coordinate use of it (overlays, masks, position
  embeddings) is then wrong. Needs both on the same voxel grid orientation and spacing.
  """
  if not np.allclose(crop.affine[:3, :3], parent.affine[:3, :3], atol=1e-3):
    raise VolumeError(crop.path, f"crop and parent {parent.path} have different orientation/spacing")
  claimed = np.linalg.solve(parent.affine[:3, :3], crop.affine[:3, 3] - parent.affine[:3, 3])
  claimed_offset = np.round(claimed).astype(int)
  if _matches_at(crop.data, parent.data, claimed_offset, tolerance_hu):
    return
  actual = _find_offset(crop.data, parent.data, tolerance_hu)
  where = f"voxel offset {tuple(int(a) for a in actual)}" if actual is not None else "no offset"
  raise VolumeError(crop.path, f"affine places this crop at voxel offset {tuple(int(c) for c in claimed_offset)} of "
                    f"{parent.path}, but its voxels match the parent at {where}: the crop's affine was not "
                    "updated (shift its origin by the crop offset)")


def _matches_at(crop: np.ndarray, parent: np.ndarray, offset: np.ndarray, tol: float) -> bool:
  hi = offset + np.array(crop.shape)
  if np.any(offset < 0) or np.any(hi > np.array(parent.shape)):
    return False
  window = parent[tuple(slice(a, b) for a, b in zip(offset, hi))]
  return float(np.mean(np.abs(window.astype(np.float32) - crop.astype(np.float32)))) <= tol


def _find_offset(crop: np.ndarray, parent: np.ndarray, tol: float) -> np.ndarray | None:
  ranges = [range(p - c + 1) for p, c in zip(parent.shape, crop.shape)]
  if any(len(r) == 0 for r in ranges) or np.prod([len(r) for r in ranges]) > 200_000:
    return None
  probe = tuple(s // 2 for s in crop.shape)  # cheap prefilter on one voxel, then full comparison
  for i in ranges[0]:
    for j in ranges[1]:
      for k in ranges[2]:
        if abs(float(parent[i + probe[0], j + probe[1], k + probe[2]]) - float(crop[probe])) > tol:
          continue
        if _matches_at(crop, parent, np.array([i, j, k]), tol):
          return np.array([i, j, k])
  return None


def target_shape(shape: tuple[int, ...], spacing: tuple[float, ...], new_spacing: tuple[float, ...]) -> tuple[int, ...]:
  return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))


def resample(volume: Volume, new_spacing: tuple[float, float, float], *, order: int = 1,
             fill: float | None = None) -> Volume:
  """Resample to `new_spacing` mm, keeping the physical extent; the affine is updated exactly.

  Voxel i of the new grid samples old continuous index (i + 0.5) * s - 0.5 per axis, s = new/old
  spacing, so the outer voxel edges stay put. order=1 trilinear for images, order=0 nearest for masks.
  """
  old = np.array(volume.spacing)
  new = np.array(new_spacing, np.float64)
  shape = target_shape(volume.shape, tuple(old), tuple(new))
  scale = new / old
  offset = 0.5 * scale - 0.5
  if fill is None:
    fill = float(volume.data.min()) if order else 0.0
  out = ndimage.affine_transform(volume.data, scale, offset=offset, output_shape=shape, order=order,
                                 mode="constant", cval=fill, prefilter=False)
  index_map = np.eye(4)
  index_map[:3, :3] = np.diag(scale)
  index_map[:3, 3] = offset
  return Volume(data=out.astype(volume.data.dtype), affine=volume.affine @ index_map, path=volume.path)


def save(volume: Volume, path: str | os.PathLike, dtype: np.dtype | None = None) -> None:
  """Write a NIfTI whose affine (qform and sform) places the data where `volume.affine` says."""
  data = volume.data if dtype is None else volume.data.astype(dtype)
  img = nib.Nifti1Image(data, volume.affine)
  img.set_qform(volume.affine, code=1)
  img.set_sform(volume.affine, code=1)
  img.header.set_xyzt_units("mm")
  os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
  nib.save(img, str(path))
