"""Region curation: cut whole-body / multi-region CT into head-and-neck, chest and abdomen sub-volumes.

MedDiff-FM trains on three coarse regions and cuts its whole-body scans (TotalSegmentator, AutoPET) into
them with TotalSegmentator masks. The paper does not say where; we cut along the superior (S) world axis
at these landmarks, each a z extent of TotalSegmentator classes (looked up by name, so any class map works):

  chest      [lowest lung voxel - 20 mm, highest lung voxel (apices) + 20 mm]
             The lungs are the chest: chest CT datasets (SegTHOR, CT-RATE) are framed on them, apex to
             costophrenic recesses, with a margin.
  abdomen    [lowest hip-bone voxel (ischial tuberosities) - 10 mm, top of liver / spleen (diaphragm
             domes) + 20 mm]. Abdominal datasets (AMOS, BTCV, WORD, AbdomenCT-1K) run from the
             diaphragm to the pelvis floor; the liver dome sits right under the right hemidiaphragm.
  head_neck  [lung apices - 30 mm, top of skull / brain + 10 mm]. Head-and-neck radiotherapy CT
             (StructSeg, HaN-Seg, SegRap) runs from the vertex to below the clavicles, so it reaches
             past the lung apices into the thoracic inlet.

Overlap is deliberate and mirrors the source datasets: chest and abdomen share the lung bases / upper
abdomen (from the lowest lung voxel - 20 mm up to the liver dome + 20 mm, typically 5-10 cm); head_neck
and chest share the thoracic inlet (apex - 30 mm to apex + 20 mm). A landmark missing from the scan (or
touching its first / last slice, i.e. truncated) falls back to the scan edge. A region is written only when
its anchor organs are present and its extent inside the scan is at least `min_extent_mm` (a pelvis-to-lung-
bases scan has 3 cm of lung: no chest sub-volume, one abdomen sub-volume).

Crops are index slices along the axis closest to S of the RAS-canonical grid; the crop's affine is the
parent's with its origin moved to the first kept voxel, so every voxel keeps its world position.

The region id space has a trap this module closes: id len(REGIONS) ("unknown") is the guidance null class,
so a training volume must always have a real region (`training_region_id`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence

import numpy as np

from meddiff_jax.data import geometry, preprocess, volumes

AUTO = ("", "auto", "whole_body", "wholebody")  # manifest regions that ask for landmark splitting

# (TotalSegmentator class-name patterns) per landmark; presence of any `anchor` class makes a region possible.
LUNG = ("lung_*",)
LIVER_SPLEEN = ("liver", "spleen")
HIP = ("hip_left", "hip_right")
HEAD_TOP = ("skull", "brain")
ABDOMEN_ANCHORS = (
  "liver",
  "spleen",
  "kidney_left",
  "kidney_right",
  "stomach",
  "pancreas",
  "small_bowel",
  "duodenum",
  "colon",
  "urinary_bladder",
  "hip_left",
  "hip_right",
)
HEAD_NECK_ANCHORS = ("skull", "brain", "vertebrae_C*", "thyroid_gland", "common_carotid_artery_*")


@dataclasses.dataclass(frozen=True)
class SplitConfig:
  """Margins (mm) around the landmarks and the smallest sub-volume worth writing."""

  chest_margin_mm: float = 20.0
  abdomen_top_margin_mm: float = 20.0
  abdomen_bottom_margin_mm: float = 10.0
  head_neck_below_apex_mm: float = 30.0
  head_top_margin_mm: float = 10.0
  min_extent_mm: Mapping[str, float] = dataclasses.field(
    default_factory=lambda: {"head_neck": 100.0, "chest": 120.0, "abdomen": 120.0}
  )
  min_voxels_per_slice: int = 5  # a slice counts for a structure with at least this many voxels (label noise)


@dataclasses.dataclass
class SubVolume:
  region: str
  image: volumes.Volume
  labels: volumes.Volume | None
  index_range: tuple[int, int]  # [start, stop) along `axis` of the parent
  axis: int
  z_range_mm: tuple[float, float]  # world S interval the region asked for (before clipping to the scan)


def training_region_id(name: str, where: str = "") -> int:
  """Region id for a training volume: a real region only; 'unknown' (the null class) is refused."""
  if name not in preprocess.REGIONS:
    raise ValueError(
      f"{where + ': ' if where else ''}region {name!r} is not one of {preprocess.REGIONS}; a training "
      "volume without a region would train the guidance null class (id "
      f"{preprocess.UNKNOWN_REGION}). Give it a region in the manifest or a TotalSegmentator mask."
    )
  return preprocess.REGIONS.index(name)


def superior_axis(affine: np.ndarray) -> int:
  """Voxel axis whose direction is closest to world S (+z)."""
  directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
  return int(np.argmax(np.abs(directions[2])))


def slice_z(affine: np.ndarray, shape: Sequence[int], axis: int) -> np.ndarray:
  """World z (mm) of the centre of each slice along `axis`."""
  centre = (np.array(shape, np.float64) - 1) / 2
  idx = np.tile(centre, (shape[axis], 1))
  idx[:, axis] = np.arange(shape[axis])
  return idx @ affine[2, :3] + affine[2, 3]


def ids_for(class_map: Mapping[int, str], patterns: Sequence[str]) -> list[int]:
  return [i for i, n in class_map.items() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


class _Landmarks:
  """z extents of label groups on one scan (slices with >= min_voxels voxels of the group)."""

  def __init__(self, labels: np.ndarray, affine: np.ndarray, class_map: Mapping[int, str], min_voxels: int):
    self.axis = superior_axis(affine)
    self.z = slice_z(affine, labels.shape, self.axis)
    # voxels per label per slice: one bincount per slice (no full-volume copy of a 1 mm whole-body map)
    size = max(class_map, default=0) + 1
    self.counts = np.stack(
      [
        np.bincount(np.clip(np.take(labels, k, axis=self.axis), 0, size).ravel(), minlength=size + 1)[:size]
        for k in range(labels.shape[self.axis])
      ]
    )
    self.class_map, self.min_voxels = class_map, min_voxels

  def slices(self, patterns: Sequence[str]) -> np.ndarray:
    ids = [i for i in ids_for(self.class_map, patterns) if i < self.counts.shape[1]]
    if not ids:
      return np.zeros(0, int)
    return np.where(self.counts[:, ids].sum(axis=1) >= self.min_voxels)[0]

  def extent(self, patterns: Sequence[str]) -> tuple[float, float, bool, bool] | None:
    """(z_low, z_high, truncated_low, truncated_high) or None when absent."""
    k = self.slices(patterns)
    if not len(k):
      return None
    zk = self.z[k]
    lo_k, hi_k = k[np.argmin(zk)], k[np.argmax(zk)]
    edges = {0, len(self.z) - 1}
    return float(zk.min()), float(zk.max()), lo_k in edges, hi_k in edges


def region_intervals(
  labels: np.ndarray, affine: np.ndarray, class_map: Mapping[int, str], cfg: SplitConfig = SplitConfig()
) -> dict[str, tuple[float, float]]:
  """Each region's wanted world-z interval (mm), unclipped; infinite where a landmark is missing/truncated."""
  lm = _Landmarks(labels, affine, class_map, cfg.min_voxels_per_slice)
  inf = float("inf")
  out: dict[str, tuple[float, float]] = {}
  lung = lm.extent(LUNG)
  if lung:
    lo = -inf if lung[2] else lung[0] - cfg.chest_margin_mm
    hi = inf if lung[3] else lung[1] + cfg.chest_margin_mm
    out["chest"] = (lo, hi)
  if lm.extent(ABDOMEN_ANCHORS):
    top, hip = lm.extent(LIVER_SPLEEN), lm.extent(HIP)
    hi = inf if top is None or top[3] else top[1] + cfg.abdomen_top_margin_mm
    lo = -inf if hip is None or hip[2] else hip[0] - cfg.abdomen_bottom_margin_mm
    out["abdomen"] = (lo, hi)
  if lm.extent(HEAD_NECK_ANCHORS):
    head = lm.extent(HEAD_TOP)
    hi = inf if head is None or head[3] else head[1] + cfg.head_top_margin_mm
    if lung and not lung[3]:
      lo = lung[1] - cfg.head_neck_below_apex_mm
    else:  # no lung apex in the scan: the neck's own lowest anchor
      anchor = lm.extent(HEAD_NECK_ANCHORS)
      lo = -inf if anchor[2] else anchor[0] - cfg.head_neck_below_apex_mm
    out["head_neck"] = (lo, hi)
  return out


