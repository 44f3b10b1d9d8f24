"""Intensity windows and anatomical-structure channels.

Region-specific HU windows (MedDiff-FM): head-and-neck W400/L50, chest W1800/L-500, abdomen W360/L60,
mapped linearly to [-1, 1] with clipping; `unit_to_hu` inverts inside the window.

Structure channels group TotalSegmentator labels (ids as in class_map_total.json) into K named groups,
plus a thresholded body mask as the last channel (the paper's "118th class").
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence

import numpy as np

from meddiff_jax.models import conditions

REGIONS = ("head_neck", "chest", "abdomen")
UNKNOWN_REGION = len(REGIONS)  # the "null" class for unconditional samples / CFG
WINDOWS = {"head_neck": (400.0, 50.0), "chest": (1800.0, -500.0), "abdomen": (360.0, 60.0)}  # (width, level)
BODY_THRESHOLD_HU = -500.0

# Default coarse grouping: the paper uses all 117 classes + body; 12 groups keep the input narrow.
# Values are fnmatch patterns over TotalSegmentator class names. Order defines the channel order.
DEFAULT_STRUCTURE_GROUPS: dict[str, tuple[str, ...]] = {
  "lung": ("lung_*",),
  "airway": ("trachea",),
  "heart": ("heart", "atrial_appendage_left"),
  "liver": ("liver", "gallbladder"),
  "spleen": ("spleen",),
  "kidney": ("kidney_*", "adrenal_gland_*"),
  "gi": ("stomach", "esophagus", "small_bowel", "duodenum", "colon", "pancreas"),
  "vessels": (
    "aorta",
    "*vena*",
    "*artery*",
    "*_trunk",
    "pulmonary_vein",
    "portal_vein_and_splenic_vein",
    "brachiocephalic_vein_*",
  ),
  "spine": ("vertebrae_*", "sacrum", "spinal_cord"),
  "bone": (
    "rib_*",
    "sternum",
    "costal_cartilages",
    "hip_*",
    "femur_*",
    "humerus_*",
    "scapula_*",
    "clavicula_*",
    "skull",
  ),
  "muscle": ("gluteus_*", "autochthon_*", "iliopsoas_*"),
  "head": ("brain", "thyroid_gland"),
}


def region_id(name: str) -> int:
  if name in ("", "unknown", None):
    return UNKNOWN_REGION
  try:
    return REGIONS.index(name)
  except ValueError:
    raise ValueError(f"unknown region {name!r}; choose from {REGIONS} or 'unknown'") from None


def window_bounds(region: int | str) -> tuple[float, float]:
  """(lo, hi) HU of the region's window; unknown region uses the widest (chest) window."""
  name = region if isinstance(region, str) else (REGIONS[region] if region < len(REGIONS) else "chest")
  width, level = WINDOWS[name]
  return level - width / 2, level + width / 2


def hu_to_unit(hu: np.ndarray, region: int | str) -> np.ndarray:
  """Window and scale HU to [-1, 1] (float32)."""
  lo, hi = window_bounds(region)
  x = np.array(hu, np.float32)  # a copy, then in place: the same float32 operations, no temporaries
  x -= lo
  x /= hi - lo
  x *= 2.0
  x -= 1.0
  return np.clip(x, -1.0, 1.0, out=x)


def unit_to_hu(x: np.ndarray, region: int | str) -> np.ndarray:
  lo, hi = window_bounds(region)
  return ((np.asarray(x, np.float32) + 1.0) / 2.0 * (hi - lo) + lo).astype(np.float32)


def load_class_map(path: str) -> dict[int, str]:
  """TotalSegmentator id -> name from a class_map json ({'total': {...}} or a flat {id: name})."""
  with open(path) as f:
    raw = json.load(f)
  table = raw.get("total", raw)
  return {int(k): v for k, v in table.items() if str(k).isdigit()}


