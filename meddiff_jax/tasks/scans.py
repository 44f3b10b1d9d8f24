"""A task's scan, before and after the model: what is decided about it, and how the result goes back.

Before anything is computed (and before the model loads), `open_scan` reads the CT and its label map, refuses what
cannot be used in one line naming the flag, and decides, saying so on the console:
  - the region (`--config.region`: given; `auto`: from the TotalSegmentator label map's landmarks when one is given,
    else estimated from the HU, data/regions.py). A scan that spans regions is cut into region parts, each
    processed with its own condition and window and blended back across their overlap (`by_region=False`: refused).
  - the working spacing (`--config.spacing`: `checkpoint`, the spacing the network was trained at, resampled there
    and back; `input`, the scan's own grid; or mm), with what the choice costs when it differs from the scan's.
`check_output` (called by checks.task, before anything is read) keeps the user's files safe: an existing output is
refused without `--config.overwrite=True`, an output that is an input always.

After the model, `write_result` brings each part's result back onto the scan's own grid slab by slab (memory: the
scan, the output and one slab), keeps the scan's own HU where the region's window cannot represent them (a smooth
blend over `window_blend_hu` around the window's edges, `keep_outside_window`), and writes the output, then its
JSON sidecar, each to a temporary name first: an interrupted run leaves nothing half-written. `Summary` is the
closing lines a clinician-researcher reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from meddiff_jax import sections
from meddiff_jax.data import dicom, geometry, preprocess, regions, volume_io, volumes
from meddiff_jax.data.spec import DataSpec

AUTO = "auto"  # config.region: decided from the label map, else estimated from the scan
CHECKPOINT = "checkpoint"  # config.spacing: the checkpoint's training spacing
INPUT = "input"  # config.spacing: the scan's own grid
REGION_CHOICES = (AUTO, *preprocess.REGIONS, "unknown")
NIFTI_OUTPUTS = (".nii.gz", ".nii")
SLAB_VOXELS = 1 << 23  # voxels per slab when a result goes back onto the scan's grid (32 MB of float32)


class Refusal(sections.ConfigError):
  """A scan or output the task will not process as configured: one line naming the flag that changes it."""


def log(line: str) -> None:
  """A decision the user should see (stdout, one line, flushed before the long part starts)."""
  print(line, flush=True)


# ------------------------------------------------------------------------------------------ output safety


def sidecar_path(output: str) -> str:
  """OUTPUT.json beside a task's output (OUTPUT.nii.gz, OUTPUT.nii or a DICOM folder OUTPUT/)."""
  stem = output.rstrip("/\\")
  for ext in NIFTI_OUTPUTS:
    if stem.endswith(ext):
      return stem[: -len(ext)] + ".json"
  return stem + ".json"


def is_dicom_input(path: str) -> bool:
  return (
    os.path.isdir(path)
    or path.lower().endswith(".dcm")
    or (not path.lower().endswith(volume_io.IMAGE_EXTENSIONS) and os.path.isfile(path) and dicom.is_dicom_file(path))
  )