def crop(volume: volumes.Volume, axis: int, start: int, stop: int) -> volumes.Volume:
  """Index slice [start, stop) along `axis`; the affine origin moves to the first kept voxel (exact)."""
  index = [slice(None)] * 3
  index[axis] = slice(start, stop)
  _, affine = geometry.box_grid(volume.shape, volume.affine, tuple(index))
  return volumes.Volume(np.ascontiguousarray(volume.data[tuple(index)]), affine, volume.path)


def split(
  image: volumes.Volume, labels: volumes.Volume, class_map: Mapping[int, str], cfg: SplitConfig = SplitConfig()
) -> list[SubVolume]:
  """Region sub-volumes of a scan from its TotalSegmentator label map (same grid); may be empty."""
  volumes.check_same_grid(image, labels)
  axis = superior_axis(image.affine)
  z = slice_z(image.affine, image.shape, axis)
  intervals = region_intervals(labels.data, labels.affine, class_map, cfg)
  out = []
  for region in preprocess.REGIONS:
    interval = intervals.get(region)
    if interval is None:
      continue
    keep = np.where((z >= interval[0]) & (z <= interval[1]))[0]
    if not len(keep):
      continue
    start, stop = int(keep.min()), int(keep.max()) + 1
    extent = abs(z[stop - 1] - z[start]) + abs(z[1] - z[0] if len(z) > 1 else 0.0)
    if extent < cfg.min_extent_mm[region]:
      continue
    out.append(
      SubVolume(region, crop(image, axis, start, stop), crop(labels, axis, start, stop), (start, stop), axis, interval)
    )
  return out


