"""The prepared-data store: one .npy per volume (and label map) plus a small JSON record each.

Why .npy + JSON rather than ArrayRecord: a training sample reads a 128^3 (or 256^3) window of a
~100M-voxel volume, and `np.load(mmap_mode='r')` gives zero-copy random access to exactly the pages that
window touches, with no extra dependency; record formats would read whole volumes. A volume counts as
prepared once its JSON exists (written last, atomically), which makes preparation resumable.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

from meddiff_jax.data import regions

RECORD_SUFFIX = ".json"


def record_path(output_dir: str, volume_id: str) -> str:
  return os.path.join(output_dir, volume_id + RECORD_SUFFIX)


def write_record(output_dir: str, volume_id: str, hu: np.ndarray, labels: np.ndarray | None,
                 meta: dict[str, Any], lowres: np.ndarray | None = None) -> dict[str, Any]:
  """Write arrays then the JSON record (tmp + rename: a crash never leaves a record without data)."""
  os.makedirs(output_dir, exist_ok=True)
  image_file = volume_id + ".image.npy"
  np.save(os.path.join(output_dir, image_file), hu.astype(np.int16))
  record = dict(meta, id=volume_id, image=image_file, shape=list(hu.shape))
  if labels is not None:
    record["labels"] = volume_id + ".labels.npy"
    np.save(os.path.join(output_dir, record["labels"]), labels.astype(np.uint8 if labels.max() < 256 else np.int16))
  if lowres is not None:  # a real low-resolution partner on the same grid (SR fine-tuning)
    record["lowres"] = volume_id + ".lowres.npy"
    np.save(os.path.join(output_dir, record["lowres"]), lowres.astype(np.int16))
  tmp = record_path(output_dir, volume_id) + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, record_path(output_dir, volume_id))
  return record


def read_records(output_dir: str) -> list[dict[str, Any]]:
  paths = sorted(p for p in glob.glob(os.path.join(output_dir, "*" + RECORD_SUFFIX)) if not p.endswith("report.json"))
  records = []
  for p in paths:
    with open(p) as f:
      records.append(json.load(f))
  return records


class PreparedStore:
  """VolumeStore over a prepared directory (memory-mapped, so Grain workers share the page cache)."""

  def __init__(self, directory: str):
    self.directory = directory
    self.records = read_records(directory)
    if not self.records:
      raise FileNotFoundError(f"{directory}: no prepared volumes (*.json records); run configs/prepare.py first")
    for rec in self.records:  # an 'unknown' region is the guidance null class: refuse, never train it
      regions.training_region_id(rec.get("region", "unknown"), os.path.join(directory, rec["id"] + RECORD_SUFFIX))

  @property
  def splits(self) -> list[str | None]:
    """Each volume's recorded split (train / val / test by patient, data/recipes.py), None if not recorded."""
    return [rec.get("split") for rec in self.records]

  def __len__(self) -> int:
    return len(self.records)

  def __repr__(self) -> str:
    return f"PreparedStore({self.directory!r}, n={len(self.records)})"

  def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    rec = self.records[index]
    hu = np.load(os.path.join(self.directory, rec["image"]), mmap_mode="r")
    labels = np.load(os.path.join(self.directory, rec["labels"]), mmap_mode="r") if rec.get("labels") else None
    return hu, labels, regions.training_region_id(rec.get("region", "unknown"), rec["id"])

  def load_lowres(self, index: int) -> np.ndarray | None:
    """The real low-resolution partner on the image grid, or None (the SR hint is then simulated)."""
    rec = self.records[index]
    return np.load(os.path.join(self.directory, rec["lowres"]), mmap_mode="r") if rec.get("lowres") else None
