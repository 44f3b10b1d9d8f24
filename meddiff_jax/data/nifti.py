"""NIfTI in (nibabel) and out: the header's geometry checked and trusted only when unambiguous.

nibabel reads the file; the qform/sform choice, the raw pixdim (nibabel silently turns 0 into 1 mm) and the
refusals are ours (volumes.check_size / check_geometry before any voxel is read). `save` writes a volume with its
RAS affine as both qform and sform; `save_with_header` writes a result with the header of the file it came from.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import nibabel as nib
import numpy as np

from meddiff_jax.data import geometry, volumes

NIFTI_EXTENSIONS = (".nii", ".nii.gz")


def _raw_pixdim(path: str) -> np.ndarray | None:
  """pixdim[1:4] as stored: nibabel's loader silently turns 0 into 1 mm, so read the header bytes."""
  from nibabel.openers import ImageOpener

  with ImageOpener(path) as f:
    block = f.read(540)
  for endian in "<>":
    size = int(np.frombuffer(block[:4], endian + "i4")[0]) if len(block) >= 4 else 0
    if size == 348 and len(block) >= 108:
      return np.frombuffer(block[76:108], endian + "f4")[1:4].astype(np.float64)
    if size == 540 and len(block) >= 168:
      return np.frombuffer(block[104:168], endian + "f8")[1:4].astype(np.float64)
  return None


def _nifti_affine(img, path: str, options: volumes.ReadOptions) -> np.ndarray:
  """The affine to trust, refusing unknown orientation, bad pixdim and qform/sform disagreement."""
  hdr = img.header
  zooms = _raw_pixdim(path)
  if zooms is None:
    zooms = np.asarray(hdr["pixdim"][1:4], np.float64)
  if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
    raise volumes.VolumeError(
      path,
      f"pixdim {tuple(float(z) for z in zooms)} has zero, negative or NaN voxel sizes "
      "(nibabel would silently use 1 mm): fix the header's voxel size",
    )
  qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
  if options.assume_orientation:
    return geometry.affine_from_codes(options.assume_orientation, tuple(zooms))
  if qcode == 0 and scode == 0:
    raise volumes.VolumeError(
      path,
      "orientation unknown (qform_code = sform_code = 0): the voxel axes could be flipped; "
      "if you know it, set --config.assume_orientation=RAS (or LPS, LAS, ...)",
    )
  qform, sform = hdr.get_qform(), hdr.get_sform()
  if qcode > 0 and scode > 0:
    if options.trust_affine in ("sform", "qform"):
      return np.asarray(sform if options.trust_affine == "sform" else qform, np.float64)
    for name, aff in (("sform", sform), ("qform", qform)):
      if not np.all(np.isfinite(aff)):
        raise volumes.VolumeError(path, f"{name} contains NaN/inf")
    dist = geometry.corner_distance_mm(qform, sform, img.shape)
    if dist > 0.5:
      raise volumes.VolumeError(
        path,
        f"qform and sform disagree by up to {dist:.3g} mm at the volume corners (sheared or "
        "tilt-corrected sform?): set --config.trust_affine=sform or qform if you know which is right",
      )
  return np.asarray(sform if scode > 0 else qform, np.float64)


SLAB_BYTES = 64 << 20  # bytes of one slab read at a time (`read(..., ras=True)`)


def read(
  path: str,
  options: volumes.ReadOptions,
  is_mask: bool,
  *,
  ras: bool = False,
  integer_hu: bool = False,
  binary: bool = False,
) -> volumes.Volume:
  """A NIfTI file, header checked before any voxel is read: in its own voxel order (volume_io.load reorients), or
  with `ras` in RAS order already, read slab by slab along the file's last axis (contiguous on disk and sequential
  in a .nii.gz) into the one result array: memory is the result and one slab, never a second copy of the volume.
  `integer_hu`: an image stored as whole numbers (an integer type, integer slope and intercept) that fit int16 comes
  back as int16 (half of float32), else as float32; a mask comes back as int16 labels, or with `binary` (and `ras`)
  as bool (label > 0) converted slab by slab (half the memory of the labels)."""
  try:
    img = nib.load(path, mmap=False, keep_file_open=True) if ras else nib.load(path)
  except Exception as e:  # nibabel raises many types for bad headers
    raise volumes.VolumeError(path, f"not a readable NIfTI ({type(e).__name__}: {e})") from e
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise volumes.VolumeError(path, f"not a NIfTI image ({type(img).__name__})")
  if img.get_data_dtype().names:
    raise volumes.VolumeError(path, f"RGB/structured voxel type {img.get_data_dtype()}; expected a scalar CT volume")
  volumes.check_size(path, img.shape, img.get_data_dtype().itemsize, options)
  shape = img.shape
  if len(shape) == 4 and shape[3] == 1:
    shape = shape[:3]
  elif len(shape) != 3:
    raise volumes.VolumeError(path, f"expected a 3D volume, got shape {shape}")
  if min(shape) < 2:
    raise volumes.VolumeError(path, f"degenerate shape {shape} (a 2D slice, not a volume)")
  affine = _nifti_affine(img, path, options)
  volumes.check_geometry(
    path, shape, affine, options if not is_mask else dataclasses.replace(options, min_side_voxels=2)
  )
  if ras:
    ornt = nib.orientations.io_orientation(affine)
    data = _read_ras(img, path, tuple(shape), ornt, is_mask, integer_hu, binary)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, tuple(shape))
    source = volumes.Source("nifti", path, tuple(shape), affine, ornt, header=img.header.copy())
    return volumes.Volume(data=data, affine=ras_affine, path=path, source=source)
  try:
    data = np.asarray(img.dataobj)
  except (EOFError, zlib.error, OSError, ValueError) as e:
    raise volumes.VolumeError(path, f"truncated or corrupt data ({type(e).__name__}: {e})") from e
  data = data.reshape(shape)
  source = volumes.Source(
    "nifti", path, tuple(shape), affine, np.array([[0, 1], [1, 1], [2, 1]], np.float64), header=img.header.copy()
  )
  return volumes.Volume(data=data, affine=affine, path=path, source=source)


