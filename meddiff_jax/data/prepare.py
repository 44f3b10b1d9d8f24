"""Offline preparation: a folder of CT (NIfTI, DICOM series, NRRD/MHA; + optional TotalSegmentator masks)
-> a prepared store.

`python -m meddiff_jax.main --config=configs/prepare.py --config.input_dir=IN --config.output_dir=OUT`

Per volume: load + reorient to RAS, validate (readable, 3D, geometry, size limits, finite, CT in HU, mask on
the same grid, crop position vs its parent when the manifest names one), resample to the target spacing
(trilinear image, nearest mask), store int16 HU + label map. Parallel over volumes, resumable (prepared
volumes are skipped), and a bad file never stops the run: every file looked at and not prepared is in
OUT/report.json with its reason. The user's files are never written: OUT must be a new folder (or one this
command made), not IN or a folder around it.
"""

from __future__ import annotations

import concurrent.futures
import csv
import fnmatch
import json
import os
import signal
import threading
import time
from typing import Any

import numpy as np
from absl import logging

from meddiff_jax import storage
from meddiff_jax.data import dicom, multilevel, preprocess, recipes, regions, store, volume_io, volumes

HU_CLIP = (-1024.0, 3071.0)
MARKER = ".meddiff_prepared"  # written into every output folder this command creates
EMPTY_ENTRY = {"region": "", "mask": "", "parent": "", "lesion": ""}


def _inside(path: str, directory: str) -> bool:
  path, directory = os.path.abspath(path), os.path.abspath(directory)
  return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def read_manifest(path: str, input_dir: str, allow_outside: bool = False) -> dict[str, dict[str, str]]:
  """CSV (columns: image, region[, mask][, parent][, lesion][, lowres][, patient][, split]) or JSON list of such
  objects; paths relative to input_dir (an image may be a DICOM series folder). `lesion`: a lesion mask on the image
  grid, merged into the label map by multilevel.with_lesions, organs kept (ControlNet lesion fine-tuning); `lowres`:
  a real low-resolution scan of the same patient and extent (e.g. RPLHR-CT's 5 mm partner), stored interpolated onto
  the prepared grid (ControlNet SR fine-tuning uses it instead of simulated thick slices). Raises ValueError (one
  line) on an empty manifest, a wrong JSON shape, a row without an image, an image listed twice, or a path outside
  input_dir unless allow_outside."""
  try:
    if path.endswith(".json"):
      with open(path) as f:
        rows = json.load(f)
      if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(
          f"{path}: a JSON manifest must be a list of objects like "
          '[{"image": "a.nii.gz", "region": "chest"}], got ' + type(rows).__name__
        )
    else:
      with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
    raise ValueError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
  if not rows:
    raise ValueError(f"{path}: the manifest lists no images")
  entries: dict[str, dict[str, str]] = {}
  first_row: dict[str, int] = {}
  for n, row in enumerate(rows, start=2 if not path.endswith(".json") else 1):
    if not row.get("image"):
      raise ValueError(f"{path}: row {n} has no 'image' value: {row}")

    def resolve(p, column):
      if not p:
        return ""
      full = os.path.normpath(p if os.path.isabs(p) else os.path.join(input_dir, p))
      if not allow_outside and not _inside(full, input_dir):
        raise ValueError(
          f"{path}: row {n} {column} {p!r} is outside input_dir {input_dir} "
          "(set --config.allow_outside_paths=true to allow it)"
        )
      return full

    image = resolve(str(row["image"]), "image")
    if image in entries:
      raise ValueError(f"{path}: {row['image']!r} is listed twice (rows {first_row[image]} and {n})")
    first_row[image] = n
    entries[image] = {
      "region": str(row.get("region") or ""),
      "mask": resolve(str(row.get("mask") or ""), "mask"),
      "parent": resolve(str(row.get("parent") or ""), "parent"),
      "lesion": resolve(str(row.get("lesion") or ""), "lesion"),
      "lowres": resolve(str(row.get("lowres") or ""), "lowres"),
      **{k: str(row.get(k) or "") for k in recipes.EXTRA_COLUMNS},
    }
  return entries


