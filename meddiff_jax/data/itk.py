"""NRRD / MetaImage in, through SimpleITK (ITK's LPS world converted to RAS)."""

from __future__ import annotations

import numpy as np

from meddiff_jax.data import volumes

ITK_EXTENSIONS = (".nrrd", ".nhdr", ".mha", ".mhd")


def read(path: str, options: volumes.ReadOptions) -> volumes.Volume:
  """NRRD / MetaImage through SimpleITK (ITK's LPS world converted to RAS); header checked before reading."""
  import SimpleITK as sitk

  reader = sitk.ImageFileReader()
  reader.SetFileName(path)
  try:
    reader.ReadImageInformation()
  except RuntimeError as e:
    raise volumes.VolumeError(path, f"not a readable NRRD/MetaImage ({str(e).strip().splitlines()[-1][:200]})") from e
  size = reader.GetSize()
  if len(size) != 3 or reader.GetNumberOfComponents() != 1:
    raise volumes.VolumeError(
      path, f"expected a 3D scalar volume, got size {size} with {reader.GetNumberOfComponents()} components"
    )
  itemsize = np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], reader.GetPixelID())).dtype).itemsize
  volumes.check_size(path, size, itemsize, options)
  spacing = np.asarray(reader.GetSpacing(), np.float64)
  if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise volumes.VolumeError(path, f"spacing {tuple(spacing)} has zero, negative or NaN voxel sizes")
  lps = np.eye(4)
  lps[:3, :3] = np.asarray(reader.GetDirection(), np.float64).reshape(3, 3) * spacing
  lps[:3, 3] = reader.GetOrigin()
  affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
  volumes.check_geometry(path, tuple(size), affine, options)
  try:
    data = sitk.GetArrayFromImage(reader.Execute()).transpose(2, 1, 0)  # ITK arrays are (z, y, x)
  except RuntimeError as e:
    raise volumes.VolumeError(path, f"truncated or corrupt data ({str(e).strip().splitlines()[-1][:200]})") from e
  source = volumes.Source("itk", path, tuple(size), affine, np.array([[0, 1], [1, 1], [2, 1]], np.float64))
  return volumes.Volume(data=np.ascontiguousarray(data), affine=affine, path=path, source=source)