def _inside(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output(
  output: str, inputs: Mapping[str, str], *, overwrite: bool, dicom_input: bool, folder_ok: bool = True
) -> None:
  """Refuse, before anything is read, an output that would lose a user's file or cannot be written.

  `inputs`: flag -> path of every file the task reads (input, labels, mask, reference). An output that is one of
  them (the same file, the same DICOM folder, a folder inside it, or a link to any of these) is always refused;
  an existing output (or its JSON sidecar) only without `overwrite`. A folder output (ends with '/' or exists as
  one) is a DICOM series and needs a DICOM input (and `folder_ok`: a result on the input series' grid); anything
  else must be .nii.gz or .nii. The folder the output goes in is created now and must be writable.
  """
  if not output:
    raise Refusal("--config.output=PATH.nii.gz (or DIR/ for a DICOM series) is required")
  real = os.path.realpath(output)
  for flag, path in inputs.items():
    if not path:
      continue
    source = os.path.realpath(path)
    folder = source if os.path.isdir(source) else None
    if folder is None and is_dicom_input(path):  # a DICOM file stands for its series' folder
      folder = os.path.dirname(source)
    if real == source or (folder is not None and _inside(real, folder)):
      what = "is" if real == source else "lies in"
      raise Refusal(
        f"--config.output={output!r} {what} --config.{flag}={path!r}: a task never writes over or into its inputs; "
        "give a new path"
      )
  folder_output = output.endswith(("/", os.sep)) or os.path.isdir(output)
  if folder_output:
    if not dicom_input:
      raise Refusal(
        f"--config.output={output!r} is a folder (a DICOM series), but the input is not DICOM; give OUT.nii.gz"
      )
    if not folder_ok:
      raise Refusal(
        f"--config.output={output!r} is a folder (a DICOM series on the input series' grid), but this task writes "
        "on another grid; give OUT.nii.gz"
      )
    if os.path.isdir(output) and os.listdir(output):
      raise Refusal(
        f"--config.output={output!r} is a folder that is not empty; a DICOM series goes into a new or empty folder "
        "(--config.overwrite does not empty folders)"
      )
  elif not output.lower().endswith(NIFTI_OUTPUTS):
    raise Refusal(f"--config.output={output!r}: write .nii.gz or .nii (or DIR/ for a DICOM series from a DICOM input)")
  elif os.path.lexists(output) and not overwrite:
    raise Refusal(f"--config.output={output!r} exists; give a new path, or --config.overwrite=True to replace it")
  sidecar = sidecar_path(output)
  if os.path.lexists(sidecar) and not overwrite:
    raise Refusal(
      f"{sidecar} (the result's JSON beside --config.output) exists; give a new output path, or "
      "--config.overwrite=True to replace both"
    )
  if any(os.path.realpath(sidecar) == os.path.realpath(p) for p in inputs.values() if p):
    raise Refusal(f"{sidecar} (the result's JSON beside --config.output) is one of the inputs; give a new path")
  parent = os.path.dirname(os.path.abspath(output.rstrip("/" + os.sep)))
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise Refusal(f"--config.output={output!r}: its folder {parent} cannot be created ({e.strerror or e})") from None
  if not os.access(parent, os.W_OK | os.X_OK):
    raise Refusal(f"--config.output={output!r}: its folder {parent} is not writable")


# ------------------------------------------------------------------------------------------ reading and deciding


@dataclasses.dataclass(frozen=True)
class Scan:
  """A task's input, read and decided: the CT and its label map (on its grid) as read, the region parts it is
  processed in (one, usually), the working spacing (None: the scan's own grid) and, in words, how each was
  decided (`region_note`, `spacing_note`: the summary and the sidecar repeat them)."""

  original: volumes.Volume
  labels: volumes.Volume | None
  parts: tuple[regions.Part, ...]
  region_note: str
  spacing: tuple[float, float, float] | None
  spacing_note: str

  @property
  def region(self) -> str:
    """The region, or the regions in order along the body ('abdomen + chest')."""
    return " + ".join(p.region for p in self.parts)

  def without_voxels(self) -> Scan:
    """The same scan holding no voxel data (a read-only placeholder of its shape): for an epilogue that needs the
    grid and the file it came from but not the HU (an anomaly map), so the scan's memory is free for the output."""
    placeholder = np.broadcast_to(np.zeros((), self.original.data.dtype), self.original.shape)
    return dataclasses.replace(self, original=dataclasses.replace(self.original, data=placeholder), labels=None)

  def part(self, part: regions.Part) -> tuple[volumes.Volume, volumes.Volume | None]:
    """The scan (and label map) cut to one part: the volumes themselves when the part is the whole scan."""
    if part.start == 0 and part.stop == self.original.shape[part.axis]:
      return self.original, self.labels
    cut = lambda v: None if v is None else regions.crop(v, part.axis, part.start, part.stop)
    return cut(self.original), cut(self.labels)


def load_labels(
  path: str | volumes.Volume, original: volumes.Volume, options: volumes.ReadOptions
) -> volumes.Volume | None:
  """`--config.labels` (or a label map given as a Volume): a TotalSegmentator label map on the input's grid (else
  one line saying how it differs)."""
  if isinstance(path, volumes.Volume):
    labels, name = path, f"labels={path.path}"
  elif not path:
    return None
  else:
    labels, name = volume_io.load(path, is_mask=True, options=options), f"--config.labels={path!r}"
  if labels.shape != original.shape or not np.allclose(labels.affine, original.affine, atol=1e-2):
    how = (
      f"shape {labels.shape}, the input's {original.shape}"
      if labels.shape != original.shape
      else f"spacing {tuple(round(s, 3) for s in labels.spacing)} mm at origin {np.round(labels.affine[:3, 3], 1)}, "
      f"the input's {tuple(round(s, 3) for s in original.spacing)} mm at {np.round(original.affine[:3, 3], 1)}"
    )
    raise Refusal(
      f"{name} is on another grid than the input CT ({how}); give the label map TotalSegmentator made from this scan"
    )
  return labels


def decide_region(
  setting: str, original: volumes.Volume, labels: volumes.Volume | None, class_names: Mapping[int, str]
) -> tuple[list[regions.Part], str]:
  """(parts, how they were decided): `setting` a region (given), or 'auto' (the label map, else the scan)."""
  axis = regions.superior_axis(original.affine)
  whole = lambda region: [regions.Part(region, axis, 0, original.shape[axis])]
  if setting != AUTO:
    return whole(setting), "given (--config.region)"
  choose = f"give --config.region={'|'.join(preprocess.REGIONS)}"
  if labels is not None:
    parts = regions.from_labels(labels, class_names)
    if not parts:
      raise Refusal(
        f"{original.path}: its label map --config.labels={labels.path!r} shows no landmark organ of "
        f"{'/'.join(preprocess.REGIONS)} (lungs, liver, kidneys, skull, ...), so the region is unknown; {choose}"
      )
    return parts, "from the label map's landmarks (lungs, liver / spleen, hips, skull)"
  found = regions.estimate(original.data, original.affine)
  if not found.parts:
    raise Refusal(
      f"{original.path}: cannot tell its body region from the scan ({found.evidence}); {choose} "
      "(or --config.labels=SEG.nii.gz, its TotalSegmentator label map)"
    )
  return found.parts, f"estimated from the scan: {found.evidence} (--config.region sets it)"


def _mm(spacing: Sequence[float]) -> str:
  values = [f"{s:.3g}" for s in spacing]
  return f"{values[0]} mm" if len(set(values)) == 1 else " x ".join(values) + " mm"


def decide_spacing(
  setting: tuple[float, ...] | str, trained: tuple[float, float, float] | None, scan: tuple[float, float, float]
) -> tuple[tuple[float, float, float] | None, str]:
  """(working spacing or None for the scan's own grid, what it means in words).

  `setting`: 'checkpoint' (the training spacing `trained`; the scan's grid when unknown), 'input' or mm. When the
  network runs on another grid than the scan's, the note says what is lost: details finer than the working
  spacing are not restored (resampled there and back); at the scan's grid, that the prior sees anatomy at a scale
  it was not trained on."""
  if setting == INPUT or (setting == CHECKPOINT and trained is None):
    spacing = None
  elif setting == CHECKPOINT:
    spacing = tuple(float(s) for s in trained)
  else:
    spacing = tuple(float(s) for s in setting)
  if spacing is None:
    if trained is None:
      return None, f"the scan's own {_mm(scan)} grid (the checkpoint does not record its training spacing)"
    if np.allclose(scan, trained, rtol=0.05):
      return None, f"the scan's own {_mm(scan)} grid (the checkpoint's training spacing)"
    ratio = float(np.mean(np.asarray(trained) / np.asarray(scan)))
    scale = f"{ratio:.2g}x larger" if ratio > 1 else f"{1 / ratio:.2g}x smaller"
    return None, (
      f"the scan's own {_mm(scan)} grid (--config.spacing=input); the checkpoint was trained at {_mm(trained)}, so "
      f"its prior sees anatomy {scale} than it learned; --config.spacing=checkpoint runs at {_mm(trained)} instead"
    )
  if np.allclose(scan, spacing, rtol=0.05):
    return None, f"the scan's own {_mm(scan)} grid (= the {'checkpoint' if setting == CHECKPOINT else 'given'} spacing)"
  which = "the checkpoint's training spacing" if setting == CHECKPOINT else "--config.spacing"
  if np.any(np.asarray(scan) < np.asarray(spacing) - 1e-6):
    lost = (
      f"the scan ({_mm(scan)}) is finer: details below {max(spacing):.3g} mm are not restored; "
      "--config.spacing=input runs on the scan's own grid"
      + (" (at a scale the prior was not trained on)" if setting == CHECKPOINT else "")
    )
  else:
    lost = f"the scan ({_mm(scan)}) is coarser: resampled up for the network, the result back on the scan's grid"
  return spacing, f"{_mm(spacing)}, {which} (resampled there and back); {lost}"


def open_scan(
  task: Any,
  data: DataSpec,
  *,
  by_region: bool = True,
  spacing: Any = None,
  ct: volumes.Volume | None = None,
  labels: volumes.Volume | None = None,
) -> Scan:
  """The task prologue up to the model: `task.input` read and checked as CT (`task.read`), `task.labels` on its
  grid, the region parts and the working spacing decided and printed. `spacing`: the setting (default
  `task.spacing`); `by_region=False`: a task that runs one region (a scan that spans several is refused); `ct`,
  `labels`: given in memory (meddiff_jax/api.py) instead of read."""
  original = ct
  if original is None:  # int16 HU when stored so: half the RAM
    original = volume_io.load(task.input, options=task.read, integer_hu=True)
  volumes.check_ct(original, assume_hu=task.read.assume_hu)
  labels = load_labels(task.labels if labels is None else labels, original, task.read)
  parts, region_note = decide_region(task.region, original, labels, data.class_names())
  if len(parts) > 1 and not by_region:
    spans = ", ".join(f"{p.region} (slices {p.start}-{p.stop - 1})" for p in parts)
    raise Refusal(
      f"{original.path} spans {spans} ({region_note}); the {task.mode} task runs one region at a time: crop the "
      "scan to one region, or give --config.region to process all of it as one"
    )
  setting = task.spacing if spacing is None else spacing
  work_spacing, spacing_note = decide_spacing(setting, data.training_spacing(), original.spacing)
  scan = Scan(original, labels, tuple(parts), region_note, work_spacing, spacing_note)
  log(f"{task.mode}: {original.path}: {'x'.join(map(str, original.shape))} at {_mm(original.spacing)}")
  if len(parts) > 1:
    spans = ", ".join(f"{p.region} slices {p.start}-{p.stop - 1}" for p in parts)
    log(f"  region   {scan.region}, {region_note}; processed part by part ({spans}), blended where they overlap")
  else:
    log(f"  region   {scan.region}, {region_note}")
  log(f"  spacing  {spacing_note}")
  return scan


# ------------------------------------------------------------------------------------------ the result back


NOISE_GUARD_HU = 150.0  # a voxel this far beyond the window is the scan's own, whatever its neighbours are


def window_weight(hu: np.ndarray, region: int | str, blend_hu: float, widen_hu: float = 0.0) -> np.ndarray:
  """Weight of the model's value per voxel: 1 inside the region's window (widened by `widen_hu` on each side), 0
  outside it, a smooth (C1) ramp over `blend_hu` centred on each edge."""
  lo, hi = preprocess.window_bounds(region)
  hu = np.asarray(hu, np.float32)
  return np.minimum(_smoothstep_below(-hu, widen_hu - lo, blend_hu), _smoothstep_below(hu, hi + widen_hu, blend_hu))


def keep_outside_window(
  result_hu: np.ndarray, input_hu: np.ndarray, region: int | str, blend_hu: float, smooth_voxels: float = 1.0
) -> np.ndarray:
  """The result where the region's window can represent the scan, the scan's own HU where it cannot (air and lung
  below an abdomen window, bone and contrast above it), blended over `blend_hu` around the window's edges: no seam.
  Which side a voxel is on is read from the input smoothed by `smooth_voxels` (a local mean: a noisy fat voxel
  just below the abdomen window is still fat, and is denoised), and a voxel more than NOISE_GUARD_HU beyond the
  window is the input's whatever its neighbours (air beside a thin dense object, whose local mean is in the window).
  Above the window, a voxel the scan puts there and the model saturates at the ceiling is the input's too: the model
  cannot say how far above it lies (thin bone at 300-390 HU, a rib at 3 mm, whose local mean is soft tissue). Below
  it the local mean decides alone: fat sits at the abdomen window's floor, and its denoised values may touch it."""
  input_hu = np.asarray(input_hu, np.float32)
  result_hu = np.asarray(result_hu, np.float32)
  local = ndimage.gaussian_filter(input_hu, smooth_voxels) if smooth_voxels else input_hu
  w = window_weight(local, region, blend_hu)
  np.minimum(w, window_weight(input_hu, region, blend_hu, widen_hu=NOISE_GUARD_HU), out=w)
  _, hi = preprocess.window_bounds(region)
  below_ceiling = lambda hu, edge: _smoothstep_below(hu, edge, blend_hu)
  model_can_tell = np.maximum(below_ceiling(result_hu, hi - blend_hu), below_ceiling(input_hu, hi))
  np.minimum(w, model_can_tell, out=w)
  return (w * result_hu + (1.0 - w) * input_hu).astype(np.float32)


def _smoothstep_below(hu: np.ndarray, edge: float, blend_hu: float) -> np.ndarray:
  """1 below `edge` by half the band, 0 above it by half the band, the C1 smoothstep between."""
  half = max(float(blend_hu), 1e-6) / 2.0
  u = np.clip((edge + half - hu) / (2.0 * half), 0.0, 1.0)
  return (u * u * (3.0 - 2.0 * u)).astype(np.float32)


@dataclasses.dataclass
class PartResult:
  """One part's result: `values` (X, Y, Z) on the grid of `work` (the part resampled to the working spacing)."""

  part: regions.Part
  work: volumes.Volume
  values: np.ndarray
  info: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the summary / sidecar say of this part


def _part_weights(parts: Sequence[regions.Part], n: int) -> np.ndarray:
  """(len(parts), n) blending weights along the axis: 1 inside a part, linear across its overlap with the
  neighbouring part (the two sum to 1), 0 outside it."""
  out = np.zeros((len(parts), n), np.float32)
  k = np.arange(n) + 0.5
  for i, p in enumerate(parts):
    w = np.where((k > p.start) & (k < p.stop), 1.0, 0.0)
    below = [q for q in parts if q is not p and q.start < p.start < q.stop]
    above = [q for q in parts if q is not p and q.start < p.stop < q.stop]
    if below:
      w = np.minimum(w, np.clip((k - p.start) / max(min(q.stop for q in below) - p.start, 1), 0.0, 1.0))
    if above:
      w = np.minimum(w, np.clip((p.stop - k) / max(p.stop - max(q.start for q in above), 1), 0.0, 1.0))
    out[i] = w
  return out / np.maximum(out.sum(0, keepdims=True), 1e-12)


def _on_grid(
  values: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], target: np.ndarray, order: int
) -> np.ndarray:
  """`values` (on `affine`) at the voxels of the grid (shape, target) as float32: a slice when the target's voxels
  are some of the source's (a part of the scan on its own grid), else resampled (`order`)."""
  index_map = np.linalg.solve(np.asarray(affine, np.float64), np.asarray(target, np.float64))
  offset = index_map[:3, 3]
  if np.allclose(index_map[:3, :3], np.eye(3), atol=1e-6) and np.allclose(offset, np.round(offset), atol=1e-4):
    lo = np.round(offset).astype(int)
    hi = lo + np.asarray(shape)
    if np.all(lo >= 0) and np.all(hi <= np.asarray(values.shape)):
      return np.asarray(values[tuple(slice(a, b) for a, b in zip(lo, hi))], np.float32)
  return geometry.resample_to(np.asarray(values, np.float32), affine, shape, target, order=order)