def resolve(
  image: volumes.Volume,
  labels: volumes.Volume | None,
  region: str,
  class_map: Mapping[int, str],
  cfg: SplitConfig = SplitConfig(),
) -> list[SubVolume]:
  """The sub-volumes to store for one scan: its given region as is, or the landmark split.

  region in REGIONS: the dataset says what it is (a chest CT stays whole). region in AUTO: split by the
  TotalSegmentator labels; without labels, or with no region large enough, a ValueError naming the file.
  """
  if region in preprocess.REGIONS:
    return [SubVolume(region, image, labels, (0, image.shape[2]), 2, (-np.inf, np.inf))]
  if region not in AUTO:
    raise ValueError(f"{image.path}: region {region!r} is not one of {preprocess.REGIONS} or 'auto'")
  if labels is None:
    raise ValueError(
      f"{image.path}: no region given and no TotalSegmentator mask to find one; set the region in the "
      f"manifest or --config.default_region (one of {preprocess.REGIONS}), or give a mask"
    )
  parts = split(image, labels, class_map, cfg)
  if not parts:
    raise ValueError(
      f"{image.path}: its mask {labels.path} shows no head_neck / chest / abdomen part of at least "
      f"{dict(cfg.min_extent_mm)} mm; set the region in the manifest"
    )
  return parts


# ------------------------------------------------------------------------------------------ regions of a task's scan
# A task must know which region it is processing (the region condition and the HU window come from it). Given a
# TotalSegmentator label map, the landmarks above say it; without one, `estimate` reads it off the HU.


@dataclasses.dataclass(frozen=True)
class Part:
  """One region of a scan: slices [start, stop) along `axis` (the voxel axis closest to world S)."""

  region: str
  axis: int
  start: int
  stop: int


def cover(
  intervals: Mapping[str, tuple[float, float]], z: np.ndarray, axis: int, cfg: SplitConfig = SplitConfig()
) -> list[Part]:
  """The parts that cover a scan whose slices sit at world z `z`, from the regions' wanted z intervals.

  Unlike training's `split` (which drops a region too short to train on), a task processes every slice: a region
  with at least `cfg.min_extent_mm` inside the scan is a part of its own; a shorter one is absorbed by its
  neighbour (a chest CT with 3 cm of upper abdomen is a chest CT); when none is that long, the longest is the
  scan's one region. Parts are ordered along the axis, stretched to the scan's ends and to each other (gaps
  closed), and keep the overlaps the intervals give (a task blends the parts across them).
  """
  step = float(abs(z[1] - z[0])) if len(z) > 1 else 0.0
  found = []
  for region in preprocess.REGIONS:
    if region not in intervals:
      continue
    lo, hi = intervals[region]
    keep = np.where((z >= lo) & (z <= hi))[0]
    if len(keep):
      start, stop = int(keep.min()), int(keep.max()) + 1
      found.append((region, start, stop, (stop - start) * step))
  if not found:
    return []
  long_enough = [f for f in found if f[3] >= cfg.min_extent_mm[f[0]]]
  chosen = sorted(long_enough or [max(found, key=lambda f: f[3])], key=lambda f: (f[1], f[2]))
  ranges = [[region, start, stop] for region, start, stop, _ in chosen]
  ranges[0][1], ranges[-1][2] = 0, len(z)
  for lower, upper in zip(ranges, ranges[1:]):
    if upper[1] > lower[2]:  # a gap between two parts: meet in its middle
      middle = (lower[2] + upper[1]) // 2
      lower[2], upper[1] = middle, middle
  return [Part(region, axis, start, stop) for region, start, stop in ranges]


