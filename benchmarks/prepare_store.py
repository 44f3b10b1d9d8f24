"""Preparation cost at the paper's 1 mm: seconds and store bytes per volume, on the real CT in ../shared/data.

python benchmarks/prepare_store.py [--data=../shared/data] [--spacing=1.0]

Prepares example_ct (+ its TotalSegmentator labels, region cut by landmarks) and the two 1.5 mm LPS crops
(chest, no mask) through configs/prepare.py, one worker, and prints per volume the output voxels, CPU and
wall seconds and bytes written; then the per-voxel rates and an extrapolation to 1,000 volumes of an assumed
size (printed, labelled as an extrapolation).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
ASSUMED_VOXELS = 40e6  # a typical paper volume at 1 mm: ~350 x 350 x 330 mm field of view (assumption)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--data", default=os.environ.get("MEDDIFF_TEST_DATA", str(REPO.parent / "shared" / "data")))
  parser.add_argument("--spacing", type=float, default=1.0)
  args = parser.parse_args()
  from meddiff_jax.configs import prepare as prepare_config
  from meddiff_jax.data import prepare, store

  data = pathlib.Path(args.data)
  with tempfile.TemporaryDirectory() as tmp:
    manifest = pathlib.Path(tmp) / "m.csv"
    manifest.write_text(
      "image,region,mask\n"
      f"{data / 'example_ct.nii.gz'},auto,{data / 'example_seg_fast_force_split.nii.gz'}\n"
      f"{data / 'aorta_ct_cropped_lps.nii.gz'},chest,\n"
      f"{data / 'pulmonary_ct_cropped_lps.nii.gz'},chest,\n"
    )
    rows = []
    for line in manifest.read_text().splitlines()[1:]:
      one = pathlib.Path(tmp) / "one.csv"
      one.write_text("image,region,mask\n" + line + "\n")
      out = pathlib.Path(tmp) / f"out{len(rows)}"
      c = prepare_config.get_config()
      c.update(input_dir=str(data), output_dir=str(out), manifest=str(one), workers=1, spacing=(args.spacing,) * 3)
      cpu0, wall0 = time.process_time(), time.perf_counter()
      report = prepare.run(c)
      cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
      assert report["prepared"], report
      records = store.read_records(str(out))
      voxels = sum(int(np.prod(r["shape"])) for r in records)
      size = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".npy", ".json") and f.name != "report.json")
      rows.append(
        dict(
          image=pathlib.Path(line.split(",")[0]).name,
          records=len(records),
          voxels=voxels,
          cpu_s=round(cpu, 2),
          wall_s=round(wall, 2),
          bytes=size,
        )
      )
  for r in rows:
    print(json.dumps(r))
  vox = sum(r["voxels"] for r in rows)
  cpu_per_mvox = sum(r["cpu_s"] for r in rows) / vox * 1e6
  bytes_per_vox = sum(r["bytes"] for r in rows) / vox
  print(f"measured: {cpu_per_mvox:.3f} CPU s per 1M output voxels, {bytes_per_vox:.2f} bytes per output voxel")
  per_1000_s = cpu_per_mvox * ASSUMED_VOXELS / 1e6 * 1000
  print(
    f"extrapolated to 1,000 volumes of {ASSUMED_VOXELS / 1e6:.0f}M voxels at {args.spacing} mm: "
    f"{bytes_per_vox * ASSUMED_VOXELS * 1000 / 1e9:.0f} GB, {per_1000_s / 3600:.1f} CPU hours "
    f"({per_1000_s / 3600 / 16:.2f} h on 16 workers)"
  )


if __name__ == "__main__":
  main()