def _slabs(shape: tuple[int, ...], axis: int, halo: int) -> Iterator[tuple[int, int, int, int]]:
  """(start, stop, lo, hi) slabs along `axis`: [start, stop) written, [lo, hi) read (with a `halo`)."""
  per_slice = int(np.prod(shape)) // shape[axis]
  step = max(1, halo, SLAB_VOXELS // max(per_slice, 1))  # (at least the halo: see onto_scan's in_place)
  for start in range(0, shape[axis], step):
    stop = min(shape[axis], start + step)
    yield start, stop, max(0, start - halo), min(shape[axis], stop + halo)


def onto_scan(
  scan: Scan,
  results: Sequence[PartResult],
  *,
  window_blend_hu: float | None,
  dtype: Any = np.float32,
  order: int = 1,
  in_place: bool = False,
  finish_block: Callable[[tuple[slice, ...], np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
  """The parts' results on the scan's own grid, in `dtype`: each resampled back (trilinear, `order`), the scan's HU
  kept outside each part's window when `window_blend_hu` is given (HU results; None: a map, taken as is), the
  parts blended across their overlaps. Slab by slab along the superior axis: memory is the scan, the output and
  one slab, not a float copy of the scan. `in_place`: the output overwrites the scan's own array when it has the
  output's type (the slices the next slab still reads are kept aside): memory is the scan and one slab; the scan
  is the result afterwards. `finish_block(index, block)`: each block as it will be written (rounded for an integer
  dtype; `index`: start:stop slices of the scan's grid), where `scan.original.data[index]` is still the scan as read,
  returns the block to write (a task's last word on its voxels, or its scores of what changed)."""
  original = scan.original
  axis = results[0].part.axis
  n = original.shape[axis]
  weights = _part_weights([r.part for r in results], n)
  reuse = in_place and original.data.dtype == np.dtype(dtype) and original.data.flags.writeable
  out = original.data if reuse else np.empty(original.shape, np.dtype(dtype))
  halo = 4 if window_blend_hu is not None else 0  # the smoothing that reads the window side (4 sigma) needs context
  integer = np.issubdtype(out.dtype, np.integer)
  kept: tuple[int, np.ndarray] | None = None  # (first slice, the scan's values) of slices already overwritten
  for start, stop, lo, hi in _slabs(original.shape, axis, halo):
    index = [slice(None)] * 3
    index[axis] = slice(lo, hi)
    scan_slab = None
    if window_blend_hu is not None:
      scan_slab = np.array(original.data[tuple(index)], np.float32)
      if kept is not None and kept[0] < start:  # the halo below this slab, as it was before being overwritten
        below = [slice(None)] * 3
        below[axis] = slice(kept[0] - lo, start - lo)
        scan_slab[tuple(below)] = kept[1]
    acc = None
    for i, r in enumerate(results):
      w = weights[i, lo:hi]
      if not w.any():
        continue
      shape, affine = geometry.box_grid(original.shape, original.affine, tuple(index))
      values = _on_grid(r.values, r.work.affine, shape, affine, order)
      if window_blend_hu is not None:
        values = keep_outside_window(values, scan_slab, r.part.region, window_blend_hu)
      wb = w.reshape([-1 if a == axis else 1 for a in range(3)])
      acc = values * wb if acc is None else acc + values * wb
    keep = [slice(None)] * 3
    keep[axis] = slice(start - lo, stop - lo)
    block = acc[tuple(keep)]
    if integer:
      info = np.iinfo(out.dtype)
      block = np.clip(np.round(block), info.min, info.max)
    if finish_block is not None:
      written = [slice(*sl.indices(n)[:2]) for sl, n in zip(index, original.shape)]
      written[axis] = slice(start, stop)
      block = finish_block(tuple(written), block)
    if reuse and halo and scan_slab is not None:  # the next slab's halo below it: these slices, unmodified
      tail = [slice(None)] * 3
      tail[axis] = slice(max(start, stop - halo) - lo, stop - lo)
      kept = (max(start, stop - halo), scan_slab[tuple(tail)].copy())
    index[axis] = slice(start, stop)
    out[tuple(index)] = block
  return out


def _temporary(path: str) -> str:
  folder, name = os.path.split(os.path.abspath(path.rstrip("/" + os.sep)))
  return os.path.join(folder, f".{name}.partial-{os.getpid()}")


def write_atomically(values_ras: np.ndarray, like: volumes.Volume, output: str, dtype: Any, description: str) -> None:
  """`volume_io.save_like` to a temporary name beside `output`, then renamed onto it: a run stopped while writing
  leaves no half-written file or series (the temporary one is removed)."""
  folder_output = volume_io.is_directory_output(output)
  temporary = _temporary(output) + (os.sep if folder_output else ".nii.gz" if output.endswith(".gz") else ".nii")
  try:
    volume_io.save_like(values_ras, like, temporary, dtype, description=description)
    if folder_output and os.path.isdir(output):
      os.rmdir(output)  # empty (check_output): the new series takes its place
    os.replace(temporary.rstrip(os.sep), output.rstrip("/" + os.sep))
  except BaseException:
    target = temporary.rstrip(os.sep)
    if os.path.isdir(target):
      shutil.rmtree(target, ignore_errors=True)
    elif os.path.exists(target):
      os.remove(target)
    raise


def write_sidecar(output: str, sidecar: Mapping[str, Any]) -> str:
  path = sidecar_path(output)
  temporary = _temporary(path)
  try:
    with open(temporary, "w") as f:
      json.dump(sidecar, f, indent=1, default=_json_default)
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise
  return path


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return float(value)


# ------------------------------------------------------------------------------------------ the closing summary


@dataclasses.dataclass
class Summary:
  """What a run did, in the lines a clinician-researcher reads at the end and as the JSON sidecar's fields."""

  task: str
  output: str
  checkpoint: str
  region: str
  region_note: str
  spacing: str
  window: str = ""
  lines: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # task-specific (label, text) rows
  started: float = dataclasses.field(default_factory=time.perf_counter)

  def add(self, label: str, text: str) -> None:
    self.lines.append((label, text))

  def seconds(self) -> float:
    return time.perf_counter() - self.started

  def fields(self) -> dict[str, Any]:
    return {
      "output": self.output,
      "checkpoint": self.checkpoint,
      "region": self.region,
      "region_decided": self.region_note,
      "spacing": self.spacing,
      "window": self.window,
      "seconds": round(self.seconds(), 1),
    }

  def print(self, sidecar: str | None = None) -> None:
    minutes, seconds = divmod(self.seconds(), 60)
    took = f"{int(minutes)} min {seconds:.0f} s" if minutes else f"{seconds:.1f} s"
    rows = [("output", self.output + (f" (+ {sidecar})" if sidecar else ""))]
    rows += [("checkpoint", self.checkpoint), ("region", f"{self.region}, {self.region_note}")]
    rows += [("spacing", self.spacing)] + ([("window", self.window)] if self.window else []) + self.lines
    rows += [("time", took)]
    log(f"{self.task} done")
    for label, text in rows:
      log(f"  {label:<10} {text}")


def window_text(scan_or_regions: Scan | Sequence[str], blend_hu: float | None) -> str:
  """'-120..240 HU (abdomen); the scan's own HU kept outside it, blended over 20 HU at its edges'."""
  names = [p.region for p in scan_or_regions.parts] if isinstance(scan_or_regions, Scan) else list(scan_or_regions)
  windows = []
  for name in dict.fromkeys(names):
    lo, hi = preprocess.window_bounds(name)
    windows.append(f"{lo:g}..{hi:g} HU ({name})")
  text = ", ".join(windows)
  if blend_hu is None:
    return text
  return f"{text}; the scan's own HU kept outside it, blended over {blend_hu:g} HU around its edges"
