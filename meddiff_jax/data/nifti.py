"""Volume I/O with validation: NIfTI, DICOM series, NRRD/MHA; canonical RAS in memory; the input's own grid out.

Every error is a `VolumeError` whose message starts with the file name and says what is wrong (and which
override exists, if any), so a preparation run can log it and skip the file and a task can stop with one
line. Geometry and size are checked from the header before any voxel is read.

Readers: nibabel for NIfTI, pydicom (+ pylibjpeg for compressed transfer syntaxes) for DICOM series
(data/dicom.py), SimpleITK for NRRD / MetaImage.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any

import nibabel as nib
import numpy as np

from meddiff_jax import sections
from meddiff_jax.data import geometry

ITK_EXTENSIONS = (".nrrd", ".nhdr", ".mha", ".mhd")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
AIR_HU = -1024.0


class VolumeError(ValueError):
  """A volume that cannot be used, with the file and the reason in the message."""

  def __init__(self, path: str | os.PathLike | None, problem: str):
    self.path, self.problem = str(path) if path else "<array>", problem or "unusable volume (no reason given)"
    super().__init__(f"{self.path}: {self.problem}")


TRUST_AFFINE = ("", "sform", "qform")  # config.trust_affine
INPUT_KEYS = ("assume_orientation", "trust_affine", "assume_hu", "limits")  # configs/input_options.py


@dataclasses.dataclass(frozen=True)
class _Limits:
  """config.limits: its keys (ReadOptions checks the values)."""

  max_voxels: int
  max_gb: float
  max_spacing_mm: float
  min_side_voxels: int


@dataclasses.dataclass
class ReadOptions:
  """Limits and user overrides for reading a volume (config keys of the same names, see configs/input_options.py).

  assume_orientation: axis codes (e.g. 'RAS', 'LPS') for a NIfTI whose qform and sform codes are both 0.
  trust_affine: 'sform' or 'qform' when both are set but disagree.
  assume_hu: accept intensities the CT check doubts (see check_ct).
  max_voxels / max_gb: refuse, from the header, volumes larger than this (voxels / GB as stored).
  max_spacing_mm: refuse voxel spacings above this (slices that far apart are not a volume).
  min_side_voxels: refuse volumes thinner than this along any axis (smaller ones up to a patch are padded).
  """

  assume_orientation: str = ""
  trust_affine: str = ""
  assume_hu: bool = False
  max_voxels: int = 1024 * 1024 * 2000
  max_gb: float = 8.0
  max_spacing_mm: float = 20.0
  min_side_voxels: int = 4
  # The defaults above are what a library caller gets (ReadOptions()); tests/test_config_specs.py checks
  # that they equal configs/input_options.py, where the command line's defaults live.

  def __post_init__(self):
    sections.text("config.assume_orientation", self.assume_orientation)
    if self.assume_orientation:
      try:
        geometry.affine_from_codes(self.assume_orientation, (1.0, 1.0, 1.0))
      except ValueError as e:
        raise sections.ConfigError(f"config.assume_orientation={self.assume_orientation!r}: {e}") from None
    sections.choice("config.trust_affine", self.trust_affine, TRUST_AFFINE)
    sections.flag("config.assume_hu", self.assume_hu)
    sections.count("config.limits.max_voxels", self.max_voxels)
    sections.positive("config.limits.max_gb", self.max_gb)
    sections.positive("config.limits.max_spacing_mm", self.max_spacing_mm)
    sections.count("config.limits.min_side_voxels", self.min_side_voxels)

  @classmethod
  def from_section(cls, config: Any) -> ReadOptions:
    """Strictly from a task / prepare config (checks.py): config.limits must hold exactly LIMIT_KEYS."""
    limits = sections.from_config(_Limits, config.limits, "config.limits")
    return cls(
      assume_orientation=config.assume_orientation,
      trust_affine=config.trust_affine,
      assume_hu=config.assume_hu,
      **dataclasses.asdict(limits),
    )

  @classmethod
  def from_config(cls, config: Any) -> ReadOptions:
    """From a task/prepare config; keys it lacks keep their defaults."""
    get = lambda c, k, d: c.get(k, d) if c is not None and hasattr(c, "get") else d
    limits = get(config, "limits", None)
    d = cls()
    return cls(
      assume_orientation=str(get(config, "assume_orientation", d.assume_orientation) or ""),
      trust_affine=str(get(config, "trust_affine", d.trust_affine) or ""),
      assume_hu=bool(get(config, "assume_hu", d.assume_hu)),
      max_voxels=int(get(limits, "max_voxels", d.max_voxels)),
      max_gb=float(get(limits, "max_gb", d.max_gb)),
      max_spacing_mm=float(get(limits, "max_spacing_mm", d.max_spacing_mm)),
      min_side_voxels=int(get(limits, "min_side_voxels", d.min_side_voxels)),
    )


@dataclasses.dataclass
class Source:
  """Where a volume came from, enough to write a result back on exactly the same grid.

  kind: 'nifti' | 'dicom' | 'itk'; shape/affine: the file's voxel order and its affine (RAS world);
  ornt: nibabel orientation transform from the file's voxel order to RAS; header: the NIfTI header
  (qform/sform codes); dicom_files: the series' files sorted along the slice normal (file order).
  """

  kind: str
  path: str
  shape: tuple[int, ...]
  affine: np.ndarray
  ornt: np.ndarray
  header: Any = None
  dicom_files: tuple[str, ...] = ()
  derived: bool = False  # a resampled grid: the header's qform/sform are replaced by `affine`


@dataclasses.dataclass
class Volume:
  """Array in RAS voxel order (axis 0 -> Right, 1 -> Anterior, 2 -> Superior) and its RAS affine."""

  data: np.ndarray
  affine: np.ndarray
  path: str = ""
  source: Source | None = None

  @property
  def spacing(self) -> tuple[float, float, float]:
    return geometry.spacing_of(self.affine)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.data.shape)

  def world(self, index: np.ndarray) -> np.ndarray:
    """World (mm, RAS) coordinates of voxel indices (..., 3)."""
    index = np.asarray(index, np.float64)
    return index @ self.affine[:3, :3].T + self.affine[:3, 3]


def check_size(path: str, shape: tuple[int, ...], itemsize: int, options: ReadOptions) -> None:
  """Refuse, before allocating, volumes over the voxel or byte limit (gzip bombs, corrupt headers)."""
  dims = [int(s) for s in shape]
  if any(s <= 0 for s in dims):
    raise VolumeError(path, f"header gives a non-positive dimension in shape {tuple(dims)}")
  voxels = int(np.prod(np.array(dims, dtype=object)))
  if voxels > options.max_voxels:
    raise VolumeError(
      path,
      f"header claims {'x'.join(map(str, dims))} = {voxels:.3g} voxels, more than "
      f"limits.max_voxels={options.max_voxels:.3g}; raise --config.limits.max_voxels if it is real",
    )
  gb = voxels * itemsize / 1e9
  if gb > options.max_gb:
    raise VolumeError(
      path,
      f"header claims {gb:.3g} GB of voxel data when decompressed, more than "
      f"limits.max_gb={options.max_gb:g}; raise --config.limits.max_gb if it is real",
    )


def check_geometry(path: str, shape: tuple[int, ...], affine: np.ndarray, options: ReadOptions) -> None:
  """One-line refusals for voxel grids that would silently put data in the wrong place."""
  affine = np.asarray(affine, np.float64)
  if not np.all(np.isfinite(affine)):
    raise VolumeError(path, "affine contains NaN/inf")
  det = float(np.linalg.det(affine[:3, :3]))
  if abs(det) < 1e-6:
    raise VolumeError(path, f"singular affine (det={det:.3g}): voxel-to-world mapping is broken")
  shear = geometry.shear_degrees(affine)
  if shear > 0.01:
    raise VolumeError(
      path,
      f"sheared voxel grid (axes {shear:.2f} degrees from orthogonal, e.g. gantry tilt): "
      "resample it onto an orthogonal grid first (dcm2niix corrects gantry tilt when converting)",
    )
  spacing = geometry.spacing_of(affine)
  if max(spacing) > options.max_spacing_mm:
    axis = int(np.argmax(spacing))
    raise VolumeError(
      path,
      f"voxel spacing {spacing[axis]:.4g} mm along axis {axis} exceeds limits.max_spacing_mm="
      f"{options.max_spacing_mm:g} (slice gap?): such slices cannot be interpolated into a volume; "
      "raise --config.limits.max_spacing_mm if it is intended",
    )
  if min(shape[:3]) < options.min_side_voxels:
    raise VolumeError(
      path,
      f"shape {tuple(shape[:3])} is thinner than limits.min_side_voxels="
      f"{options.min_side_voxels} along some axis (a slab, not a volume); volumes at least that "
      "thick but smaller than the model patch are padded with air, as in training",
    )


def load(
  path: str | os.PathLike, *, is_mask: bool = False, canonical: bool = True, options: ReadOptions | None = None
) -> Volume:
  """Load a 3D volume (NIfTI file, DICOM series folder or file, NRRD/MHA), reoriented to RAS.

  Images come back as float32 (scaling applied), masks as int16 labels. Raises VolumeError on unreadable
  or truncated files, non-3D data (4D with a singleton last axis is squeezed), RGB, broken geometry (see
  check_geometry), sizes over the limits, NaN/inf voxels, or non-integer mask labels.
  """
  path = str(path)
  options = options or ReadOptions()
  if not os.path.exists(path):
    raise VolumeError(path, "file does not exist")
  lower = path.lower()
  if (
    os.path.isdir(path)
    or lower.endswith(".dcm")
    or (not lower.endswith(NIFTI_EXTENSIONS + ITK_EXTENSIONS) and is_dicom_file(path))
  ):
    from meddiff_jax.data import dicom

    vol = dicom.load_series(path, options)
  elif lower.endswith(ITK_EXTENSIONS):
    vol = _load_itk(path, options)
  else:
    vol = _load_nifti(path, options, is_mask)
  if canonical:
    vol = canonical_ras(vol)
  if is_mask:
    data = vol.data
    if np.issubdtype(data.dtype, np.floating):
      if not np.all(np.isfinite(data)) or not np.allclose(data, np.round(data)):
        raise VolumeError(path, "mask has non-integer or non-finite labels")
    vol.data = np.asarray(np.round(data), np.int16)
  else:
    vol.data = np.asarray(vol.data, np.float32)
    bad = ~np.isfinite(vol.data)
    if bad.any():
      raise VolumeError(path, f"{int(bad.sum())} NaN/inf voxels")
  return vol


def is_dicom_file(path: str) -> bool:
  try:
    with open(path, "rb") as f:
      return f.read(132)[128:132] == b"DICM"
  except OSError:
    return False


def canonical_ras(vol: Volume) -> Volume:
  data, affine, ornt = geometry.to_ras(vol.data, vol.affine)
  src = vol.source
  if src is not None:
    src = dataclasses.replace(src, ornt=ornt)
  return Volume(data=data, affine=affine, path=vol.path, source=src)


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


def _nifti_affine(img, path: str, options: ReadOptions) -> np.ndarray:
  """The affine to trust, refusing unknown orientation, bad pixdim and qform/sform disagreement."""
  hdr = img.header
  zooms = _raw_pixdim(path)
  if zooms is None:
    zooms = np.asarray(hdr["pixdim"][1:4], np.float64)
  if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
    raise VolumeError(
      path,
      f"pixdim {tuple(float(z) for z in zooms)} has zero, negative or NaN voxel sizes "
      "(nibabel would silently use 1 mm): fix the header's voxel size",
    )
  qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
  if options.assume_orientation:
    return geometry.affine_from_codes(options.assume_orientation, tuple(zooms))
  if qcode == 0 and scode == 0:
    raise VolumeError(
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
        raise VolumeError(path, f"{name} contains NaN/inf")
    dist = geometry.corner_distance_mm(qform, sform, img.shape)
    if dist > 0.5:
      raise VolumeError(
        path,
        f"qform and sform disagree by up to {dist:.3g} mm at the volume corners (sheared or "
        "tilt-corrected sform?): set --config.trust_affine=sform or qform if you know which is right",
      )
  return np.asarray(sform if scode > 0 else qform, np.float64)


def _load_nifti(path: str, options: ReadOptions, is_mask: bool) -> Volume:
  try:
    img = nib.load(path)
  except Exception as e:  # nibabel raises many types for bad headers
    raise VolumeError(path, f"not a readable NIfTI ({type(e).__name__}: {e})") from e
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise VolumeError(path, f"not a NIfTI image ({type(img).__name__})")
  if img.get_data_dtype().names:
    raise VolumeError(path, f"RGB/structured voxel type {img.get_data_dtype()}; expected a scalar CT volume")
  check_size(path, img.shape, img.get_data_dtype().itemsize, options)
  shape = img.shape
  if len(shape) == 4 and shape[3] == 1:
    shape = shape[:3]
  elif len(shape) != 3:
    raise VolumeError(path, f"expected a 3D volume, got shape {shape}")
  if min(shape) < 2:
    raise VolumeError(path, f"degenerate shape {shape} (a 2D slice, not a volume)")
  affine = _nifti_affine(img, path, options)
  check_geometry(path, shape, affine, options if not is_mask else dataclasses.replace(options, min_side_voxels=2))
  try:
    data = np.asarray(img.dataobj)
  except (EOFError, zlib.error, OSError, ValueError) as e:
    raise VolumeError(path, f"truncated or corrupt data ({type(e).__name__}: {e})") from e
  data = data.reshape(shape)
  source = Source(
    "nifti", path, tuple(shape), affine, np.array([[0, 1], [1, 1], [2, 1]], np.float64), header=img.header.copy()
  )
  return Volume(data=data, affine=affine, path=path, source=source)


def _load_itk(path: str, options: ReadOptions) -> Volume:
  """NRRD / MetaImage through SimpleITK (ITK's LPS world converted to RAS); header checked before reading."""
  import SimpleITK as sitk

  reader = sitk.ImageFileReader()
  reader.SetFileName(path)
  try:
    reader.ReadImageInformation()
  except RuntimeError as e:
    raise VolumeError(path, f"not a readable NRRD/MetaImage ({str(e).strip().splitlines()[-1][:200]})") from e
  size = reader.GetSize()
  if len(size) != 3 or reader.GetNumberOfComponents() != 1:
    raise VolumeError(
      path, f"expected a 3D scalar volume, got size {size} with {reader.GetNumberOfComponents()} components"
    )
  itemsize = np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], reader.GetPixelID())).dtype).itemsize
  check_size(path, size, itemsize, options)
  spacing = np.asarray(reader.GetSpacing(), np.float64)
  if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise VolumeError(path, f"spacing {tuple(spacing)} has zero, negative or NaN voxel sizes")
  lps = np.eye(4)
  lps[:3, :3] = np.asarray(reader.GetDirection(), np.float64).reshape(3, 3) * spacing
  lps[:3, 3] = reader.GetOrigin()
  affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
  check_geometry(path, tuple(size), affine, options)
  try:
    data = sitk.GetArrayFromImage(reader.Execute()).transpose(2, 1, 0)  # ITK arrays are (z, y, x)
  except RuntimeError as e:
    raise VolumeError(path, f"truncated or corrupt data ({str(e).strip().splitlines()[-1][:200]})") from e
  source = Source("itk", path, tuple(size), affine, np.array([[0, 1], [1, 1], [2, 1]], np.float64))
  return Volume(data=np.ascontiguousarray(data), affine=affine, path=path, source=source)