def _read_ras(
  img, path: str, shape: tuple[int, int, int], ornt: np.ndarray, is_mask: bool, integer_hu: bool, binary: bool = False
) -> np.ndarray:
  """The voxels in RAS order (see `read`), checked slab by slab: finite, and whole numbers for a mask."""
  proxy = img.dataobj
  raw = img.get_data_dtype()
  slope, inter = (float(v) for v in (getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)))
  whole = np.issubdtype(raw, np.integer) and float(slope).is_integer() and float(inter).is_integer()
  dtype = np.bool_ if is_mask and binary else np.int16 if is_mask or (integer_hu and whole) else np.float32
  ras_shape = tuple(int(shape[int(i)]) for i in np.argsort(ornt[:, 0]))
  out = np.empty(ras_shape, dtype)
  step = max(1, SLAB_BYTES // max(shape[0] * shape[1] * max(raw.itemsize, 4), 1))
  k_axis, k_flip = int(ornt[2, 0]), ornt[2, 1] < 0
  bad = 0
  for k0 in range(0, shape[2], step):
    k1 = min(shape[2], k0 + step)
    try:
      slab = np.asarray(proxy[:, :, k0:k1] if len(img.shape) == 3 else proxy[:, :, k0:k1, 0])
    except (EOFError, zlib.error, OSError, ValueError) as e:
      raise volumes.VolumeError(path, f"truncated or corrupt data ({type(e).__name__}: {e})") from e
    if np.issubdtype(slab.dtype, np.floating):
      finite = np.isfinite(slab)
      if not finite.all():
        if is_mask:
          raise volumes.VolumeError(path, "mask has non-integer or non-finite labels")
        bad += int(finite.size - finite.sum())
        continue
      if is_mask:
        if not np.allclose(slab, np.round(slab)):
          raise volumes.VolumeError(path, "mask has non-integer or non-finite labels")
        slab = np.round(slab)
    if dtype == np.bool_:
      slab = slab > 0
    if dtype == np.int16 and not is_mask and slab.size and (slab.min() < -32768 or slab.max() > 32767):
      out, dtype = out.astype(np.float32), np.float32  # whole numbers beyond int16: float32 after all
    index = [slice(None)] * 3
    index[k_axis] = slice(shape[2] - k1, shape[2] - k0) if k_flip else slice(k0, k1)
    out[tuple(index)] = nib.orientations.apply_orientation(slab, ornt)
  if bad:
    raise volumes.VolumeError(path, f"{bad} NaN/inf voxels")
  return out


def save(volume: volumes.Volume, path: str | os.PathLike, dtype: np.dtype | None = None) -> None:
  """Write a NIfTI whose affine (qform and sform) places the data where `volume.affine` says."""
  data = volume.data if dtype is None else volume.data.astype(dtype)
  img = nib.Nifti1Image(data, volume.affine)
  img.set_qform(volume.affine, code=1)
  img.set_sform(volume.affine, code=1)
  img.header.set_xyzt_units("mm")
  os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
  nib.save(img, str(path))


def save_with_header(data: np.ndarray, src: volumes.Source, path: str) -> None:
  """`data` (in the file's voxel order) as a NIfTI on the grid of `src`, a NIfTI that was read: its header, with
  the same qform/sform and codes (an assumed orientation is recorded with code 1; a resampled grid keeps the input's
  codes with its own affine)."""
  hdr = src.header.copy()
  hdr.set_data_dtype(data.dtype)
  img = nib.Nifti1Image(data, None, hdr) if isinstance(hdr, nib.Nifti1Header) else nib.Nifti2Image(data, None, hdr)
  qform, qcode = src.header.get_qform(coded=True)
  sform, scode = src.header.get_sform(coded=True)
  if int(qcode or 0) == 0 and int(scode or 0) == 0:  # assumed orientation: record what was used
    img.set_qform(src.affine, code=1)
    img.set_sform(src.affine, code=1)
  elif src.derived:  # a resampled grid: its affine, under the input's codes
    img.set_qform(src.affine, code=int(qcode or 0))
    img.set_sform(src.affine, code=int(scode or 0))
  else:
    img.set_qform(qform if qform is not None else src.affine, code=int(qcode or 0))
    img.set_sform(sform if sform is not None else src.affine, code=int(scode or 0))
  img.header.set_slope_inter(1.0, 0.0)
  nib.save(img, path)
