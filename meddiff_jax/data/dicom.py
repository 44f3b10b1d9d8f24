"""DICOM CT series in and out.

Reader: pydicom, with pylibjpeg + pylibjpeg-openjpeg as its decoders for JPEG / JPEG 2000 transfer
syntaxes (the pip-installable, maintained stack the DICOM world uses from Python). pydicom rather than
SimpleITK/GDCM here because the geometry must be ours to check: slices are sorted by ImagePositionPatient
projected on the slice normal (never InstanceNumber), the slice spacing comes from those positions, and
uneven spacing or gantry tilt is refused instead of silently assumed uniform; and because writing a
derived series (same geometry and patient/study, new UIDs) is plain dataset editing in pydicom.

World coordinates: DICOM patient space is LPS; volumes here are RAS (x and y negated).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from meddiff_jax.data import volumes

# Slices closer than this (mm) along the normal are duplicates; spacing may vary by this much.
POSITION_TOLERANCE_MM = 0.05


def is_dicom_file(path: str) -> bool:
  try:
    with open(path, "rb") as f:
      return f.read(132)[128:132] == b"DICM"
  except OSError:
    return False


def _read_header(path: str):
  import pydicom

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # malformed private tags: tolerated, never read
    return pydicom.dcmread(path, stop_before_pixels=True)


def scan(paths: Iterable[str]) -> tuple[dict[str, list[tuple[str, Any]]], list[dict[str, str]]]:
  """Group DICOM files by SeriesInstanceUID. Returns ({uid: [(path, header), ...]}, skipped) where skipped
  lists every DICOM file that is not part of a usable CT series, with the reason (localizer, other modality,
  no image). Files that are not DICOM at all are ignored here (the caller reports them)."""
  from pydicom.errors import InvalidDicomError

  series: dict[str, list[tuple[str, Any]]] = {}
  skipped = []
  for path in paths:
    try:
      ds = _read_header(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError) as e:
      if is_dicom_file(path):
        skipped.append({"path": path, "reason": f"unreadable DICOM ({type(e).__name__}: {e})"})
      continue
    modality = str(ds.get("Modality", "") or "")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "Rows" not in ds or "Columns" not in ds:
      skipped.append({"path": path, "reason": f"DICOM without an image (SOP class {ds.get('SOPClassUID', '?')})"})
    elif modality != "CT":
      skipped.append({"path": path, "reason": f"DICOM modality {modality or 'missing'}, not CT"})
    elif "LOCALIZER" in image_type or "SCOUT" in image_type:
      skipped.append({"path": path, "reason": "CT localizer (scout) image, not part of a volume"})
    else:
      series.setdefault(series_key(path, ds), []).append((path, ds))
  return series, skipped


def series_key(path: str, ds: Any) -> str:
  """SeriesInstanceUID; anonymised files with it blanked are grouped by folder, study, series number,
  description, image size and orientation instead (what dcm2niix also falls back on)."""
  uid = str(ds.get("SeriesInstanceUID", "") or "")
  if uid:
    return uid
  iop = tuple(round(float(v), 4) for v in (ds.get("ImageOrientationPatient") or ()))
  return "|".join(
    str(x)
    for x in (
      "no-uid",
      os.path.dirname(os.path.realpath(path)),
      ds.get("StudyInstanceUID", ""),
      ds.get("SeriesNumber", ""),
      ds.get("SeriesDescription", ""),
      ds.get("Rows"),
      ds.get("Columns"),
      iop,
    )
  )


def list_files(directory: str) -> list[str]:
  """Regular files under `directory`, each real directory visited once (symlink loops cannot repeat)."""
  seen, files = set(), []
  for root, dirs, names in os.walk(directory, followlinks=True):
    key = os.path.realpath(root)
    if key in seen:
      dirs[:] = []
      continue
    seen.add(key)
    dirs.sort()
    files += [os.path.join(root, n) for n in sorted(names) if os.path.isfile(os.path.join(root, n))]
  return files


def load_series(path: str, options: volumes.ReadOptions | None = None) -> volumes.Volume:
  """The CT series in folder `path` (or the series a single DICOM file `path` belongs to)."""
  options = options or volumes.ReadOptions()
  if os.path.isdir(path):
    series, skipped = scan(list_files(path))
    if not series:
      why = f" (skipped: {skipped[0]['reason']}{' and others' if len(skipped) > 1 else ''})" if skipped else ""
      raise volumes.VolumeError(path, f"no CT DICOM series in this folder{why}")
    if len(series) > 1:
      names = ", ".join(f"{str(v[0][1].get('SeriesDescription', '') or '?')} ({len(v)} files)" for v in series.values())
      raise volumes.VolumeError(
        path,
        f"{len(series)} CT series in this folder ({names}); give a folder that holds one "
        "series (prepare handles folders of many)",
      )
    return read_series(next(iter(series.values())), path, options)
  series, skipped = scan([path])
  if not series:
    raise volumes.VolumeError(path, skipped[0]["reason"] if skipped else "not a readable DICOM file")
  uid = next(iter(series))
  folder, _ = scan(
    os.path.join(os.path.dirname(os.path.abspath(path)), n)
    for n in sorted(os.listdir(os.path.dirname(os.path.abspath(path))))
  )
  return read_series(folder[uid], path, options)


def read_series(files: list[tuple[str, Any]], label: str, options: volumes.ReadOptions | None = None) -> volumes.Volume:
  """One series' (path, header) pairs -> Volume (RAS world, HU), geometry from the positions."""
  options = options or volumes.ReadOptions()
  headers = [ds for _, ds in files]
  first = headers[0]
  if int(first.get("NumberOfFrames", 1) or 1) > 1:
    raise volumes.VolumeError(label, "multi-frame (enhanced) DICOM is not supported: convert it with dcm2niix first")
  for key in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
    if any(key not in ds for ds in headers):
      raise volumes.VolumeError(label, f"a slice lacks {key}: the series' geometry is unknown")
  if len(files) < 2:
    raise volumes.VolumeError(label, "a single DICOM slice, not a volume")
  iop = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in headers])
  if np.abs(iop - iop[0]).max() > 1e-4:
    raise volumes.VolumeError(
      label, "slices have different ImageOrientationPatient (more than one stack in the series)"
    )
  shapes = {(int(ds.Rows), int(ds.Columns)) for ds in headers}
  pixel = {tuple(round(float(v), 6) for v in ds.PixelSpacing) for ds in headers}
  if len(shapes) > 1 or len(pixel) > 1:
    raise volumes.VolumeError(label, f"slices differ in size {sorted(shapes)} or pixel spacing {sorted(pixel)}")
  row_dir, col_dir = iop[0, :3], iop[0, 3:]
  normal = np.cross(row_dir, col_dir)
  positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
  along = positions @ normal
  order = np.argsort(along, kind="stable")
  along, positions = along[order], positions[order]
  gaps = np.diff(along)
  if np.any(gaps < POSITION_TOLERANCE_MM):
    raise volumes.VolumeError(
      label,
      f"{int(np.sum(gaps < POSITION_TOLERANCE_MM)) + 1} slices share a position "
      "(several acquisitions or phases in one series?): split the series",
    )
  spacing = float(np.median(gaps))
  if np.max(np.abs(gaps - spacing)) > max(POSITION_TOLERANCE_MM, 0.01 * spacing):
    raise volumes.VolumeError(
      label,
      f"non-uniform slice spacing ({gaps.min():.4g} to {gaps.max():.4g} mm between "
      "slice positions; missing slices?): a regular grid cannot hold it; export a uniformly "
      "spaced reconstruction or remove the stray slices",
    )
  offsets = positions - positions[0]
  sideways = offsets - np.outer(offsets @ normal, normal)
  if np.max(np.linalg.norm(sideways, axis=1)) > POSITION_TOLERANCE_MM:
    tilt = np.degrees(np.arctan2(np.linalg.norm(sideways[-1]), abs(offsets[-1] @ normal)))
    raise volumes.VolumeError(
      label,
      f"gantry tilt or sheared stack (slices step {tilt:.2f} degrees off the slice "
      "normal): convert with dcm2niix, which corrects gantry tilt, and use its NIfTI",
    )
  rows, cols = next(iter(shapes))
  dr, dc = (float(v) for v in first.PixelSpacing)  # DICOM: (between rows, between columns)
  shape = (cols, rows, len(files))  # x: along a row (column index), y: down the columns (row index), z: slices
  volumes.check_size(label, shape, 4, options)
  lps = np.eye(4)
  lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * dc, col_dir * dr, normal * spacing, positions[0]
  affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
  volumes.check_geometry(label, shape, affine, options)
  paths = [files[i][0] for i in order]
  data = np.empty(shape, np.float32)
  for k, path in enumerate(paths):
    data[:, :, k] = _slice_hu(path, label).T
  source = volumes.Source(
    "dicom", label, shape, affine, np.array([[0, 1], [1, 1], [2, 1]], np.float64), dicom_files=tuple(paths)
  )
  return volumes.Volume(data=data, affine=affine, path=label, source=source)


