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
) -> volumes.Volume:
  """Load a 3D volume (NIfTI file, DICOM series folder or file, NRRD/MHA), reoriented to RAS.

  Images come back as float32 (scaling applied), masks as int16 labels; with `integer_hu`, a NIfTI image stored as
  whole numbers that fit int16 comes back as int16 (half the memory: tasks and prepare read scans this way). A
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
    return nifti.read(path, options, is_mask, ras=True, integer_hu=integer_hu)  # checked while read
  else:
    vol = nifti.read(path, options, is_mask)
  if canonical:
    vol = volumes.canonical_ras(vol)
  if is_mask:
    data = vol.data
    if np.issubdtype(data.dtype, np.floating):
      if not np.all(np.isfinite(data)) or not np.allclose(data, np.round(data)):
        raise volumes.VolumeError(path, "mask has non-integer or non-finite labels")
    vol.data = np.asarray(np.round(data), np.int16)
  else:
    vol.data = np.asarray(vol.data, np.float32)
    bad = ~np.isfinite(vol.data)
    if bad.any():
      raise volumes.VolumeError(path, f"{int(bad.sum())} NaN/inf voxels")
  return vol


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
  values_ras = np.asarray(values_ras)
  if values_ras.shape != like.shape:
    raise volumes.VolumeError(path, f"result shape {values_ras.shape} is not the input grid {like.shape}")
  src = like.source
  if src is None:  # an in-memory volume: its RAS grid is all there is
    if is_directory_output(path):
      raise volumes.VolumeError(path, "a directory output (DICOM series) needs a DICOM input; give a .nii.gz path")
    nifti.save(volumes.Volume(values_ras, like.affine), path, dtype)
    return path
  data = geometry.from_ras(values_ras, src.ornt)
  assert data.shape == tuple(src.shape), (data.shape, src.shape)
  if is_directory_output(path):
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
  if dtype is not None:
    data = _cast(data, dtype)
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  if src.kind == "nifti" and src.header is not None:
    nifti.save_with_header(data, src, path)
  else:
    nifti.save(volumes.Volume(data, src.affine), path, dtype)
  return path


def _cast(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
  dtype = np.dtype(dtype)
  if data.dtype == dtype:
    return data  # (a scan-sized result is not copied to be written)
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    return np.clip(np.round(data), info.min, info.max).astype(dtype)
  return data.astype(dtype)
