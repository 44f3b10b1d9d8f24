"""MedDiff-FM's multi-level training samples (numpy, host side).

Each sample is drawn with equal probability from three operations on a region volume:
  whole:  the whole volume resized to P^3                          (image level)
  zoom2:  a random 2P^3 crop resized to P^3                         (intermediate)
  patch:  a random P^3 crop at native resolution                    (patch level)
Every sample carries `pos_box` (3, 2): the whole-volume-frame coordinates, in [-1, 1], of its first and
last voxel along each axis (models/conditions.py: the one definition, shared with inference). Resizing uses
align-corners sampling (scipy `zoom`, grid_mode=False), so the sample's voxels sit exactly on
linspace(box[a, 0], box[a, 1], P): `models.embeddings.coordinate_grid` reproduces them on device.
Crops that extend past the volume (a volume smaller than the crop) are padded with air / background and
their coordinates extend linearly beyond [-1, 1].

Where a sample is finished (`SampleSpec.decode_on_device` / `resize_on_device`, config.data.*):
  host:    the finished sample (image in [-1, 1] float32, structures), everything computed here (the reference).
  device:  the sample's HU on its grid (float32: a crop as read, the stored whole level, zoom2's window resized by
           `halve`) and its label map on that grid (uint8 label codes, `shipped_layout`); the accelerator windows the
           HU, thresholds the body, looks up the labels' structure groups and packs the structures (data/decode.py),
           inside the jitted step.
  device + resize_on_device: zoom2's 2P^3 window ships as read (int16) and the accelerator resizes it too.
Same operations, boxes and rng draws every way; the image equal within float32 rounding of the resize, the
structures equal (tests/test_decode.py).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage

from meddiff_jax.data import preprocess
from meddiff_jax.models import conditions

OPERATIONS = ("whole", "zoom2", "patch")
HINTS = ("lowres", "lesion")  # ControlNet condition volumes a sample can carry (config.data.hint)
# Keys of a sample shipped for decoding on the device: its HU, and its label map on its grid as uint8 label codes
# (`label_codes`), whose structure group (grouped) or class (classes) ids the device looks up (`group_table`).
HU = "hu"  # (P,P,P,1) int16: the sample's HU on its own grid in steps of HU_STEP (zoom2 resized on the host)
HU_STEP = 0.125  # shipped HU are int16 multiples of it (`fixed_point`): -4096 .. 4095.875 HU
_STEPS_PER_HU = 8
_FIXED_MIN, _FIXED_MAX = -4096 * _STEPS_PER_HU, 4096 * _STEPS_PER_HU - 1
SHIPPED_HU = {"whole": "hu_whole", "zoom2": "hu_zoom2", "patch": "hu_patch"}  # resize_on_device: by operation
LABELS = "labels"
OPERATION = "operation"  # () int32: the index in OPERATIONS


def crop_padded(
  volume: np.ndarray, start: np.ndarray, size: np.ndarray, fill: float, out: np.ndarray | None = None
) -> np.ndarray:
  """volume[start:start+size] per axis; out-of-volume voxels get `fill`.

  A crop inside the volume is a view (no copy: a memory-mapped volume reads only the touched pages). A padded one is
  assembled in `out` when given (an array of the crop's shape and the volume's dtype the caller reuses).
  """
  if np.all(start >= 0) and np.all(start + size <= np.array(volume.shape[:3])):
    return volume[tuple(slice(int(a), int(a + n)) for a, n in zip(start, size))]
  out, inner = _padded(volume, start, size, fill, out)
  if inner is not None:
    out[inner[1]] = volume[inner[0]]
  return out


def _padded(volume, start: np.ndarray, size: np.ndarray, fill: float, out: np.ndarray | None):
  """A padded crop's array with `fill` outside the volume, and the (source, destination) boxes of what lies inside
  (None when nothing does); only the outside is filled, the inside is left for the caller to read into."""
  shape = tuple(int(n) for n in size)
  if out is None:
    out = np.empty(shape, volume.dtype)
  elif out.shape != shape or out.dtype != volume.dtype:
    raise ValueError(f"a {shape} {volume.dtype} crop cannot be assembled in a {out.shape} {out.dtype} array")
  src_lo = np.maximum(start, 0)
  src_hi = np.minimum(start + size, volume.shape[:3])
  if np.any(src_hi <= src_lo):
    out.fill(fill)
    return out, None
  dst_lo = src_lo - start
  dst_hi = dst_lo + (src_hi - src_lo)
  box = [slice(None)] * 3
  for axis in range(3):  # the slabs before and after the inside along each axis, within the inside of earlier axes
    for edge in (slice(0, int(dst_lo[axis])), slice(int(dst_hi[axis]), shape[axis])):
      out[tuple(box[:axis] + [edge] + box[axis + 1 :])] = fill
    box[axis] = slice(int(dst_lo[axis]), int(dst_hi[axis]))
  return out, (tuple(slice(int(a), int(b)) for a, b in zip(src_lo, src_hi)), tuple(box))


def resize(volume: np.ndarray, shape: tuple[int, ...], order: int, dtype: np.dtype | None = None) -> np.ndarray:
  """Align-corners resize (scipy `zoom`, grid_mode=False, mode='nearest', no prefilter) to exactly `shape`,
  output in `dtype`.

  3D orders 0 and 1 are computed separably (a gather per axis / a float64 lerp per axis, slab by slab so the
  temporaries stay in cache): the same sampling positions and weights as scipy's `zoom`, ~2.5x less CPU for
  the multi-level resizes (benchmarks/RESULTS.md "#12 pipeline margin"). Equal to `zoom` bitwise for order 0
  and, for order 1, to the last float32 bit except where float64 rounding of the two sums differs (tested:
  tests/test_pipeline_host_cpu.py). Other ranks / orders call `zoom` itself.
  """
  dtype = np.dtype(dtype or volume.dtype)
  if tuple(volume.shape) == tuple(shape):
    return np.asarray(volume, dtype)
  if len(shape) == 3 and order in (0, 1):
    out = (
      _resize_nearest(np.asarray(volume), shape, dtype)
      if order == 0
      else _resize_linear(np.asarray(volume), shape, dtype)
    )
  else:
    factors = [o / i for o, i in zip(shape, volume.shape)]
    out = ndimage.zoom(volume, factors, output=dtype, order=order, mode="nearest", grid_mode=False, prefilter=False)
  assert out.shape == tuple(shape), (out.shape, shape)
  return out


def _source_coordinates(n_in: int, n_out: int) -> np.ndarray:
  """Input coordinate of each output voxel along one axis, computed as scipy's zoom_shift does (float64)."""
  zoom = (n_in - 1) / (n_out - 1) if n_out > 1 else 1.0  # scipy: factor 1 for a size-1 output
  return np.arange(n_out, dtype=np.float64) * zoom