def from_labels(labels: volumes.Volume, class_map: Mapping[int, str], cfg: SplitConfig = SplitConfig()) -> list[Part]:
  """The scan's parts from its TotalSegmentator label map (the landmarks of `region_intervals`); [] when the map
  shows no region's anchor organs."""
  axis = superior_axis(labels.affine)
  z = slice_z(labels.affine, labels.shape, axis)
  return cover(region_intervals(labels.data, labels.affine, class_map, cfg), z, axis, cfg)


# What `estimate` looks for, per axial slice at about ESTIMATE_MM resolution.
ESTIMATE_MM = 4.0
TISSUE_HU = -400.0  # above: body tissue (fat included); below: air or lung
OUTSIDE_AIR_HU = -950.0  # an air region touching the slice's border that is mostly below this is outside the body
LUNG_FRACTION = 0.10  # a slice whose enclosed lung-like air is at least this fraction of its body is a lung slice
# enclosed air above this is lung parenchyma (-900..-600 HU); below it, pure air: bowel and stomach gas, which in a
# cropped abdomen can fill 10 % of the section (example_ct's upper abdomen: 50-70 % of its enclosed air below it)
LUNG_MIN_HU = -950.0
ABDOMEN_ABOVE_LUNG_BASE_MM = 80.0  # the diaphragm domes (abdomen's top, + margin) sit this far above the lung bases
LUNG_MIN_RUN_MM = 20.0  # lungs: lung slices over at least this length (a few with bowel gas are not a chest)
LUNG_GAP_MM = 10.0  # lung slices this close belong to one run
HEAD_MAX_AREA_CM2 = 350.0  # without lungs, a small body section whose skull ring is at least
HEAD_BONE_FRACTION = 0.15  # this fraction of it (neck: ~5-10 % vertebra; a child's abdomen less) is a head
BONE_HU = 300.0  # without lungs: body sections this small are head / neck (adult abdomen: 400-1000)
ABDOMEN_MIN_AREA_CM2 = 350.0


@dataclasses.dataclass(frozen=True)
class Estimate:
  """`estimate`'s answer: the parts (empty: undecidable) and, in words, what it saw."""

  parts: list[Part]
  evidence: str


@dataclasses.dataclass(frozen=True)
class SliceFeatures:
  """Per slice along the superior `axis` (at about ESTIMATE_MM): the enclosed-air (lung) and bone (> BONE_HU)
  fractions of the body section, its area (cm^2), whether the field of view cuts it, and the slice's world z."""

  axis: int
  lung: np.ndarray
  bone: np.ndarray
  area: np.ndarray
  cropped: np.ndarray
  z: np.ndarray


def slice_features(hu: np.ndarray, affine: np.ndarray) -> SliceFeatures:
  """`SliceFeatures` from a copy of the scan at about ESTIMATE_MM (strided: no full-size temporary). Per slice: air
  regions (< TISSUE_HU) touching the border that are mostly below OUTSIDE_AIR_HU are outside the body; the other
  air (lungs, airways, bowel gas) is enclosed, and counted as lung above LUNG_MIN_HU; `cropped`: the body reaches
  the border."""
  from scipy import ndimage

  axis = superior_axis(affine)
  spacing = geometry.spacing_of(affine)
  step = [max(1, int(round(ESTIMATE_MM / s))) for s in spacing]
  small = np.asarray(hu[tuple(slice(None, None, k) for k in step)], np.float32)
  small = np.moveaxis(small, axis, 0)
  in_plane = [i for i in range(3) if i != axis]
  pixel_cm2 = float(np.prod([spacing[i] * step[i] for i in in_plane])) / 100.0
  lung, bone, area, cropped = (np.zeros(small.shape[0]) for _ in range(4))
  for k, section in enumerate(small):
    air = section < TISSUE_HU
    components, n = ndimage.label(air)
    border = np.unique(np.concatenate([components[0], components[-1], components[:, 0], components[:, -1]]))
    outside = np.zeros(n + 1, bool)
    if n:
      deep = ndimage.mean(section < OUTSIDE_AIR_HU, components, np.arange(1, n + 1))
      outside[1:] = np.isin(np.arange(1, n + 1), border) & (np.asarray(deep) > 0.5)
    body = ~outside[components]
    enclosed = body & air & (section > LUNG_MIN_HU)
    area[k] = body.sum() * pixel_cm2
    lung[k] = enclosed.sum() / max(body.sum(), 1)
    bone[k] = (body & (section > BONE_HU)).sum() / max(body.sum(), 1)
    cropped[k] = bool(body[0].any() or body[-1].any() or body[:, 0].any() or body[:, -1].any())
  z_all = slice_z(affine, hu.shape, axis)[:: step[axis]]
  return SliceFeatures(axis, lung, bone, area, cropped.astype(bool), z_all)


