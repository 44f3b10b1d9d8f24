"""CT volumes in memory: the `Volume` type (RAS voxel order), its `Source` (the file's own grid, for writing a
result back), `ReadOptions` (limits and user overrides), `VolumeError`, the checks every reader and task applies
(size and geometry from the header, CT in HU, same grid, crop position) and resampling.

Every error is a `VolumeError` whose message starts with the file name and says what is wrong (and which
override exists, if any), so a preparation run can log it and skip the file and a task can stop with one
line. The format readers (nifti.py, dicom.py, itk.py) check geometry and size from the header before any
voxel is read; volume_io.py picks the reader by format and writes results back.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from meddiff_jax import sections
from meddiff_jax.data import geometry

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

  kind: 'nifti' | 'dicom' | 'itk' | 'array' (volume_io.from_array: `path` names it) | 'derived' (resampled);
  shape/affine: the file's voxel order and its affine (RAS world);
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


def canonical_ras(vol: Volume) -> Volume:
  data, affine, ornt = geometry.to_ras(vol.data, vol.affine)
  src = vol.source
  if src is not None:
    src = dataclasses.replace(src, ornt=ornt)
  return Volume(data=data, affine=affine, path=vol.path, source=src)


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
