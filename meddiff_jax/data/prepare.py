"""Offline preparation: a folder of CT NIfTI (+ optional TotalSegmentator masks) -> a prepared store.

`python -m meddiff_jax.main --config=configs/prepare.py --config.input_dir=IN --config.output_dir=OUT`

Per file: load + reorient to RAS, validate (readable, 3D, finite, CT in HU, mask on the same grid, crop
position vs its parent when the manifest names one), resample to the target spacing (trilinear image,
nearest mask), store int16 HU + label map. Parallel over files, resumable (prepared files are skipped),
and a bad file never stops the run: it is reported with its reason in OUT/report.json.
"""

from __future__ import annotations

import concurrent.futures
import csv
import fnmatch
import glob
import hashlib
import json
import os
import time
from typing import Any

import numpy as np
from absl import logging

from meddiff_jax.data import multilevel, nifti, preprocess, store

HU_CLIP = (-1024.0, 3071.0)


def _stem(path: str) -> str:
  name = os.path.basename(path)
  for ext in (".nii.gz", ".nii"):
    if name.endswith(ext):
      return name[: -len(ext)]
  return os.path.splitext(name)[0]


def volume_id(path: str, input_dir: str) -> str:
  """Readable and unique: the file stem plus a short hash of its path relative to the input dir."""
  rel = os.path.relpath(path, input_dir)
  return f"{_stem(path)}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def read_manifest(path: str, input_dir: str) -> dict[str, dict[str, str]]:
  """CSV (columns: image, region[, mask][, parent][, lesion]) or JSON list of such dicts; paths relative to
  input_dir. `lesion`: a lesion mask on the image grid, merged into the label map as LESION_LABEL (what
  ControlNet lesion fine-tuning reads)."""
  if path.endswith(".json"):
    with open(path) as f:
      rows = json.load(f)
  else:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
  entries = {}
  for row in rows:
    if "image" not in row:
      raise ValueError(f"{path}: manifest row without an 'image' column: {row}")
    resolve = lambda p: p if not p or os.path.isabs(p) else os.path.join(input_dir, p)
    image = os.path.normpath(resolve(row["image"]))
    entries[image] = {"region": row.get("region") or "", "mask": resolve(row.get("mask") or ""),
                      "parent": resolve(row.get("parent") or ""), "lesion": resolve(row.get("lesion") or "")}
  return entries


def find_jobs(config: Any) -> list[dict[str, str]]:
  """The images to prepare, each with region, mask and parent paths (possibly empty)."""
  input_dir = config.input_dir
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f"config.input_dir={input_dir!r} is not a directory")
  if config.manifest:
    entries = read_manifest(config.manifest, input_dir)
  else:
    paths = sorted(glob.glob(os.path.join(input_dir, "**", "*.nii*"), recursive=True))
    excluded = [p for p in paths if any(fnmatch.fnmatch(os.path.basename(p), pat) for pat in config.exclude)]
    entries = {os.path.normpath(p): {"region": "", "mask": "", "parent": "", "lesion": ""}
               for p in paths if p not in excluded}
  jobs = []
  for image, entry in entries.items():
    mask = entry["mask"]
    if not mask and config.mask_dir:
      candidate = os.path.join(config.mask_dir, os.path.basename(image))
      mask = candidate if os.path.exists(candidate) else ""
    jobs.append({"image": image, "region": entry["region"] or config.default_region, "mask": mask,
                 "parent": entry["parent"], "lesion": entry.get("lesion", ""), "id": volume_id(image, input_dir)})
  return jobs