def lung_run(is_lung: np.ndarray, z: np.ndarray) -> np.ndarray:
  """Indices of the longest run of marked (lung) slices along z (gaps up to LUNG_GAP_MM bridged), if at least
  LUNG_MIN_RUN_MM long; else none."""
  order = np.argsort(z)
  runs, current = [], []
  for k in order:
    if not is_lung[k]:
      continue
    if current and z[k] - z[current[-1]] > LUNG_GAP_MM + 1e-6:
      runs.append(current)
      current = []
    current.append(k)
  if current:
    runs.append(current)
  best = max(runs, key=lambda r: z[r[-1]] - z[r[0]], default=[])
  if not best or z[best[-1]] - z[best[0]] < LUNG_MIN_RUN_MM:
    return np.zeros(0, int)
  return np.asarray(best)


def estimate(hu: np.ndarray, affine: np.ndarray, cfg: SplitConfig = SplitConfig()) -> Estimate:
  """The scan's regions read off its HU: lung slices (enclosed air above LUNG_MIN_HU >= LUNG_FRACTION of the body)
  are the chest, with `cfg`'s margins; body below the lung bases is abdomen up to ABDOMEN_ABOVE_LUNG_BASE_MM above
  them, body above the apices head_neck (from `cfg.head_neck_below_apex_mm` below them), as `region_intervals` cuts
  a label map. Without lungs, the body's cross-section decides (head / neck small, abdomen large) unless the field
  of view crops it. Parts as `cover` makes them, on the scan's own slices; none when it cannot tell."""
  f = slice_features(hu, affine)
  axis, lung, area, cropped, z_small = f.axis, f.lung, f.area, f.cropped, f.z
  z = slice_z(affine, hu.shape, axis)
  has_body = area > 10.0
  if not has_body.any():
    return Estimate([], "no body found (no voxels above -400 HU that are not outside air)")
  body = np.where(has_body)[0]
  lungs = lung_run(lung >= LUNG_FRACTION, z_small)
  inf = float("inf")
  if len(lungs):
    lo, hi = float(z_small[lungs].min()), float(z_small[lungs].max())
    bottom_cut = z_small[lungs].min() <= z_small.min()
    top_cut = z_small[lungs].max() >= z_small.max()
    intervals = {
      "chest": (-inf if bottom_cut else lo - cfg.chest_margin_mm, inf if top_cut else hi + cfg.chest_margin_mm)
    }
    body_z = z_small[body]
    if not bottom_cut and body_z.min() < lo:
      intervals["abdomen"] = (-inf, lo + ABDOMEN_ABOVE_LUNG_BASE_MM)
    if not top_cut and body_z.max() > hi:
      intervals["head_neck"] = (hi - cfg.head_neck_below_apex_mm, inf)
    parts = cover(intervals, z, axis, cfg)
    seen = f"lungs (enclosed lung-like air >= {LUNG_FRACTION:.0%} of the body section) at world z {lo:.0f}..{hi:.0f} mm"
    return Estimate(parts, f"{seen} of a body at {body_z.min():.0f}..{body_z.max():.0f} mm")
  median_area = float(np.median(area[body]))
  seen = f"no lungs (over {LUNG_MIN_RUN_MM:.0f} mm); median body cross-section {median_area:.0f} cm^2"
  if median_area >= ABDOMEN_MIN_AREA_CM2:  # (a cropped field of view only hides more of it)
    return Estimate(cover({"abdomen": (-inf, inf)}, z, axis, cfg), f"{seen}: an abdomen's")
  head = lung_run((f.bone >= HEAD_BONE_FRACTION) & (area <= HEAD_MAX_AREA_CM2) & has_body, z_small)
  if len(head):
    return Estimate(
      cover({"head_neck": (-inf, inf)}, z, axis, cfg),
      f"{seen}, a skull (bone >= {HEAD_BONE_FRACTION:.0%} of the section) over {np.ptp(z_small[head]):.0f} mm: a head",
    )
  cut = " (and the field of view cuts it)" if np.mean(cropped[body]) > 0.5 else ""
  return Estimate([], f"{seen}{cut}, no skull: a neck, a child's abdomen or a crop of either")