def scan_input_dir(config: Any) -> tuple[dict[str, dict[str, Any]], list[dict[str, str]]]:
  """Images found under input_dir (NIfTI/NRRD/MHA files and DICOM series, each real folder walked once) and
  every other file looked at, with the reason it is not an image to prepare."""
  files = dicom.list_files(config.input_dir)
  seen_real, entries, ignored, other = set(), {}, [], []
  for path in files:
    real = os.path.realpath(path)
    if real in seen_real:
      ignored.append({"path": path, "reason": f"same file as another path already found ({real})"})
      continue
    seen_real.add(real)
    name = os.path.basename(path)
    pattern = next((pat for pat in config.exclude if fnmatch.fnmatch(name, pat)), None)
    if name.lower().endswith(volume_io.IMAGE_EXTENSIONS):
      if pattern:
        ignored.append({"path": path, "reason": f"matches exclude pattern {pattern!r} (a mask, not an image)"})
      else:
        entries[os.path.normpath(path)] = dict(EMPTY_ENTRY)
    else:
      other.append(path)
  series, skipped = dicom.scan(other)
  in_series = {p for members in series.values() for p, _ in members} | {s["path"] for s in skipped}
  ignored += [{"path": s["path"], "reason": s["reason"]} for s in skipped]
  ignored += [
    {"path": p, "reason": "unsupported file type (not NIfTI, NRRD/MHA or DICOM)"} for p in other if p not in in_series
  ]
  for uid, members in series.items():
    paths = sorted(p for p, _ in members)
    folder = os.path.dirname(paths[0])
    first = members[0][1]
    label = os.path.join(folder, str(first.get("SeriesDescription", "") or "series").replace(os.sep, "_"))
    entries[label] = dict(EMPTY_ENTRY, dicom_files=paths, series_uid=uid)
  return entries, ignored


def find_jobs(config: Any, ignored: list[dict[str, str]] | None = None) -> list[dict[str, Any]]:
  """The images to prepare, each with region, mask and parent paths (possibly empty). Files looked at and
  not used are appended to `ignored` with their reason."""
  input_dir = config.input_dir
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f"config.input_dir={input_dir!r} is not a directory")
  ignored = ignored if ignored is not None else []
  if config.dataset:  # a public dataset's published layout -> manifest rows (data/recipes.py)
    entries = recipes.build_manifest(config)
  elif config.manifest:
    entries = read_manifest(config.manifest, input_dir, bool(config.allow_outside_paths))
  else:
    entries, skipped = scan_input_dir(config)
    ignored += skipped
  jobs = []
  for image, entry in entries.items():
    mask = entry["mask"]
    if not mask and config.mask_dir and "dicom_files" not in entry:
      candidate = os.path.join(config.mask_dir, os.path.basename(image))
      mask = candidate if os.path.exists(candidate) else ""
    job = {
      "image": image,
      "region": entry["region"] or config.default_region,
      "mask": mask,
      "parent": entry["parent"],
      "lesion": entry.get("lesion", ""),
      "lowres": entry.get("lowres", ""),
      "id": store.volume_id(image, input_dir, entry.get("series_uid", "")),
      **recipes.job_extras(entry, image, input_dir, config),
    }
    if "dicom_files" in entry:
      job["dicom_files"] = entry["dicom_files"]
    jobs.append(job)
  return jobs


