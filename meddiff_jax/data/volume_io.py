"""Volume I/O by format: `load` picks the reader (NIfTI, DICOM series, NRRD / MetaImage) and returns the volume in
RAS voxel order, checked; `save_like` writes a result back on the grid of the file it came from, in its format.

Readers: nibabel for NIfTI (nifti.py), pydicom (+ pylibjpeg for compressed transfer syntaxes) for DICOM series
(dicom.py), SimpleITK for NRRD / MetaImage (itk.py). Types, checks and resampling: volumes.py.
"""

from __future__ import annotations

import os

import numpy as np

from meddiff_jax.data import dicom, geometry, itk, nifti, volumes

IMAGE_EXTENSIONS = nifti.NIFTI_EXTENSIONS + itk.ITK_EXTENSIONS  # single-file formats (DICOM: by content or folder)


def load(
  path: str | os.PathLike,
  *,
  is_mask: bool = False,
  canonical: bool = True,
  options: volumes.ReadOptions | None = None,
  integer_hu: bool = False,
  binary: bool = False,
) -> volumes.Volume:
  """Load a 3D volume (NIfTI file, DICOM series folder or file, NRRD/MHA), reoriented to RAS.

  Images come back as float32 (scaling applied), masks as int16 labels; with `integer_hu`, a NIfTI image stored as
  whole numbers that fit int16 comes back as int16 (half the memory: tasks and prepare read scans this way); with
  `binary`, a mask comes back as bool (label > 0; from a NIfTI converted slab by slab, half the labels' memory). A
  NIfTI is read slab by slab straight into RAS order (memory: the result and one slab). Raises volumes.VolumeError
  on unreadable or truncated files, non-3D data (4D with a singleton last axis is squeezed), RGB, broken geometry
  (see volumes.check_geometry), sizes over the limits, NaN/inf voxels, or non-integer mask labels.
  """
  path = str(path)
  options = options or volumes.ReadOptions()
  if not os.path.exists(path):
    raise volumes.VolumeError(path, "file does not exist")
  lower = path.lower()
  if (
    os.path.isdir(path)
    or lower.endswith(".dcm")
    or (not lower.endswith(nifti.NIFTI_EXTENSIONS + itk.ITK_EXTENSIONS) and dicom.is_dicom_file(path))
  ):
    vol = dicom.load_series(path, options)
  elif lower.endswith(itk.ITK_EXTENSIONS):
    vol = itk.read(path, options)
  elif canonical:
    return nifti.read(path, options, is_mask, ras=True, integer_hu=integer_hu, binary=binary)  # checked while read
  else:
    vol = nifti.read(path, options, is_mask)
  if canonical:
    vol = volumes.canonical_ras(vol)
  vol = _checked_values(vol, path, is_mask)
  if is_mask and binary:
    vol.data = vol.data > 0
  return vol


def _checked_values(vol: volumes.Volume, path: str, is_mask: bool) -> volumes.Volume:
  """Images as float32 with every voxel finite, masks as int16 labels that were integers."""
  if is_mask:
    data = vol.data
    if np.issubdtype(data.dtype, np.floating):
      if not np.all(np.isfinite(data)) or not np.allclose(data, np.round(data)):
        raise volumes.VolumeError(path, "mask has non-integer or non-finite labels")
      data = np.round(data)
    vol.data = np.asarray(data, np.int16)  # (int16 labels as read stay the same array: no scan-sized copy)
  else:
    vol.data = np.asarray(vol.data, np.float32)
    bad = ~np.isfinite(vol.data)
    if bad.any():
      raise volumes.VolumeError(path, f"{int(bad.sum())} NaN/inf voxels")
  return vol


