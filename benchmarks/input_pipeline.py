"""Input-pipeline throughput: our Grain multi-level pipeline vs MONAI's Dataset + RandSpatialCropd +
torch DataLoader on the same volumes.

python benchmarks/input_pipeline.py [--sizes=64,128] [--batches=20] [--threads=2]
Writes benchmarks/results/input_pipeline.json. Volumes: 4 phantoms at 256^3 (1.5 mm) and, when present,
the real CT in ../shared/data, prepared once into a temporary store (and as .nii.gz for MONAI).

python benchmarks/input_pipeline.py --stores [--sizes=64,128]
The prepared-store formats side by side on local disk (#12): zarr (TensorStore, chunked, zstd) vs the
older memory-mapped .npy, patches/s through the same Grain pipeline and bytes read per window.
Writes benchmarks/results/input_pipeline_stores.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_inputs(tmp: pathlib.Path, store_format: str = "zarr") -> tuple[pathlib.Path, pathlib.Path]:
  """The benchmark volumes prepared into tmp/store, zarr by default (prepare's `auto` would pick npy for a
  local folder, and the zarr rows would silently measure .npy: what pipeline_margin.py's first table did)."""
  from meddiff_jax.configs import prepare as prepare_config
  from meddiff_jax.data import nifti, phantom, prepare, volumes

  src = tmp / "nifti"
  src.mkdir()
  for i, region in enumerate(("abdomen", "chest", "head_neck", "abdomen")):
    p = phantom.make_phantom((256, 256, 256), (1.5, 1.5, 1.5), region, seed=i)
    nifti.save(volumes.Volume(np.round(p.hu), p.affine), src / f"ph{i}.nii.gz", np.int16)
    nifti.save(volumes.Volume(p.labels, p.affine), src / f"ph{i}_seg.nii.gz", np.uint8)
  real = ROOT.parent / "shared" / "data" / "example_ct.nii.gz"
  if real.exists():
    os.symlink(real, src / "real.nii.gz")
    os.symlink(ROOT.parent / "shared" / "data" / "example_seg_fast_force_split.nii.gz", src / "real_seg.nii.gz")
  manifest = tmp / "manifest.csv"
  rows = ["image,region,mask"] + [
    f"{p.name},abdomen,{p.name.replace('.nii.gz', '_seg.nii.gz')}"
    for p in sorted(src.glob("*.nii.gz"))
    if "_seg" not in p.name
  ]
  manifest.write_text("\n".join(rows) + "\n")
  c = prepare_config.get_config()
  c.input_dir, c.output_dir, c.manifest, c.spacing, c.workers = (
    str(src),
    str(tmp / "store"),
    str(manifest),
    (1.5,) * 3,
    2,
  )
  c.store_format = store_format
  prepare.run(c)
  return src, tmp / "store"


def bench_ours(store_dir, patch, batches, threads, structures, operation_probs):
  from meddiff_jax.configs import pretrain
  from meddiff_jax.data import pipeline, store

  cfg = pretrain.get_config("tiny").data  # every data key, with its visible default
  cfg.update(
    patch_size=patch,
    use_structures=structures,
    operation_probs=operation_probs,
    num_threads=threads,
    prefetch=8,
    worker_count=0,
    class_map="",
  )
  ds = pipeline.make_dataset(store.PreparedStore(str(store_dir)), cfg, batch_size=4, seed=0)
  it = iter(ds)
  next(it)  # warm-up: first touches of the memory maps
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return 4 * batches / (time.perf_counter() - t0)


def npy_copy(store_dir: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
  """The same volumes in the older one-.npy-per-array format."""
  from meddiff_jax.data import store

  for rec in store.read_records(str(store_dir)):
    hu = np.asarray(store.open_array(str(store_dir / rec["image"])))
    labels = np.asarray(store.open_array(str(store_dir / rec["labels"]))) if rec.get("labels") else None
    meta = {k: v for k, v in rec.items() if k not in ("id", "image", "labels", "shape", "whole")}
    store.write_record(str(out), rec["id"], hu, labels, meta, fmt="npy")
  return out


def _rchar() -> int:
  with open("/proc/self/io") as f:
    return int(next(l for l in f if l.startswith("rchar")).split()[1])


def window_bytes(store_dir: pathlib.Path, patch: int, windows: int = 30) -> dict[str, float]:
  """Mean bytes read for one random patch^3 window (image + label map), and the window's own bytes.

  zarr: bytes read by the process (/proc/self/io rchar: TensorStore's file driver preads whole chunks).
  npy: 4 KiB pages the window's rows touch in the memory map (what the kernel must bring in, before
  readahead), counted from the array layout.
  """
  from meddiff_jax.data import store

  ps = store.PreparedStore(str(store_dir))
  rng = np.random.default_rng(0)
  read, own = [], []
  for w in range(windows):
    rec = ps.records[w % len(ps)]
    names = [rec["image"]] + ([rec["labels"]] if rec.get("labels") else [])
    shape = rec["shape"]
    start = [int(rng.integers(0, max(s - patch, 0) + 1)) for s in shape]
    sl = tuple(slice(a, a + min(patch, s)) for a, s in zip(start, shape))
    total = 0
    for name in names:
      arr = ps._array(name)
      if isinstance(arr, np.memmap):
        total += _pages_touched(arr, sl) * 4096
      else:
        r0 = _rchar()
        arr[sl]
        total += _rchar() - r0
      own.append(int(np.prod([s.stop - s.start for s in sl])) * arr.dtype.itemsize)
    read.append(total)
  return {"bytes_read_per_window": float(np.mean(read)), "window_bytes": float(np.sum(own) / windows)}


def _pages_touched(arr: np.memmap, sl: tuple[slice, ...]) -> int:
  x, y, z = (np.arange(s.start, s.stop) for s in sl)
  _, ny, nz = arr.shape
  item = arr.dtype.itemsize
  row_start = arr.offset + ((x[:, None] * ny + y[None, :]) * nz + z[0]) * item
  first = row_start // 4096
  last = (row_start + len(z) * item - 1) // 4096
  pages = set()
  for a, b in zip(first.ravel(), last.ravel()):
    pages.update(range(int(a), int(b) + 1))
  return len(pages)


def compare_stores(store_dir, sizes, batches, threads):
  npy_dir = npy_copy(store_dir, store_dir.parent / "store_npy")
  rows = []
  for size in sizes:
    for fmt, d in (("zarr", store_dir), ("npy", npy_dir)):
      row = {
        "patch": size,
        "format": fmt,
        "multilevel_with_structures": bench_ours(d, size, batches, threads, True, (1 / 3, 1 / 3, 1 / 3)),
        "crop_only": bench_ours(d, size, batches, threads, False, (0, 0, 1)),
        **window_bytes(d, size),
      }
      rows.append(row)
      print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
  sizes_on_disk = {
    fmt: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    for fmt, d in (("zarr", store_dir), ("npy", npy_dir))
  }
  print("bytes on disk:", sizes_on_disk)
  return {"rows": rows, "bytes_on_disk": sizes_on_disk}


def bench_monai(src, patch, batches, threads, copy_cache):
  try:
    import monai.transforms as mt
    import torch  # noqa: F401  (the comparison needs it installed)
    from monai.data import CacheDataset, DataLoader
  except ImportError:
    return None
  files = [
    {"image": str(p), "label": str(p).replace(".nii.gz", "_seg.nii.gz")}
    for p in sorted(src.glob("*.nii.gz"))
    if "_seg" not in p.name
  ]
  load = mt.Compose(
    [
      mt.LoadImaged(["image", "label"]),
      mt.EnsureChannelFirstd(["image", "label"]),
      mt.Spacingd(["image", "label"], (1.5, 1.5, 1.5), mode=("bilinear", "nearest")),
      mt.ScaleIntensityRanged("image", -120, 240, -1, 1, clip=True),
    ]
  )
  crop = mt.RandSpatialCropd(["image", "label"], (patch,) * 3, random_size=False)
  # copy_cache=True (MONAI's default) deep-copies the cached volume for every sample before the random crop
  ds = CacheDataset(
    files * 64,
    transform=mt.Compose([load, crop]),
    cache_rate=1.0,
    num_workers=threads,
    progress=False,
    copy_cache=copy_cache,
  )
  loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=threads, persistent_workers=threads > 0)
  it = iter(loader)
  next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return 4 * batches / (time.perf_counter() - t0)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", default="64,128")
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--stores", action="store_true", help="compare the zarr and .npy store formats (#12)")
  args = p.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    src, store_dir = make_inputs(pathlib.Path(tmp))
    print(f"prepared inputs in {time.perf_counter() - t0:.1f} s")
    if args.stores:
      result = compare_stores(store_dir, list(map(int, args.sizes.split(","))), args.batches, args.threads)
      out = ROOT / "benchmarks" / "results" / "input_pipeline_stores.json"
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(json.dumps({"command": " ".join(sys.argv), **result}, indent=2))
      print(f"wrote {out}")
      return
    for size in map(int, args.sizes.split(",")):
      row = {
        "patch": size,
        "ours_multilevel_with_structures": bench_ours(
          store_dir, size, args.batches, args.threads, True, (1 / 3, 1 / 3, 1 / 3)
        ),
        "ours_multilevel_image_only": bench_ours(
          store_dir, size, args.batches, args.threads, False, (1 / 3, 1 / 3, 1 / 3)
        ),
        "ours_patch_crop_only": bench_ours(store_dir, size, args.batches, args.threads, False, (0, 0, 1)),
        "monai_cached_randspatialcrop": bench_monai(src, size, args.batches, args.threads, True),
        "monai_cached_randspatialcrop_no_copy": bench_monai(src, size, args.batches, args.threads, False),
      }
      rows.append(row)
      print("  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), "(patches/s)")
  out = ROOT / "benchmarks" / "results" / "input_pipeline.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