def check_output_dir(input_dir: str, output_dir: str) -> None:
  """Refuse an output folder that is, contains or lies inside the input, or holds files this command did
  not write (nothing of the user's may be overwritten). `output_dir` may be a URL (gs://...): never inside
  the local input, and looked at through the storage layer."""
  if storage.is_local(output_dir):
    inp, out = os.path.realpath(input_dir), os.path.realpath(output_dir)
    if inp == out:
      raise ValueError(f"config.output_dir={output_dir!r} is the input folder; give a new folder for the prepared data")
    if _inside(inp, out):
      raise ValueError(f"config.output_dir={output_dir!r} contains the input folder {input_dir!r}; give a separate one")
    if _inside(out, inp):
      raise ValueError(
        f"config.output_dir={output_dir!r} lies inside the input folder {input_dir!r}; its files would "
        "be mixed with yours; give a folder outside it"
      )
  if storage.listdir(output_dir) and not storage.exists(storage.join(output_dir, MARKER)):
    raise ValueError(
      f"config.output_dir={output_dir!r} already holds files that preparation did not write; give a new or empty folder"
    )


def _load_image(job: dict[str, Any], options: volumes.ReadOptions) -> volumes.Volume:
  if job.get("dicom_files"):
    series, skipped = dicom.scan(job["dicom_files"])
    if not series:
      raise volumes.VolumeError(job["image"], skipped[0]["reason"] if skipped else "no readable DICOM files")
    return volumes.canonical_ras(dicom.read_series(next(iter(series.values())), job["image"], options))
  return volume_io.load(job["image"], options=options, integer_hu=True)  # int16 HU when stored so: half the RAM


def clip_hu(data: np.ndarray) -> np.ndarray:
  """`data` clipped to HU_CLIP: in place for a scan read as int16 (no float64 copy of it), else a float32 copy."""
  if np.issubdtype(data.dtype, np.integer):
    return np.clip(data, int(HU_CLIP[0]), int(HU_CLIP[1]), out=data)
  return np.clip(data, *HU_CLIP).astype(np.float32, copy=False)


def _on_spacing(image: volumes.Volume, spacing: tuple[float, float, float]) -> bool:
  """Whether resampling `image` to `spacing` would give its own grid back (same shape and affine)."""
  from meddiff_jax.data import geometry

  shape, affine = geometry.resample_grid(image.shape, image.affine, spacing)
  return tuple(shape) == tuple(image.shape) and np.allclose(affine, image.affine, atol=1e-6)


def _die_with_parent(parent_pid: int) -> None:
  """Worker initializer: exit when the preparing process dies (even by kill -9), never linger."""
  try:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
  except (OSError, AttributeError):
    pass
  if os.getppid() != parent_pid:
    os._exit(1)

  def watch():
    while True:
      if os.getppid() != parent_pid:
        os._exit(1)
      time.sleep(0.5)

  threading.Thread(target=watch, daemon=True).start()