def from_array(
  data: np.ndarray,
  affine: np.ndarray,
  *,
  is_mask: bool = False,
  options: volumes.ReadOptions | None = None,
  name: str = "<array>",
) -> volumes.Volume:
  """An array in memory and its affine (voxel indices -> RAS world mm), checked as `load` checks a file (3D, size
  limits, geometry, finite voxels or integer labels) and returned in RAS voxel order like `load`'s volumes. Its
  `source` is the array's own grid: `save_like` and `as_saved` give results back in the array's voxel order.
  `name` stands for the file name in error messages."""
  options = options or volumes.ReadOptions()
  data, affine = np.asarray(data), np.asarray(affine, np.float64)
  if data.ndim != 3:
    raise volumes.VolumeError(name, f"array of shape {data.shape}: give a 3D volume (X, Y, Z)")
  if affine.shape != (4, 4):
    raise volumes.VolumeError(name, f"affine of shape {affine.shape}: give the 4x4 voxel-to-world (RAS, mm) matrix")
  if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
    raise volumes.VolumeError(name, f"array of dtype {data.dtype}: give integer or floating-point voxels")
  volumes.check_size(name, data.shape, data.dtype.itemsize, options)
  volumes.check_geometry(name, data.shape, affine, options)
  source = volumes.Source("array", name, tuple(data.shape), affine, np.array([[0, 1], [1, 1], [2, 1]], np.float64))
  return _checked_values(volumes.canonical_ras(volumes.Volume(data, affine, path=name, source=source)), name, is_mask)


def is_directory_output(path: str) -> bool:
  return str(path).endswith(os.sep) or os.path.isdir(str(path))


def save_like(
  values_ras: np.ndarray,
  like: volumes.Volume,
  path: str | os.PathLike,
  dtype: np.dtype | None = None,
  *,
  description: str = "",
) -> str:
  """Write `values_ras` (on `like`'s RAS grid) on the grid of the file `like` was read from: same shape,
  voxel order and affine; for NIfTI the same qform/sform (and their codes); a DICOM series folder when
  `path` is a directory and the input was DICOM (new series UIDs, `description` as SeriesDescription)."""
  path = str(path)
  src = like.source
  if src is None:  # an in-memory volume: its RAS grid is all there is
    if is_directory_output(path):
      raise volumes.VolumeError(path, "a directory output (DICOM series) needs a DICOM input; give a .nii.gz path")
    nifti.save(volumes.Volume(*as_saved(values_ras, like, dtype, path)), path)
    return path
  if is_directory_output(path):
    data, _ = as_saved(values_ras, like, None, path)
    if src.kind != "dicom":
      why = (
        "this result is on a resampled grid, not the series' own"
        if src.derived
        else f"the input {src.path} is not DICOM"
      )
      raise volumes.VolumeError(
        path,
        f"a directory output writes a DICOM series on the input series' grid, but {why}; give a .nii.gz output path",
      )
    dicom.write_series(data, src, path, description)
    return path
  data, affine = as_saved(values_ras, like, dtype, path)
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  if src.kind == "nifti" and src.header is not None:
    nifti.save_with_header(data, src, path)
  else:  # ITK formats, arrays: their grid's affine
    nifti.save(volumes.Volume(data, affine), path)
  return path


def as_saved(
  values_ras: np.ndarray, like: volumes.Volume, dtype: np.dtype | None = None, path: str = "<result>"
) -> tuple[np.ndarray, np.ndarray]:
  """(array, affine) as `save_like` writes `values_ras` (on `like`'s RAS grid) to a file: in the voxel order of the
  grid `like` came from (a file's, an array's; RAS for a volume without a source), cast to `dtype` (integers
  rounded and clipped), and that grid's affine."""
  values_ras = np.asarray(values_ras)
  if values_ras.shape != like.shape:
    raise volumes.VolumeError(path, f"result shape {values_ras.shape} is not the input grid {like.shape}")
  src = like.source
  data, affine = (values_ras, like.affine) if src is None else (geometry.from_ras(values_ras, src.ornt), src.affine)
  assert src is None or data.shape == tuple(src.shape), (data.shape, src.shape)
  return (data if dtype is None else _cast(data, dtype)), np.asarray(affine, np.float64)


def _cast(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
  dtype = np.dtype(dtype)
  if data.dtype == dtype:
    return data  # (a scan-sized result is not copied to be written)
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    return np.clip(np.round(data), info.min, info.max).astype(dtype)
  return data.astype(dtype)