def check_ct(volume: Volume, assume_hu: bool = False) -> None:
  """Reject data that does not look like CT in Hounsfield units (override: assume_hu=True).

  CT in HU has air (< -200) or, in a crop without air, fat (-200..-30 HU) around soft tissue or contrast-filled
  vessels (median -150..600). MR, 0-255 images and DICOM without rescale slope/intercept (air at 0, water near 1000)
  have neither. A constant volume and values outside any CT range are refused even with assume_hu.
  """
  data = volume.data
  lo, hi = float(data.min()), float(data.max())
  if hi - lo < 1e-3:
    raise VolumeError(volume.path, f"constant volume (all voxels = {lo:g})")
  if lo < -10_000 or hi > 40_000:
    raise VolumeError(volume.path, f"intensities in [{lo:g}, {hi:g}] are outside any CT HU range")
  if assume_hu:
    return
  sample = data.ravel()[:: max(1, data.size // 2_000_000)]  # a strided sample keeps this cheap on big scans
  air = float(np.mean(sample < -200.0))
  fat = float(np.mean((sample >= -200.0) & (sample < -30.0)))
  median = float(np.median(sample))
  hint = "override with --config.assume_hu=true if it really is CT in HU"
  if air < 1e-3 and (fat < 1e-3 or not -150.0 <= median <= 600.0):
    raise VolumeError(
      volume.path,
      f"intensities in [{lo:g}, {hi:g}] (median {median:g}) have neither air (< -200 HU) "
      "nor fat (-200..-30 HU): not CT in Hounsfield units (MR, a 0-255 image, or DICOM without "
      f"rescale slope/intercept?); {hint}",
    )
  if median > 600.0:
    raise VolumeError(
      volume.path,
      f"median intensity {median:g} is far above soft tissue: looks like CT stored "
      f"without its rescale intercept (raw values); {hint}",
    )


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
  raise VolumeError(
    crop.path,
    f"affine places this crop at voxel offset {tuple(int(c) for c in claimed_offset)} of "
    f"{parent.path}, but its voxels match the parent at {where}: the crop's affine was not "
    "updated (shift its origin by the crop offset)",
  )


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
  """Shape `resample` gives: as many new voxels as fit inside the old voxel-centre extent."""
  return tuple(int(np.floor((n - 1) * s / t + 1e-6)) + 1 for n, s, t in zip(shape, spacing, new_spacing))


def resample(
  volume: Volume, new_spacing: tuple[float, float, float], *, order: int = 1, fill: float | None = None
) -> Volume:
  """Resample to `new_spacing` mm on the same axes, starting at the same first voxel centre; the affine is
  exact and every new voxel lies inside the old data (no border is invented). order=1 trilinear for
  images, 0 nearest for masks. `fill` only matters for grids reaching past the data (resample_like)."""
  shape, affine = geometry.resample_grid(volume.shape, volume.affine, new_spacing)
  return resample_like(volume, shape, affine, order=order, fill=fill)


def resample_like(
  volume: Volume, shape: tuple[int, ...], affine: np.ndarray, *, order: int = 1, fill: float | None = None
) -> Volume:
  """`volume` sampled at the voxel centres of the grid (shape, affine), both in RAS world mm. Positions
  up to one voxel past the data take the nearest edge value; farther out, `fill` (default: air for images,
  0 for masks)."""
  if fill is None:
    fill = AIR_HU if order else 0.0
  data = geometry.resample_to(volume.data, volume.affine, tuple(shape), affine, order=order, fill=fill)
  affine = np.asarray(affine, np.float64)
  source = None
  if volume.source is not None:  # the new grid in the input file's voxel order, for save_like
    src = volume.source
    file_shape, file_affine = geometry.file_grid(tuple(shape), affine, src.ornt)
    source = dataclasses.replace(
      src,
      kind="nifti" if src.kind == "nifti" else "derived",
      shape=file_shape,
      affine=file_affine,
      dicom_files=(),
      derived=True,
    )
  return Volume(data=data, affine=affine, path=volume.path, source=source)


def save(volume: Volume, path: str | os.PathLike, dtype: np.dtype | None = None) -> None:
  """Write a NIfTI whose affine (qform and sform) places the data where `volume.affine` says."""
  data = volume.data if dtype is None else volume.data.astype(dtype)
  img = nib.Nifti1Image(data, volume.affine)
  img.set_qform(volume.affine, code=1)
  img.set_sform(volume.affine, code=1)
  img.header.set_xyzt_units("mm")
  os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
  nib.save(img, str(path))


def is_directory_output(path: str) -> bool:
  return str(path).endswith(os.sep) or os.path.isdir(str(path))


def save_like(
  values_ras: np.ndarray, like: Volume, path: str | os.PathLike, dtype: np.dtype | None = None, *, description: str = ""
) -> str:
  """Write `values_ras` (on `like`'s RAS grid) on the grid of the file `like` was read from: same shape,
  voxel order and affine; for NIfTI the same qform/sform (and their codes); a DICOM series folder when
  `path` is a directory and the input was DICOM (new series UIDs, `description` as SeriesDescription)."""
  path = str(path)
  values_ras = np.asarray(values_ras)
  if values_ras.shape != like.shape:
    raise VolumeError(path, f"result shape {values_ras.shape} is not the input grid {like.shape}")
  src = like.source
  if src is None:  # an in-memory volume: its RAS grid is all there is
    if is_directory_output(path):
      raise VolumeError(path, "a directory output (DICOM series) needs a DICOM input; give a .nii.gz path")
    save(Volume(values_ras, like.affine), path, dtype)
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
      raise VolumeError(
        path,
        f"a directory output writes a DICOM series on the input series' grid, but {why}; give a .nii.gz output path",
      )
    from meddiff_jax.data import dicom

    dicom.write_series(data, src, path, description)
    return path
  if dtype is not None:
    data = _cast(data, dtype)
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  if src.kind == "nifti" and src.header is not None:
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
  else:
    save(Volume(data, src.affine), path, dtype)
  return path


def _cast(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
  dtype = np.dtype(dtype)
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    return np.clip(np.round(data), info.min, info.max).astype(dtype)
  return data.astype(dtype)
