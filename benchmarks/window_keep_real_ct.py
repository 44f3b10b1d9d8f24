"""What `meddiff --config=denoise` with the shipped defaults does to the HU of real CT, inside and outside the
window of the region it decides (#25: the scan's own HU kept outside the window).

python benchmarks/window_keep_real_ct.py [--data=../shared/data] [--scans=NAME,...] [--extra=--config.key=value]

Per scan of ../shared/data (NIfTI RAS and LPS, the stale-affine crop, the DICOM series): the denoise task run as a
user runs it (`python -m meddiff_jax.main --config=denoise --config.input=SCAN --config.output=OUT.nii.gz`, one CPU
device, shipped defaults: tiny_phantom, region auto, spacing checkpoint, window_blend_hu 20), then, on the scan's
own grid, the output against the input: Pearson correlation over all voxels, and the median |out - in| HU in
  air    input < -900 HU
  lung   -950..-500 HU inside the body (HU > -500 with each axial slice's holes filled)
  bone   input > 300 HU
  window input inside the decided region's window, 20 HU (the blend) clear of its edges (per part for a scan
         processed part by part)
with the region (and how it was decided) and the spacing as the run's JSON sidecar states them.
Writes benchmarks/results/window_keep_real_ct.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _common
import numpy as np
from scipy import ndimage

SCANS = (
  "example_ct.nii.gz",
  "example_ct_sm.nii.gz",
  "aorta_ct_cropped_lps.nii.gz",
  "pulmonary_ct_cropped_lps.nii.gz",
  "example_ct_dicom",
)


def filled_body(hu: np.ndarray, axis: int) -> np.ndarray:
  """HU > -500 with the holes of each slice across `axis` filled: the body with its lungs."""
  body = np.moveaxis(hu > -500, axis, 0)
  filled = np.stack([ndimage.binary_fill_holes(s) for s in body])
  return np.moveaxis(filled, 0, axis)


def window_masks(hu: np.ndarray, sidecar: dict, blend: float) -> np.ndarray:
  """Voxels whose input HU lies inside the window of the region of their part, `blend` HU clear of its edges."""
  from meddiff_jax.data import preprocess

  parts = sidecar.get("parts") or [{"region": sidecar["region"], "slices": [0, None], "axis": 2}]
  inside = np.zeros(hu.shape, bool)
  for part in parts:
    lo, hi = preprocess.window_bounds(part["region"])
    index = [slice(None)] * 3
    index[part["axis"]] = slice(*part["slices"])
    sub = hu[tuple(index)]
    inside[tuple(index)] |= (sub > lo + blend) & (sub < hi - blend)
  return inside


def measure(path: str, output: str, extra: list[str]) -> dict:
  from meddiff_jax.data import regions, volume_io

  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(_common.ROOT))
  env.pop("XLA_FLAGS", None)
  cli = [sys.executable, "-m", "meddiff_jax.main", "--config=denoise", f"--config.input={path}"]
  cli += [f"--config.output={output}", *extra]
  t0 = time.perf_counter()
  proc = subprocess.run(cli, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - t0
  row = {"input": os.path.basename(path.rstrip("/")), "rc": proc.returncode, "seconds": round(seconds, 1)}
  if proc.returncode:
    row["error"] = (proc.stderr.strip().splitlines() or [""])[-1][-400:]
    return row
  with open(output[: -len(".nii.gz")] + ".json") as f:
    sidecar = json.load(f)
  scan = volume_io.load(path)
  hu = np.asarray(scan.data, np.float32)
  out = np.asarray(volume_io.load(output).data, np.float32)
  assert out.shape == hu.shape, (out.shape, hu.shape)
  diff = np.abs(out - hu)
  body = filled_body(hu, regions.superior_axis(scan.affine))
  masks = {
    "air (< -900)": hu < -900,
    "lung (-950..-500 in body)": (hu > -950) & (hu < -500) & body,
    "bone (> 300)": hu > 300,
    "inside the window": window_masks(hu, sidecar, 20.0),
  }
  row.update(
    shape=list(hu.shape),
    spacing_mm=[round(float(s), 3) for s in scan.spacing],
    region=sidecar["region"],
    region_decided=sidecar["region_decided"],
    spacing=sidecar["spacing"],
    window=sidecar["window"],
    noise_hu=sidecar.get("noise_sigma_hu", sidecar.get("noise_hu")),
    correlation=round(float(np.corrcoef(hu.ravel().astype(np.float64), out.ravel().astype(np.float64))[0, 1]), 4),
    median_abs_diff_hu={k: (round(float(np.median(diff[m])), 1) if m.any() else None) for k, m in masks.items()},
    median_input_hu={k: (round(float(np.median(hu[m])), 1) if m.any() else None) for k, m in masks.items()},
    median_output_hu={k: (round(float(np.median(out[m])), 1) if m.any() else None) for k, m in masks.items()},
    voxels={k: int(m.sum()) for k, m in masks.items()},
  )
  row["console"] = [line for line in proc.stdout.splitlines() if line.strip()][-12:]
  return row


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--data", default=str(_common.DATA))
  p.add_argument("--scans", default=",".join(SCANS))
  p.add_argument("--extra", action="append", default=[], help="more --config.key=value for every run")
  p.add_argument("--out", default="window_keep_real_ct.json")
  args = p.parse_args()
  result = {"command": " ".join(sys.argv), "commit": _common.commit(), "rows": []}
  with tempfile.TemporaryDirectory() as tmp:
    for i, name in enumerate(args.scans.split(",")):
      row = measure(os.path.join(args.data, name), f"{tmp}/out{i}.nii.gz", args.extra)
      result["rows"].append(row)
      _common.write_json(args.out, result)  # after every scan: a stopped run keeps what it measured
      print(json.dumps({k: v for k, v in row.items() if k != "console"}), flush=True)
  keys = ["air (< -900)", "lung (-950..-500 in body)", "bone (> 300)", "inside the window"]
  print("| scan | region (decided) | correlation | " + " | ".join(f"median abs diff, {k}" for k in keys) + " |")
  for row in result["rows"]:
    if row["rc"]:
      print(f"| {row['input']} | refused: {row['error']} |")
      continue
    cells = [f"{row['median_abs_diff_hu'][k]} HU" for k in keys]
    print(f"| {row['input']} | {row['region']} | {row['correlation']:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