def prepare_one(job: dict[str, str], output_dir: str, spacing: tuple[float, float, float],
                store_format: str = "zarr") -> dict[str, Any]:
  """Prepare one volume; returns a status dict instead of raising (runs in worker processes)."""
  t0 = time.perf_counter()
  try:
    preprocess.region_id(job["region"])  # validate early
    image = nifti.load(job["image"])
    nifti.check_ct(image)
    labels = None
    if job["mask"]:
      mask = nifti.load(job["mask"], is_mask=True)
      nifti.check_same_grid(image, mask)
      labels = mask
    if job["parent"]:
      nifti.check_crop_position(image, nifti.load(job["parent"]))
    if job.get("lesion"):
      lesion = nifti.load(job["lesion"], is_mask=True)
      nifti.check_same_grid(image, lesion)
      base = labels.data if labels is not None else np.zeros(image.shape, np.int16)
      labels = nifti.Volume(np.where(lesion.data > 0, multilevel.LESION_LABEL, base).astype(np.int16), image.affine,
                            lesion.path)
    original_spacing = image.spacing
    image.data = np.clip(image.data, *HU_CLIP)
    image = nifti.resample(image, spacing, order=1, fill=HU_CLIP[0])
    if labels is not None:
      labels = nifti.resample(labels, spacing, order=0, fill=0)
    meta = {"source": job["image"], "mask_source": job["mask"] or None, "lesion_source": job.get("lesion") or None,
            "region": job["region"],
            "affine": image.affine.tolist(), "spacing": list(image.spacing), "original_spacing": list(original_spacing),
            "hu_range": [float(image.data.min()), float(image.data.max())]}
    store.write_record(output_dir, job["id"], np.round(image.data), None if labels is None else labels.data, meta,
                       fmt=store_format)
    return {"image": job["image"], "id": job["id"], "status": "done", "seconds": round(time.perf_counter() - t0, 2)}
  except (nifti.VolumeError, ValueError, OSError, MemoryError) as e:
    return {"image": job["image"], "id": job["id"], "status": "failed", "reason": str(e)}


def run(config: Any) -> dict[str, Any]:
  """Prepare every job not already in the store; writes and returns the report."""
  if not config.input_dir or not config.output_dir:
    raise ValueError("prepare needs --config.input_dir=DIR and --config.output_dir=DIR")
  if config.store_format not in store.FORMATS:
    raise ValueError(f"config.store_format={config.store_format!r}; choose from {store.FORMATS}")
  os.makedirs(config.output_dir, exist_ok=True)
  jobs = find_jobs(config)
  done_ids = {r["id"] for r in store.read_records(config.output_dir)} if not config.overwrite else set()
  todo = [j for j in jobs if j["id"] not in done_ids]
  skipped = [{"image": j["image"], "id": j["id"], "status": "already prepared"} for j in jobs if j["id"] in done_ids]
  spacing = tuple(float(s) for s in config.spacing)
  results: list[dict[str, Any]] = []
  progress = _progress(len(todo))
  if config.workers > 1 and len(todo) > 1:
    with concurrent.futures.ProcessPoolExecutor(max_workers=config.workers) as pool:
      futures = [pool.submit(prepare_one, j, config.output_dir, spacing, config.store_format) for j in todo]
      for fut in concurrent.futures.as_completed(futures):
        results.append(_report_one(fut.result(), progress))
  else:
    for j in todo:
      results.append(_report_one(prepare_one(j, config.output_dir, spacing, config.store_format), progress))
  progress.close()
  report = {"input_dir": config.input_dir, "output_dir": config.output_dir, "spacing": list(spacing),
            "prepared": [r for r in results if r["status"] == "done"],
            "failed": [r for r in results if r["status"] == "failed"], "skipped": skipped,
            "total_in_store": len(store.read_records(config.output_dir))}
  with open(os.path.join(config.output_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  print(f"prepared {len(report['prepared'])}, failed {len(report['failed'])}, already done {len(skipped)}; "
        f"{report['total_in_store']} volumes in {config.output_dir}")
  for r in report["failed"]:
    print(f"  skipped: {r['reason']}")
  return report


def _report_one(result: dict[str, Any], progress) -> dict[str, Any]:
  if result["status"] == "failed":
    logging.warning("skipping %s", result["reason"])
  progress.update(1)
  return result


def _progress(total: int):
  from tqdm import tqdm  # a progress bar users know; cheap dependency
  return tqdm(total=total, desc="preparing", unit="vol", disable=total == 0)
