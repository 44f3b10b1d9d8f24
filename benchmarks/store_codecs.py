"""What does each zarr codec cost per sample read, and per volume stored? (#12 store codec)

python benchmarks/store_codecs.py --store_dir=STORE [--codecs=zstd,zstd1,...] [--reps=3] [--real=1]
    [--out=benchmarks/results/store_codecs.json]

Per volume of STORE (a prepared store, only read) -- plus, with --real=1, the real CT in ../shared/data
resampled to 1.5 mm with its TotalSegmentator labels, as prepare would store it -- the HU (int16) and label
(uint8) arrays are rewritten once per codec of store.CODECS into a temporary directory (64^3 chunks, as
prepare writes them). Then, codecs interleaved round by round, fresh TensorStore handles each read (no
cache, as the pipeline reads), the process CPU time (TensorStore's threads included) to read
- a 256^3 crop of HU + labels at a random offset (clipped to the volume): what a zoom2 sample of a 128^3
  patch reads (multilevel.crop_padded of 2P), and
- a 128^3 crop of HU + labels: what a patch sample reads,
checked bitwise against the arrays written. Bytes: the compressed size on disk per volume (the bucket
cost) and per codec the ratio to the raw int16 + uint8 bytes. Medians over volumes x reps.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _volumes(store_dir: str, real: bool) -> list[tuple[str, np.ndarray, np.ndarray]]:
  from meddiff_jax import storage
  from meddiff_jax.data import store, volume_io, volumes

  out = []
  for rec in sorted(store.read_records(store_dir), key=lambda r: r["id"]):
    hu = np.asarray(store.open_array(storage.join(store_dir, rec["image"]))).astype(np.int16)
    labels = np.asarray(store.open_array(storage.join(store_dir, rec["labels"])))
    out.append((rec["id"], hu, labels))
  data = ROOT.parent / "shared" / "data"
  if real and (data / "example_ct.nii.gz").exists():
    ct = volumes.resample(volume_io.load(str(data / "example_ct.nii.gz")), (1.5,) * 3, order=1, fill=-1024)
    seg = volumes.resample(
      volume_io.load(str(data / "example_seg_fast_force_split.nii.gz"), is_mask=True), (1.5,) * 3, order=0, fill=0
    )
    out.append(("real_ct_1.5mm", np.round(np.clip(ct.data, -1024, 3071)).astype(np.int16), seg.data.astype(np.uint8)))
  return out


def _disk_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _read_cpu(
  path_hu: str, path_lab: str, start: tuple[int, ...], size: int, want: tuple[np.ndarray, np.ndarray]
) -> float:
  from meddiff_jax.data import store

  c0 = time.process_time()
  hu, lab = store.open_array(path_hu), store.open_array(path_lab)
  box = tuple(slice(s, min(s + size, n)) for s, n in zip(start, want[0].shape))
  got = hu[box], lab[box]
  cpu = time.process_time() - c0
  if not (np.array_equal(got[0], want[0][box]) and np.array_equal(got[1], want[1][box])):
    raise AssertionError(f"{path_hu}: the crop read back differs from the array written")
  return cpu


def main() -> None:
  from meddiff_jax.data import store

  p = argparse.ArgumentParser()
  p.add_argument("--store_dir", required=True)
  p.add_argument("--codecs", default=",".join(store.CODECS))
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--real", type=int, default=1)
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "store_codecs.json"))
  args = p.parse_args()
  codecs = args.codecs.split(",")
  vols = _volumes(args.store_dir, bool(args.real))
  print("volumes:", [(v, h.shape) for v, h, _ in vols], flush=True)
  rows: dict[str, dict] = {
    c: {
      "codec": c,
      "spec": store.CODECS[c],
      "mb_per_volume": [],
      "ratio": [],
      "write_cpu_s": [],
      "crop256_cpu_s": [],
      "crop128_cpu_s": [],
    }
    for c in codecs
  }
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    for c in codecs:
      for vid, hu, lab in vols:
        d = tmp / c
        c0 = time.process_time()
        store.write_array(str(d / f"{vid}.image.zarr"), hu, "zarr", codec=c)
        store.write_array(str(d / f"{vid}.labels.zarr"), lab, "zarr", codec=c)
        rows[c]["write_cpu_s"].append(time.process_time() - c0)
        size = _disk_bytes(d / f"{vid}.image.zarr") + _disk_bytes(d / f"{vid}.labels.zarr")
        rows[c]["mb_per_volume"].append(size / 1e6)
        rows[c]["ratio"].append((hu.nbytes + lab.nbytes) / size)
    rng = np.random.default_rng(0)
    for r in range(args.reps):
      for vid, hu, lab in vols:
        starts = {n: tuple(int(rng.integers(0, max(s - n, 0) + 1)) for s in hu.shape) for n in (256, 128)}
        for c in codecs if r % 2 == 0 else codecs[::-1]:  # interleaved, alternating order (a loaded box)
          paths = str(tmp / c / f"{vid}.image.zarr"), str(tmp / c / f"{vid}.labels.zarr")
          for n in (256, 128):
            rows[c][f"crop{n}_cpu_s"].append(_read_cpu(*paths, starts[n], n, (hu, lab)))
      print(f"round {r + 1}/{args.reps} done", flush=True)
  out = []
  base = None
  for c in codecs:
    row = {k: (statistics.median(v) if isinstance(v, list) and k != "spec" else v) for k, v in rows[c].items()}
    row["runs"] = {k: v for k, v in rows[c].items() if isinstance(v, list) and k != "spec"}
    base = base or row
    out.append(row)
    print(
      f"{c:12s} MB/volume {row['mb_per_volume']:7.2f} (x{row['ratio']:.2f})  256^3 crop {row['crop256_cpu_s']:.4f} "
      f"CPU s  128^3 crop {row['crop128_cpu_s']:.4f} CPU s  write {row['write_cpu_s']:.3f} CPU s",
      flush=True,
    )
  path = pathlib.Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(
    json.dumps(
      {"command": " ".join(sys.argv), "volumes": [(v, list(h.shape)) for v, h, _ in vols], "rows": out}, indent=1
    )
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
