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

from meddiff_jax.data import preprocess, volumes

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
  offset = np.zeros(3)
  offset[axis] = start
  affine = volume.affine.copy()
  affine[:3, 3] = volume.affine[:3, :3] @ offset + volume.affine[:3, 3]
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