def _slice_hu(path: str, label: str) -> np.ndarray:
  """One slice in HU: rescale slope/intercept applied, PixelPaddingValue (outside the scan) set to air."""
  import pydicom

  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ds = pydicom.dcmread(path)
      raw = ds.pixel_array
  except Exception as e:  # decoders raise many types (missing plugin, corrupt stream)
    raise volumes.VolumeError(
      label, f"cannot decode pixels of {os.path.basename(path)} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    ) from e
  if raw.ndim != 2:
    raise volumes.VolumeError(
      label, f"{os.path.basename(path)}: pixel array of shape {raw.shape}, expected one grey-level slice"
    )
  slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
  hu = raw.astype(np.float32) * slope + intercept
  pad = ds.get("PixelPaddingValue")
  if pad is not None:
    limit = ds.get("PixelPaddingRangeLimit")
    lo, hi = (min(pad, limit), max(pad, limit)) if limit is not None else (pad, pad)
    hu[(raw >= lo) & (raw <= hi)] = volumes.AIR_HU
  return hu


def write_series(data: np.ndarray, source: volumes.Source, out_dir: str, description: str = "") -> list[str]:
  """A new series on the source's exact geometry and patient/study: new Series/SOP Instance UIDs, ImageType
  DERIVED\\SECONDARY, `description` as SeriesDescription. `data` is in the source's voxel order."""
  import pydicom
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid

  if tuple(data.shape) != tuple(source.shape):
    raise volumes.VolumeError(out_dir, f"result shape {data.shape} is not the input series' {source.shape}")
  inputs = {os.path.realpath(os.path.dirname(p)) for p in source.dicom_files}
  if os.path.realpath(out_dir) in inputs:
    raise volumes.VolumeError(out_dir, "is the input series' folder; write the new series to another folder")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise volumes.VolumeError(out_dir, "output folder is not empty; give a new or empty folder for the DICOM series")
  os.makedirs(out_dir, exist_ok=True)
  values = np.asarray(data, np.float64)
  integral = np.allclose(values, np.round(values)) and values.min() >= -32768 and values.max() <= 32767
  slope = 1.0 if integral else max(float(np.abs(values).max()), 1e-6) / 30000.0
  stored = np.clip(np.round(values / slope), -32768, 32767).astype(np.int16)
  series_uid = generate_uid()
  written = []
  for k, path in enumerate(source.dicom_files):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ds = pydicom.dcmread(path)
    ds.remove_private_tags()  # vendor blobs may not survive re-encoding, and describe the original pixels
    for key in (
      "PixelPaddingValue",
      "PixelPaddingRangeLimit",
      "SmallestImagePixelValue",
      "LargestImagePixelValue",
      "LossyImageCompression",
      "LossyImageCompressionRatio",
      "LossyImageCompressionMethod",
    ):
      if key in ds:
        del ds[key]
    ds.set_pixel_data(np.ascontiguousarray(stored[:, :, k].T), "MONOCHROME2", 16)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}"[:16], "0"
    original_type = [str(v) for v in (ds.get("ImageType") or [])]
    ds.ImageType = ["DERIVED", "SECONDARY"] + original_type[2:]
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesDescription = (description or "meddiff_jax result")[:64]
    ds.DerivationDescription = (description or "meddiff_jax result")[:1024]
    ds.SeriesNumber = int(ds.get("SeriesNumber", 0) or 0) + 1000
    out = os.path.join(out_dir, f"{k:04d}.dcm")
    ds.save_as(out, enforce_file_format=True)
    written.append(out)
  return written