def _resize_nearest(volume: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """Order 0: scipy picks floor(c + 0.5) per axis (clamped: mode 'nearest'); separable, so one gather."""
  index = [
    np.clip(np.floor(_source_coordinates(n, m) + 0.5).astype(np.intp), 0, n - 1) for n, m in zip(volume.shape, shape)
  ]
  return volume[np.ix_(*index)].astype(dtype, copy=False)


_SLAB = 2  # output slices per step of the linear resize: float64 temporaries of a few MB (cache-sized)


def _resize_linear(volume: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """Order 1: per axis, out = v[lo] (1 - w) + v[lo + 1] w with lo = floor(c), w = c - lo (scipy's linear
  spline weights), in float64 like scipy, cast once to `dtype`. Axis 0 slab by slab, then axes 1 and 2."""
  taps = []
  for n, m in zip(volume.shape, shape):
    c = _source_coordinates(n, m)
    lo = np.floor(c)
    w = c - lo
    lo = np.clip(lo.astype(np.intp), 0, n - 1)
    taps.append((lo, np.minimum(lo + 1, n - 1), 1.0 - w, w))
  out = np.empty(tuple(shape), dtype)
  lo0, hi0, w00, w10 = taps[0]
  for k in range(0, shape[0], _SLAB):
    sl = slice(k, k + _SLAB)
    x = _lerp(volume, 0, lo0[sl], hi0[sl], w00[sl], w10[sl])
    x = _lerp(x, 1, *taps[1])
    out[sl] = _lerp(x, 2, *taps[2])
  return out


def _lerp(a: np.ndarray, axis: int, lo: np.ndarray, hi: np.ndarray, w0: np.ndarray, w1: np.ndarray) -> np.ndarray:
  if a.shape[axis] == len(lo) and np.array_equal(lo, np.arange(len(lo))) and not w1.any():
    return a.astype(np.float64, copy=False)  # an axis that keeps its size: v * 1 + v' * 0 == v
  bshape = [-1 if i == axis else 1 for i in range(a.ndim)]
  x = np.take(a, lo, axis=axis).astype(np.float64, copy=False) * w0.reshape(bshape)
  y = np.take(a, hi, axis=axis).astype(np.float64, copy=False)
  y *= w1.reshape(bshape)
  x += y
  return x


def choose_box(
  shape: tuple[int, int, int], patch: int, operation: str, rng: np.random.Generator, centre: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """(start, size) in voxels of the region the operation reads; `centre`: a voxel the crop must hold
  (a positive crop, MONAI RandCropByPosNegLabeld-style), placed at the crop centre where the volume allows."""
  shape_arr = np.array(shape)
  if operation == "whole":
    return np.zeros(3, np.int64), shape_arr
  size = np.full(3, patch * (2 if operation == "zoom2" else 1))
  if operation not in ("zoom2", "patch"):
    raise ValueError(f"unknown multi-level operation {operation!r}; choose from {OPERATIONS}")
  if centre is not None:
    return np.array(
      [int(np.clip(m - c // 2, 0, s - c)) if s >= c else -((c - s) // 2) for m, s, c in zip(centre, shape_arr, size)]
    ), size
  # Uniform start over positions that keep the crop inside; centred when the volume is smaller.
  start = np.array([rng.integers(0, s - c + 1) if s >= c else -((c - s) // 2) for s, c in zip(shape_arr, size)])
  return start, size


LESION_LABEL = 255  # legacy lesion voxels (organ underneath unknown)
LESION_OFFSET = 1024  # a lesion voxel stores its organ label + LESION_OFFSET: the organ channel stays intact


def with_lesions(labels: np.ndarray | None, lesion: np.ndarray) -> np.ndarray:
  """A label map carrying a lesion mask without losing the organ under the lesion."""
  base = np.zeros(lesion.shape, np.int16) if labels is None else np.asarray(labels).astype(np.int16)
  return np.where(np.asarray(lesion) > 0, base % LESION_OFFSET + LESION_OFFSET, base).astype(np.int16)


def split_lesions(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(organ labels, lesion mask) from a label map written by `with_lesions` (or the legacy LESION_LABEL)."""
  labels = np.asarray(labels)
  wide = labels.astype(np.int32)  # uint8 stores cannot even be compared with LESION_OFFSET under NumPy 2
  lesion = (wide >= LESION_OFFSET) | (wide == LESION_LABEL)
  organs = np.where(wide >= LESION_OFFSET, wide - LESION_OFFSET, np.where(wide == LESION_LABEL, 0, wide))
  return organs.astype(labels.dtype if labels.dtype.kind == "i" else np.int16), lesion


def label_groups(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
  """uint8 LUT value (structure group) of the organ under each voxel of a stored label map, lesion codes
  included: `preprocess.group_ids(split_lesions(labels)[0], lut)` in one gather. For 8- and 16-bit maps the
  table is that very expression evaluated on every value of the dtype (elementwise, so equal by construction)."""
  labels = np.asarray(labels)
  if labels.dtype.itemsize > 2 or labels.dtype.kind not in "iu":
    return preprocess.group_ids(split_lesions(labels)[0], lut)
  unsigned = np.dtype(f"u{labels.dtype.itemsize}")
  table = _group_table(lut.tobytes(), lut.dtype.str, labels.dtype.str)
  return np.take(table, labels.view(unsigned))


def group_table(lut: np.ndarray) -> np.ndarray:
  """(256,) uint8: `label_groups` of every uint8 label value: the lookup the device applies to shipped label codes
  (`label_codes`, data/decode.py)."""
  table = _group_table(lut.tobytes(), lut.dtype.str, np.dtype(np.uint8).str)
  if table[0] != 0:
    raise AssertionError(f"label 0 (background) maps to structure group {table[0]}, not 0")
  return table


def label_codes(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
  """A label map as uint8 codes whose `group_table` entries are its `label_groups`: a uint8 map is its own codes
  (shipped as read, no work here); a 16-bit one (lesion codes) maps each value to the first uint8 value of the same
  group (one table gather, `_code_table`). Other dtypes: ValueError."""
  labels = np.asarray(labels)
  if labels.dtype == np.uint8:
    return labels
  if labels.dtype.kind not in "iu" or labels.dtype.itemsize > 2:
    raise ValueError(f"a {labels.dtype} label map does not ship as label codes; set data.decode_on_device=False")
  unsigned = np.dtype(f"u{labels.dtype.itemsize}")
  return np.take(_code_table(lut.tobytes(), lut.dtype.str, labels.dtype.str), labels.view(unsigned))


@functools.lru_cache(maxsize=16)
def _code_table(lut_bytes: bytes, lut_dtype: str, label_dtype: str) -> np.ndarray:
  groups = _group_table(lut_bytes, lut_dtype, label_dtype)
  by_code = _group_table(lut_bytes, lut_dtype, np.dtype(np.uint8).str)
  first = {}
  for code in range(255, -1, -1):  # each group's first uint8 value
    first[int(by_code[code])] = code
  missing = sorted(set(np.unique(groups).tolist()) - set(first))
  if missing:
    raise ValueError(
      f"structure groups / classes {missing[:5]} of {label_dtype} labels have no uint8 label (a LUT over 255 "
      "classes); set data.decode_on_device=False"
    )
  code_of_group = np.zeros(256, np.uint8)
  for group, code in first.items():
    code_of_group[group] = code
  codes = code_of_group[groups]
  if not np.array_equal(by_code[codes], groups):
    raise AssertionError("label codes do not preserve the structure groups")
  return codes


@functools.lru_cache(maxsize=16)
def _group_table(lut_bytes: bytes, lut_dtype: str, label_dtype: str) -> np.ndarray:
  dtype = np.dtype(label_dtype)
  values = np.arange(2 ** (8 * dtype.itemsize), dtype=np.int64).astype(np.dtype(f"u{dtype.itemsize}")).view(dtype)
  return preprocess.group_ids(split_lesions(values)[0], np.frombuffer(lut_bytes, np.dtype(lut_dtype)))


def lesion_coordinates(labels: np.ndarray | None, max_points: int = 4096) -> np.ndarray:
  """(n, 3) lesion voxel indices (evenly thinned to max_points): the centres of positive crops."""
  if labels is None:
    return np.zeros((0, 3), np.int64)
  pts = np.argwhere(split_lesions(labels)[1])
  return pts[:: max(1, len(pts) // max_points)]


def thick_slices(image: np.ndarray, factor: int, axis: int = 2) -> np.ndarray:
  """Simulated thick-slice acquisition (RPLHR-CT style): average `factor` slices along `axis`, then
  linearly interpolate back onto the thin grid. The super-resolution condition."""
  n = image.shape[axis]
  m = int(np.ceil(n / factor))
  pad = [(0, 0)] * image.ndim
  pad[axis] = (0, m * factor - n)
  padded = np.pad(image, pad, mode="edge")
  shape = list(padded.shape)
  shape[axis : axis + 1] = [m, factor]
  thick = padded.reshape(shape).mean(axis=axis + 1)
  centres = (np.arange(m) + 0.5) * factor - 0.5  # thin-grid position of each thick slice centre
  coords = np.clip(np.interp(np.arange(n), centres, np.arange(m)), 0, m - 1)
  lo = np.floor(coords).astype(int)
  hi = np.minimum(lo + 1, m - 1)
  w = (coords - lo).reshape([-1 if a == axis else 1 for a in range(image.ndim)])
  return (np.take(thick, lo, axis=axis) * (1 - w) + np.take(thick, hi, axis=axis) * w).astype(image.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class SampleSpec:
  """The layout of every sample of a dataset, from config.data (`data/spec.DataSpec.sample_spec`).

  patch: the sample's side P. lut / num_groups: label -> structure group (`preprocess.group_lookup`, or
  `class_lookup` with structure_labels: one label-id channel) and their number; lut None: no structures.
  operation_probs: weights of whole / zoom2 / patch. hint: the ControlNet condition volume ('' none,
  'lowres', 'lesion'); sr_factor: native slices averaged into one thick slice (simulated 'lowres').
  positive_fraction: the probability that a crop is centred on a lesion voxel, as MONAI's
  RandCropByPosNegLabeld (pos / (pos + neg)); otherwise crops are uniform.
  pack_structures: grouped structures as one (P,P,P,1) uint8 channel, (group << 1) | body
  (models/conditions.pack_structures), expanded to the K+1 channels on the accelerator.
  decode_on_device: ship HU and group ids (`shipped_layout`) and let the accelerator finish the sample
  (data/decode.py); resize_on_device: ship zoom2's 2P^3 window as read and resize it there too; hu_dtype: the dtype
  of the volume's HU (the store's: int16 prepared, float32 phantoms).
  """

  patch: int
  lut: np.ndarray | None
  num_groups: int
  operation_probs: tuple[float, float, float]
  hint: str
  sr_factor: int
  structure_labels: bool
  positive_fraction: float
  pack_structures: bool
  decode_on_device: bool
  resize_on_device: bool
  hu_dtype: str


def make_sample(
  hu: np.ndarray,
  labels: np.ndarray | None,
  region: int,
  spec: SampleSpec,
  rng: np.random.Generator,
  *,
  operation: str | None = None,
  positive_coords: np.ndarray | None = None,
  lowres: np.ndarray | None = None,
  whole_level: Callable[[], tuple[np.ndarray, np.ndarray | None] | None] | None = None,
  scratch: Scratch | None = None,
) -> dict[str, np.ndarray]:
  """One training sample of layout `spec` from a HU volume (and optional TotalSegmentator label map).

  Returns dict(image (P,P,P,1) float32 in [-1,1], pos_box (3,2) float32, region () int32,
  structures (P,P,P,K+1) uint8 if spec.lut is given (one packed channel with spec.pack_structures),
  operation () int32, and for ControlNet a `hint` (P,P,P,1) float32: 'lowres' the thick-slice version of the
  image, 'lesion' the lesion mask). operation: force one (default: drawn with spec.operation_probs).
  positive_coords: the lesion voxels crops may centre on (spec.positive_fraction).
  whole_level: returns the store's precomputed 'whole' sample of this volume at P (the HU volume resized
  to float32 and the label map resized, exactly as below: data/store.py), or None; used instead of reading
  and resizing the whole volume (not for the 'lowres' hint, which needs the native volume).
  lowres: a real low-resolution partner of `hu` on its grid (HU; thick slices interpolated onto the thin
  grid). Without one the 'lowres' hint is simulated: `sr_factor` native slices averaged (what a thick
  acquisition at the training spacing gives, and what inference's trilinear upsampling of a real thick
  scan looks like), computed at native resolution *before* the multi-level resize, as inference sees it.
  scratch: the calling thread's reused arrays (`Scratch`) for intermediates read from a lazy store volume.
  """
  patch, lut, num_groups, hint = spec.patch, spec.lut, spec.num_groups, spec.hint
  operation_probs, positive_fraction = spec.operation_probs, spec.positive_fraction
  structure_labels, pack_structures, sr_factor = spec.structure_labels, spec.pack_structures, spec.sr_factor
  if operation is None:
    operation = OPERATIONS[rng.choice(3, p=np.asarray(operation_probs) / np.sum(operation_probs))]
  centre = None
  if positive_fraction > 0 and positive_coords is not None and len(positive_coords) and operation != "whole":
    if rng.random() < positive_fraction:
      centre = positive_coords[rng.integers(len(positive_coords))]
  start, size = choose_box(hu.shape, patch, operation, rng, centre)
  target = (patch,) * 3
  need_labels = labels is not None and (lut is not None or hint == "lesion")
  cached = whole_level() if operation == "whole" and whole_level is not None and hint != "lowres" else None
  if cached is not None:
    hu_crop, lab = cached
    if hu_crop.shape != target or hu_crop.dtype != np.float32 or (need_labels and lab is None):
      raise ValueError(
        f"stored whole level {hu_crop.shape} {hu_crop.dtype} (labels: {lab is not None}) does not "
        f"match a {target} float32 sample of this volume"
      )
  if spec.decode_on_device:
    return _shipped_sample(hu, labels, region, spec, operation, start, size, cached, need_labels, lowres, scratch)
  if cached is not None:
    native = None
  else:
    native = crop_padded(hu, start, size, fill=-1000.0)
    hu_crop = resize(native, target, order=1, dtype=np.float32)
  sample = {
    conditions.IMAGE: preprocess.hu_to_unit(hu_crop, region)[..., None],
    conditions.POS_BOX: conditions.position_boxes(start, size, hu.shape),
    conditions.REGION: np.int32(region),
    "operation": np.int32(OPERATIONS.index(operation)),
  }
  if not need_labels:
    lab = None
  elif cached is None:
    lab = resize(crop_padded(labels, start, size, fill=0), target, order=0)
  if lut is not None and pack_structures and not structure_labels:
    if num_groups > conditions.MAX_PACKED_GROUPS:
      raise ValueError(
        f"{num_groups} structure groups do not pack into one uint8 channel (at most "
        f"{conditions.MAX_PACKED_GROUPS}); set data.pack_structures=False"
      )
    group = np.zeros(target, np.uint8) if lab is None else label_groups(lab, lut)
    sample[conditions.STRUCTURES] = conditions.pack_structures(group, preprocess.body_mask(hu_crop))
    organs, lesion = None, (split_lesions(lab)[1] if lab is not None and hint == "lesion" else None)
  else:
    organs, lesion = split_lesions(lab) if lab is not None else (None, None)
    if lut is not None:  # structure_labels: one label-id channel (num_groups = number of classes)
      encode = preprocess.structure_labels if structure_labels else preprocess.structure_channels
      sample[conditions.STRUCTURES] = encode(organs, hu_crop, lut, num_groups)
  if hint == "lowres":
    if lowres is not None:
      if lowres.shape != hu.shape:
        raise ValueError(f"low-resolution partner shape {lowres.shape} != image shape {hu.shape}")
      thick = crop_padded(lowres, start, size, fill=-1000.0)
    else:
      thick = thick_slices(np.asarray(native, np.float32), sr_factor, axis=2)
    sample[conditions.HINT] = preprocess.hu_to_unit(resize(thick, target, order=1, dtype=np.float32), region)[..., None]
  elif hint == "lesion":
    mask = np.zeros(target, np.float32) if lesion is None else lesion.astype(np.float32)
    sample[conditions.HINT] = mask[..., None] * 2.0 - 1.0  # {-1, 1}, the data scale
  return sample


def shipped_layout(spec: SampleSpec) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Per-sample (shape, dtype) of every key a sample ships with spec.decode_on_device (data/decode.py finishes it).

  HU (the default): hu (P,P,P,1) int16 in steps of HU_STEP (`fixed_point`), the sample's HU on its own grid: a
  patch crop as read (int16 HU exactly), the stored whole level, zoom2's 2P^3 window resized here (`halve`: the
  resize's own positions and weights, float32), both within HU_STEP.
  With spec.resize_on_device, zoom2's window ships as read and the device resizes it: one HU key per operation of
  non-zero probability, in the dtype that operation reads: hu_patch (P,P,P,1) and hu_zoom2 (2P,2P,2P,1) in
  spec.hu_dtype (the volume's), hu_whole (P,P,P,1) float32; a sample fills its own operation's key and ships zeros
  (a broadcast view: nothing computed) in the others, and its `operation` says which. 48 MB per sample at P=128
  instead of 6 (benchmarks/RESULTS.md "#24").
  labels (P,P,P,1) uint8: the label map on the sample's grid as label codes (`label_codes`: a uint8 map as read),
  whose structure group (grouped) or class (classes) ids the device looks up (`group_table`: a table gather costs
  the host ~2 ms per sample, the device nothing that shows), without the body, which the device thresholds from
  its HU. Split over devices along depth, every key splits like the
  image: image depth rows [a, b) come from the same rows of every (P,P,P,·) key and from rows [2a, 2b) of
  hu_zoom2 (no halo).
  """
  p, hu_dtype = spec.patch, np.dtype(spec.hu_dtype)
  if spec.resize_on_device:
    dtypes = {"whole": np.dtype(np.float32), "zoom2": hu_dtype, "patch": hu_dtype}
    layout = {
      SHIPPED_HU[op]: (((2 * p,) * 3 if op == "zoom2" else (p,) * 3) + (1,), dtypes[op])
      for op, prob in zip(OPERATIONS, spec.operation_probs)
      if prob > 0
    }
  else:
    layout = {HU: ((p, p, p, 1), np.dtype(np.int16))}
  if spec.lut is not None:
    layout[LABELS] = ((p, p, p, 1), np.dtype(np.uint8))
  layout[conditions.POS_BOX] = ((3, 2), np.dtype(np.float32))
  layout[conditions.REGION] = ((), np.dtype(np.int32))
  if spec.resize_on_device:
    layout[OPERATION] = ((), np.dtype(np.int32))
  if spec.hint:
    layout[conditions.HINT] = ((p, p, p, 1), np.dtype(np.float32))
  return layout


def _shipped_sample(
  hu: np.ndarray,
  labels: np.ndarray | None,
  region: int,
  spec: SampleSpec,
  operation: str,
  start: np.ndarray,
  size: np.ndarray,
  cached: tuple[np.ndarray, np.ndarray | None] | None,
  need_labels: bool,
  lowres: np.ndarray | None,
  scratch: Scratch | None = None,
) -> dict[str, np.ndarray]:
  """make_sample's box, shipped as `shipped_layout` says: HU as read (zoom2's window resized here unless the device
  does it, the whole volume's when the store has no whole level), label maps resized by nearest gathers of only
  the voxels the sample keeps, shipped as uint8 label codes (the device looks up their groups). zoom2's window is
  read into `scratch` when the host halves it (it never leaves this call); not when it ships."""
  layout = shipped_layout(spec)
  key = SHIPPED_HU[operation] if spec.resize_on_device else HU
  if key not in layout:
    raise ValueError(f"operation {operation!r} has probability 0 in {spec.operation_probs}: no {key} to ship it in")
  target = (spec.patch,) * 3
  sample = {
    k: np.broadcast_to(np.zeros((), dt), shape) for k, (shape, dt) in layout.items() if k in SHIPPED_HU.values()
  }
  native, lab = None, None
  if cached is not None:
    value, lab = cached[0], (cached[1] if need_labels else None)
    sample[key] = (fixed_point(value) if key == HU else value)[..., None]
  else:  # the HU and label reads begin together: from a bucket, one round of requests
    window_only = operation == "zoom2" and key == HU
    hu_read = start_crop(hu, start, size, fill=-1000.0, scratch=scratch if window_only else None)
    lab_read = None
    if need_labels:
      lab_read = (start_gather_nearest if operation == "zoom2" else start_crop)(labels, start, size, 0, target)
    native = hu_read()
    if operation == "whole":
      value = resize(native, target, order=1, dtype=np.float32)
      sample[key] = (fixed_point(value) if key == HU else value)[..., None]
    elif key == HU:  # int16 steps of HU_STEP on the sample's grid
      sample[key] = (halve(native, fixed=True) if operation == "zoom2" else fixed_point(native))[..., None]
    else:
      sample[key] = _as_shipped(native, spec.hu_dtype)[..., None]
    if lab_read is not None:
      lab = lab_read()
      lab = lab if operation == "zoom2" else resize(lab, target, order=0)
  if spec.lut is not None:
    if spec.pack_structures and not spec.structure_labels and spec.num_groups > conditions.MAX_PACKED_GROUPS:
      raise ValueError(
        f"{spec.num_groups} structure groups do not pack into one uint8 channel (at most "
        f"{conditions.MAX_PACKED_GROUPS}); set data.pack_structures=False"
      )
    sample[LABELS] = (
      np.broadcast_to(np.zeros((), np.uint8), target + (1,)) if lab is None else label_codes(lab, spec.lut)[..., None]
    )
  sample[conditions.POS_BOX] = conditions.position_boxes(start, size, hu.shape)
  sample[conditions.REGION] = np.int32(region)
  sample[OPERATION] = np.int32(OPERATIONS.index(operation))  # bookkeeping unless resize_on_device decodes by it
  if spec.hint == "lowres":
    if lowres is not None:
      if lowres.shape != hu.shape:
        raise ValueError(f"low-resolution partner shape {lowres.shape} != image shape {hu.shape}")
      thick = crop_padded(lowres, start, size, fill=-1000.0)
    else:
      thick = thick_slices(np.asarray(native, np.float32), spec.sr_factor, axis=2)
    hint = preprocess.hu_to_unit(resize(thick, target, order=1, dtype=np.float32), region)
    sample[conditions.HINT] = hint[..., None]
  elif spec.hint == "lesion":
    lesion = None if lab is None else split_lesions(lab)[1]
    mask = np.zeros(target, np.float32) if lesion is None else lesion.astype(np.float32)
    sample[conditions.HINT] = mask[..., None] * 2.0 - 1.0
  return sample


def pair_weights(patch: int) -> np.ndarray:
  """(patch,) float64 weight of voxel 2k + 1 in output voxel k of the 2P -> P align-corners resize.

  `resize` samples output k at c_k = k (2P - 1) / (P - 1) (scipy's zoom positions, float64), whose floor is 2k for
  every k < P - 1 and whose last is 2P - 1 itself: each output voxel is a lerp of one pair (2k, 2k + 1) with weight
  c_k - 2k on the odd one (1 for the last)."""
  c = _source_coordinates(2 * patch, patch)
  w = c - 2 * np.arange(patch)
  lo = np.clip(np.floor(c).astype(np.intp), 0, 2 * patch - 1)
  pairs = np.minimum(lo, 2 * np.arange(patch) + 1) // 2 == np.arange(patch)
  if not (pairs.all() and np.all((w >= 0) & (w <= 1 + 1e-9))):
    raise AssertionError(f"the 2P -> P resize positions at P={patch} are not pairwise: {c}")
  return np.clip(w, 0.0, 1.0)


def halve(window: np.ndarray, fixed: bool = False) -> np.ndarray:
  """(2P, 2P, 2P) -> (P, P, P) float32: `resize(window, (P,) * 3, order=1)` as a lerp of each axis's voxel pairs
  (`pair_weights`), even + w (odd - even), depth then height then width, in float32, in one compiled pass
  (data/host_kernels.py: 3.2 ms at P = 128 where the same arithmetic as numpy passes took 13.5), equal to `resize`
  within float32 rounding (tests/test_decode.py), and the same operations as the device's data/decode.resize_half.
  fixed: return `fixed_point` of it, converted in the same pass (scaling by 1 / HU_STEP, a power of two, is
  exact)."""
  from meddiff_jax.data import host_kernels  # numba: imported (and compiled) by the first sample that halves

  p = window.shape[0] // 2
  if window.shape != (2 * p,) * 3:
    raise ValueError(f"halve takes a (2P, 2P, 2P) window, got {window.shape}")
  w = pair_weights(p).astype(np.float32)
  if not fixed:
    out = np.empty((p, p, p), np.float32)
    host_kernels.halve_into(np.asarray(window), w, out)
    return out
  out = np.empty((p, p, p), np.int16)
  steps = np.float32(_STEPS_PER_HU)
  host_kernels.halve_fixed_into(np.asarray(window), w, steps, np.float32(_FIXED_MIN), np.float32(_FIXED_MAX), out)
  return out


def fixed_point(hu: np.ndarray) -> np.ndarray:
  """HU -> int16 multiples of HU_STEP, as samples ship them (`HU`): ceil(hu / HU_STEP), saturated at -4096 and
  4095.875 HU. Integer HU exactly; others rounded up by less than HU_STEP, which keeps `hu > BODY_THRESHOLD_HU`
  (an integer) the same decision. Every region's window and the body threshold lie inside the range, so what the
  model sees is the float32 HU's within HU_STEP (7e-4 of the narrowest window's [-1, 1]; the model's bf16 input
  rounds by 4e-3), in half the bytes of float32: stacking and transferring a batch cost in proportion."""
  hu = np.asarray(hu)
  if hu.dtype == np.int16:  # a store's HU, a patch as read: clip, then shift (no float pass)
    out = np.clip(hu, _FIXED_MIN // _STEPS_PER_HU, _FIXED_MAX // _STEPS_PER_HU)
    return np.left_shift(out, 3, out=out)
  x = np.multiply(hu, np.float32(_STEPS_PER_HU), dtype=np.float32)
  out = np.empty(hu.shape, np.int16)
  _ceil_into(x, out)
  return out


def _ceil_into(scaled: np.ndarray, out: np.ndarray) -> None:
  """out (int16) <- ceil(scaled) saturated to the fixed-point range; `scaled` (float32, HU / HU_STEP) is clobbered."""
  np.ceil(scaled, out=scaled)
  np.clip(scaled, _FIXED_MIN, _FIXED_MAX, out=scaled)
  np.copyto(out, scaled, casting="unsafe")


def _as_shipped(hu: np.ndarray, dtype: str) -> np.ndarray:
  """HU in the dtype they ship in: as read (a view of a memory map stays one) when the store's dtype is it;
  a value-preserving cast otherwise (int16 -> float32), never a rounding one."""
  hu = np.asarray(hu)
  if hu.dtype == dtype:
    return hu
  if not np.can_cast(hu.dtype, dtype, "safe"):
    raise ValueError(
      f"volume HU are {hu.dtype}, which {dtype} cannot hold exactly; a prepared store holds int16 HU "
      "(re-prepare it), or set data.decode_on_device=False"
    )
  return hu.astype(dtype)


class Scratch:
  """Per-thread arrays reused for a sample's intermediates that never leave the sample's making (zoom2's 2P^3
  window, read and then halved): reading a 32 MB window into memory the thread already holds skips the kernel
  zeroing fresh pages, ~20-30% of a zarr zoom2 read (benchmarks/RESULTS.md "#24"). One array per thread (a new
  shape replaces it); pickled empty (a Grain worker process starts its own)."""

  def __init__(self):
    self._local = threading.local()

  def array(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    key = (tuple(shape), np.dtype(dtype))
    held = getattr(self._local, "held", None)
    if held is None or held[0] != key:
      held = self._local.held = (key, np.empty(key[0], key[1]))
    return held[1]

  def __getstate__(self) -> dict:
    return {}

  def __setstate__(self, state: dict) -> None:
    self._local = threading.local()


def start_crop(
  volume, start: np.ndarray, size: np.ndarray, fill: float, shape=None, scratch: Scratch | None = None
) -> Callable[[], np.ndarray]:
  """`crop_padded`, begun: a lazy store volume (store.ChunkedVolume) starts reading the crop's inside now and the
  call waits for it, so reads started together overlap; anything else is read by the call. (`shape`: unused, the
  signature of start_gather_nearest.) `scratch`: the crop is read (a lazy volume) or a padded one assembled into
  this thread's reused array (the result is only valid until the thread's next read through the same scratch)."""
  inside = np.all(start >= 0) and np.all(start + size <= np.array(volume.shape[:3]))
  lazy = hasattr(volume, "read_async")
  out = (
    scratch.array(tuple(int(n) for n in size), volume.dtype) if scratch is not None and (lazy or not inside) else None
  )
  if not lazy:
    return lambda: crop_padded(volume, start, size, fill, out=out)
  if inside:
    return volume.read_async(tuple(slice(int(a), int(a + n)) for a, n in zip(start, size)), out=out)
  out, inner = _padded(volume, start, size, fill, out)
  if inner is None:
    return lambda: out
  return _filled(volume.read_async(inner[0], out=out[inner[1]]), out)


def start_gather_nearest(volume, start: np.ndarray, size: np.ndarray, fill: float, shape) -> Callable[[], np.ndarray]:
  """`gather_nearest`, begun (as start_crop): a lazy volume starts gathering the voxels inside it, into their block
  of the output, now; an array is gathered by the call."""
  index = [int(s) + nearest_indices(int(n), int(m)) for s, n, m in zip(start, size, shape)]
  lazy = hasattr(volume, "oindex_async")
  inside = [(i >= 0) & (i < d) for i, d in zip(index, volume.shape[:3])]
  if all(v.all() for v in inside):
    return volume.oindex_async(index) if lazy else lambda: _gather(volume, index)
  out = np.full(tuple(shape), fill, volume.dtype)
  if not all(v.any() for v in inside):
    return lambda: out
  # the indices rise along each axis, so the inside ones are one run of output positions
  block = tuple(slice(int(np.argmax(v)), int(np.argmax(v)) + int(v.sum())) for v in inside)
  kept = [i[v] for i, v in zip(index, inside)]
  if lazy:
    return _filled(volume.oindex_async(kept, out=out[block]), out)

  def gather() -> np.ndarray:
    out[block] = _gather(volume, kept)
    return out

  return gather


def _filled(read: Callable[[], np.ndarray], out: np.ndarray) -> Callable[[], np.ndarray]:
  """Wait for a read into part of `out`, then return all of it."""

  def wait() -> np.ndarray:
    read()
    return out

  return wait


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """Source voxel of each output voxel of an order-0 `resize` along one axis (scipy's floor(c + 0.5), clamped)."""
  return np.clip(np.floor(_source_coordinates(n_in, n_out) + 0.5).astype(np.intp), 0, n_in - 1)


def gather_nearest(volume, start: np.ndarray, size: np.ndarray, shape: tuple[int, ...], fill: float) -> np.ndarray:
  """`resize(crop_padded(volume, start, size, fill), shape, order=0)`, reading only the voxels it keeps: per axis
  the voxels start + nearest_indices(size, shape), those outside the volume `fill`. A lazy store volume gathers
  them itself (`oindex`: a zarr window decodes its chunks but assembles P^3, not 2P^3); an array (a memory map)
  is sliced to the box, then gathered one axis at a time."""
  return start_gather_nearest(volume, start, size, fill, shape)()


def _gather(volume, index: list[np.ndarray]) -> np.ndarray:
  if hasattr(volume, "oindex"):  # a volume that gathers itself but does not begin reads (a wrapper)
    return volume.oindex(index)
  lo = [int(i.min()) for i in index]
  box = np.asarray(volume[tuple(slice(a, int(i.max()) + 1) for a, i in zip(lo, index))])
  for axis in range(3):  # np.take: ~2x faster than fancy indexing here
    box = box.take(index[axis] - lo[axis], axis)
  return box