def group_lookup(class_map: Mapping[int, str], groups: Mapping[str, Sequence[str]]) -> np.ndarray:
  """LUT label id -> channel index + 1 (0: background / ungrouped). First matching group wins."""
  lut = np.zeros(max(class_map, default=0) + 1, np.uint8)
  names = list(groups)
  for label, cls in class_map.items():
    for g, name in enumerate(names):
      if any(fnmatch.fnmatchcase(cls, pat) for pat in groups[name]):
        lut[label] = g + 1
        break
  return lut


def body_mask(hu: np.ndarray) -> np.ndarray:
  """The body channel: HU > BODY_THRESHOLD_HU. The one definition training and every task use."""
  return np.asarray(hu) > BODY_THRESHOLD_HU


def structure_channels(labels: np.ndarray | None, hu: np.ndarray, lut: np.ndarray, num_groups: int) -> np.ndarray:
  """(…, num_groups + 1) uint8: one-hot structure groups from a label map, then the body mask."""
  out = np.zeros(hu.shape + (num_groups + 1,), np.uint8)
  if labels is not None:
    if labels.shape != hu.shape:
      raise ValueError(f"label map shape {labels.shape} != image shape {hu.shape}")
    safe = np.where((labels >= 0) & (labels < lut.shape[0]), labels, 0).astype(np.intp)
    group = lut[safe]
    for g in range(num_groups):
      out[..., g] = group == g + 1
  out[..., num_groups] = body_mask(hu)
  return out


def structure_packed(labels: np.ndarray | None, hu: np.ndarray, lut: np.ndarray, num_groups: int) -> np.ndarray:
  """`structure_channels` packed into one uint8 channel (`conditions.pack_structures`: group id << 1 | body), which
  `conditions.expand_structures(..., num_groups + 1)` turns back into exactly those channels: 1 byte per voxel
  instead of num_groups + 1."""
  if num_groups > conditions.MAX_PACKED_GROUPS:
    raise ValueError(f"{num_groups} structure groups do not fit a packed channel ({conditions.MAX_PACKED_GROUPS} do)")
  group = np.zeros(np.shape(hu), np.uint8)
  if labels is not None:
    if labels.shape != hu.shape:
      raise ValueError(f"label map shape {labels.shape} != image shape {hu.shape}")
    group = group_ids(labels, lut)
  return conditions.pack_structures(group, body_mask(hu))


def group_ids(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
  """Per-voxel LUT value (uint8) of a label map; labels outside the LUT read entry 0 (as structure_channels)."""
  labels = np.asarray(labels)
  safe = np.where((labels >= 0) & (labels < lut.shape[0]), labels, 0).astype(np.intp)
  return lut[safe]


def class_lookup(class_map: Mapping[int, str]) -> np.ndarray:
  """LUT label id -> itself for every class of the map (the paper's full classes; 0: background)."""
  lut = np.zeros(max(class_map, default=0) + 1, np.uint8)
  for label in class_map:
    lut[label] = label
  return lut


def structure_labels(labels: np.ndarray | None, hu: np.ndarray, lut: np.ndarray, num_classes: int) -> np.ndarray:
  """(…, 1) uint8 label map for a learned structure embedding: class ids 1..num_classes where labelled,
  num_classes + 1 for body without a class (the thresholded body mask), 0 outside the body; every voxel inside
  the body mask also carries `conditions.LABEL_BODY_BIT` (read by structure dropout, stripped by the model)."""
  if num_classes + 1 >= conditions.MAX_LABEL_IDS:
    raise ValueError(f"{num_classes} classes do not fit a label-id channel (at most {conditions.MAX_LABEL_IDS - 2})")
  body = body_mask(hu)
  out = np.where(body, num_classes + 1, 0).astype(np.uint8)
  if labels is not None:
    if labels.shape != hu.shape:
      raise ValueError(f"label map shape {labels.shape} != image shape {hu.shape}")
    safe = np.where((labels >= 0) & (labels < lut.shape[0]), labels, 0).astype(np.intp)
    cls = lut[safe]
    out = np.where(cls > 0, cls, out).astype(np.uint8)
  return (out | np.where(body, conditions.LABEL_BODY_BIT, 0).astype(np.uint8))[..., None]