def onto_grid(volume: volumes.Volume, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """`volume` sampled (trilinear, by the exact voxel-to-voxel affine) at the voxels of another grid; -1024 HU
  outside. A partner scan that does not cover the grid is refused."""
  from scipy import ndimage

  m = np.linalg.inv(volume.affine) @ np.asarray(affine)
  corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
  src = (m @ corners.T)[:3].T
  if np.any(src < -1.0) or np.any(src > np.array(volume.shape) + 0.0):
    raise ValueError(f"{volume.path}: the low-resolution partner does not cover the image's extent")
  return ndimage.affine_transform(
    np.asarray(volume.data, np.float32),
    m[:3, :3],
    offset=m[:3, 3],
    output_shape=shape,
    order=1,
    mode="nearest",
    prefilter=False,
  )


def prepare_one(
  job: dict[str, Any],
  output_dir: str,
  spacing: tuple[float, float, float],
  options: volumes.ReadOptions | None = None,
  store_format: str = "zarr",
  whole_sizes: tuple[int, ...] = (),
  store_codec: str = store.DEFAULT_CODEC,
) -> dict[str, Any]:
  """Prepare one volume; returns a status dict instead of raising (runs in worker processes)."""
  t0 = time.perf_counter()
  options = options or volumes.ReadOptions()
  try:
    if job["region"] not in preprocess.REGIONS + regions.AUTO:
      raise ValueError(f"{job['image']}: region {job['region']!r} is not one of {preprocess.REGIONS} or 'auto'")
    image = _load_image(job, options)
    volumes.check_ct(image, assume_hu=options.assume_hu)
    labels = None
    if job["mask"]:
      mask = recipes.load_mask(job["mask"], job.get("class_map", ""), options)  # a label map or a per-class mask folder
      volumes.check_same_grid(image, mask)
      labels = mask
    if job["parent"]:
      volumes.check_crop_position(image, volume_io.load(job["parent"], options=options))
    if job.get("lesion"):
      lesion = volume_io.load(job["lesion"], is_mask=True, options=options)
      volumes.check_same_grid(image, lesion)
      labels = volumes.Volume(
        multilevel.with_lesions(None if labels is None else labels.data, lesion.data), image.affine, lesion.path
      )
    original_spacing = image.spacing
    image.data = clip_hu(image.data)
    # one sub-volume per region: the given region, or head_neck / chest / abdomen cut at mask landmarks
    parts = regions.resolve(
      image,
      labels,
      job["region"],
      recipes.class_map_from(job.get("class_map", "")),
      regions.SplitConfig(**job.get("split_config", {})),
    )
    split_scan = job["region"] not in preprocess.REGIONS
    ids = []
    for part in parts:
      image, labels = part.image, part.labels
      if not _on_spacing(image, spacing):  # (already there: stored as read, no float copy of the scan)
        image = volumes.resample(image, spacing, order=1, fill=HU_CLIP[0])
        if labels is not None:
          labels = volumes.resample(labels, spacing, order=0, fill=0)
      lowres = None
      if job.get("lowres"):
        partner = volume_io.load(job["lowres"], options=options)
        volumes.check_ct(partner, assume_hu=options.assume_hu)
        lowres = onto_grid(partner, image.affine, image.shape)
      if min(image.shape) < options.min_side_voxels:
        raise volumes.VolumeError(
          job["image"],
          f"only {image.shape} voxels at {spacing} mm, thinner than limits.min_side_voxels={options.min_side_voxels}",
        )
      meta = {
        "source": job["image"],
        "mask_source": job["mask"] or None,
        "lesion_source": job.get("lesion") or None,
        "lowres_source": job.get("lowres") or None,
        "region": part.region,
        "job_id": job["id"],
        "patient": job.get("patient") or job["id"],
        "split": job.get("split") or "train",
        "dataset": job.get("dataset", ""),
        "source_index_range": list(part.index_range) if split_scan else None,
        "affine": image.affine.tolist(),
        "spacing": list(image.spacing),
        "original_spacing": list(original_spacing),
        "hu_range": [float(image.data.min()), float(image.data.max())],
      }
      vid = f"{job['id']}-{part.region}" if split_scan else job["id"]
      store.write_record(
        output_dir,
        vid,
        image.data if np.issubdtype(image.data.dtype, np.integer) else np.round(image.data),
        None if labels is None else labels.data,
        meta,
        lowres=None if lowres is None else np.round(lowres),
        fmt=store_format,
        whole_sizes=whole_sizes,
        codec=store_codec,
      )
      ids.append(vid)
    return {
      "image": job["image"],
      "id": job["id"],
      "records": ids,
      "status": "done",
      "seconds": round(time.perf_counter() - t0, 2),
    }
  except (volumes.VolumeError, ValueError, OSError, MemoryError) as e:
    reason = str(e) or f"{type(e).__name__} while preparing {job['image']}"
    return {"image": job["image"], "id": job["id"], "status": "failed", "reason": reason}


def run(config: Any) -> dict[str, Any]:
  """Prepare every job not already in the store; writes and returns the report. Raises ValueError (one
  line) on bad directories / manifests, and when nothing could be prepared. `config` was checked by
  checks.prepare (main.py): directories given, input_dir exists, store_format and store_codec known."""
  check_output_dir(config.input_dir, config.output_dir)
  ignored: list[dict[str, str]] = []
  jobs = find_jobs(config, ignored)
  store_format = config.store_format
  if store_format == "auto":
    store_format = "zarr" if "://" in str(config.output_dir) else "npy"
  storage.makedirs(config.output_dir)
  if not storage.exists(storage.join(config.output_dir, MARKER)):
    storage.write_bytes(storage.join(config.output_dir, MARKER), b"")
  done_ids = set()
  if not config.overwrite:
    done_ids = {r.get("job_id", r.get("id")) for r in store.read_records(config.output_dir) if isinstance(r, dict)}
  todo = [j for j in jobs if j["id"] not in done_ids]
  skipped = [{"image": j["image"], "id": j["id"], "status": "already prepared"} for j in jobs if j["id"] in done_ids]
  spacing = tuple(float(s) for s in config.spacing)
  whole_sizes = tuple(int(s) for s in config.whole_sizes)
  options = volumes.ReadOptions.from_config(config)
  results: list[dict[str, Any]] = []
  progress = _progress(len(todo))
  if config.workers > 1 and len(todo) > 1:
    with concurrent.futures.ProcessPoolExecutor(
      max_workers=config.workers, initializer=_die_with_parent, initargs=(os.getpid(),)
    ) as pool:
      futures = [
        pool.submit(prepare_one, j, config.output_dir, spacing, options, store_format, whole_sizes, config.store_codec)
        for j in todo
      ]
      for fut in concurrent.futures.as_completed(futures):
        results.append(_report_one(fut.result(), progress))
  else:
    for j in todo:
      results.append(
        _report_one(
          prepare_one(j, config.output_dir, spacing, options, store_format, whole_sizes, config.store_codec), progress
        )
      )
  progress.close()
  if whole_sizes:  # volumes prepared before (resumed or older stores) get their whole levels too
    added = store.add_whole_levels(config.output_dir, whole_sizes, config.store_codec)
    if added:
      print(f"added whole levels {whole_sizes} to {added} volumes prepared before")
  failed = [r for r in results if r["status"] == "failed"]
  report = {
    "input_dir": config.input_dir,
    "output_dir": config.output_dir,
    "spacing": list(spacing),
    "prepared": [r for r in results if r["status"] == "done"],
    "failed": failed,
    "skipped": skipped,
    "not_prepared": [{"path": r["image"], "reason": r["reason"]} for r in failed] + ignored,
    "total_in_store": len(store.read_records(config.output_dir)),
  }
  storage.write_text(storage.join(config.output_dir, "report.json"), json.dumps(report, indent=1))
  print(
    f"prepared {len(report['prepared'])}, failed {len(failed)}, already done {len(skipped)}, other files "
    f"not used {len(ignored)}; {report['total_in_store']} volumes in {config.output_dir}"
  )
  for r in report["not_prepared"]:
    print(
      f"  not prepared: {r['path']}: {r['reason']}"
      if not r["reason"].startswith(r["path"])
      else f"  not prepared: {r['reason']}"
    )
  if not report["prepared"] and not skipped:
    raise ValueError(
      f"nothing prepared from {config.input_dir}: {len(failed)} volumes failed, {len(ignored)} other "
      f"files not used (reasons above and in {storage.join(config.output_dir, 'report.json')})"
    )
  return report


def _report_one(result: dict[str, Any], progress) -> dict[str, Any]:
  if result["status"] == "failed":
    logging.warning("skipping %s", result["reason"])
  progress.update(1)
  return result


def _progress(total: int):
  from tqdm import tqdm  # a progress bar users know; cheap dependency

  return tqdm(total=total, desc="preparing", unit="vol", disable=total == 0)
