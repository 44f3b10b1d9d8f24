"""The denoising and anomaly protocols on the real CT we have (generic CSV form), with the builtin prior.

  PYTHONPATH=. python benchmarks/evaluate_real_ct.py --data=../shared/data --out=/tmp/eval_real [--steps=10]

Builds, from a crop of example_ct.nii.gz: a simulated low-dose pair (white Gaussian noise of --noise_hu
added to the crop; a stand-in for quarter dose, whose real noise is correlated and streaky) and an anomaly
set (--cases crops, half of them with an inserted spherical hypodense lesion and its mask), then runs
`python -m meddiff_jax.main --config=configs/evaluate.py` on each CSV and prints both tables.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from meddiff_jax.data import nifti, volume_io, volumes  # noqa: E402


def crop(vol: volumes.Volume, start, size) -> volumes.Volume:
  sl = tuple(slice(s, s + n) for s, n in zip(start, size))
  aff = vol.affine.copy()
  aff[:3, 3] = vol.world(np.array(start))
  return volumes.Volume(vol.data[sl].copy(), aff)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
  ap.add_argument("--out", default="/tmp/eval_real")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--noise_hu", type=float, default=30.0)
  ap.add_argument("--cases", type=int, default=4)
  ap.add_argument("--size", type=int, nargs=3, default=(32, 32, 32))
  ap.add_argument("--anomaly_size", type=int, nargs=3, default=(32, 32, 32))
  ap.add_argument("--overlap", type=float, default=0.0)
  ap.add_argument("--protocols", nargs="+", default=("denoising", "anomaly"))
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  ct = volume_io.load(os.path.join(args.data, "example_ct.nii.gz"))
  rng = np.random.default_rng(0)
  size = tuple(args.size)

  base = crop(ct, (37, 25, 40), size)  # abdomen above the pelvis
  nifti.save(base, f"{args.out}/high.nii.gz")
  low = volumes.Volume(base.data + rng.normal(0, args.noise_hu, size).astype(np.float32), base.affine)
  nifti.save(low, f"{args.out}/low.nii.gz")
  with open(f"{args.out}/denoising.csv", "w") as f:
    f.write("id,low,high\nexample_ct_crop,low.nii.gz,high.nii.gz\n")

  rows = ["id,image,label,is_abnormal"]
  size = tuple(args.anomaly_size)
  for i in range(args.cases):
    v = crop(ct, (30 + 6 * i, 62, 36 + 8 * (i % 2)), size)  # anterior wall: the crop holds air (CT check)
    mask = np.zeros(size, np.uint8)
    if i % 2:
      body = np.argwhere((v.data > 0) & (v.data < 100))  # soft tissue
      c = body[rng.integers(len(body))]
      grid = np.indices(size).transpose(1, 2, 3, 0)
      mask = (np.linalg.norm((grid - c) * np.array(v.spacing), axis=-1) < 12.0).astype(np.uint8)
      v = volumes.Volume(np.where(mask > 0, v.data - 50.0, v.data).astype(np.float32), v.affine)
    nifti.save(v, f"{args.out}/anom{i}.nii.gz")
    nifti.save(volumes.Volume(mask, v.affine), f"{args.out}/anom{i}_mask.nii.gz")
    rows.append(f"crop{i},anom{i}.nii.gz,anom{i}_mask.nii.gz,{i % 2}")
  with open(f"{args.out}/anomaly.csv", "w") as f:
    f.write("\n".join(rows) + "\n")

  protocols = [p for p in ("denoising", "anomaly") if p in args.protocols]
  for protocol, csv in ((p, f"{p}.csv") for p in protocols):
    cmd = [
      sys.executable,
      "-m",
      "meddiff_jax.main",
      "--config=configs/evaluate.py",
      f"--config.protocol={protocol}",
      f"--config.pairs={args.out}/{csv}",
      f"--config.num_steps={args.steps}",
      f"--config.overlap={args.overlap}",
      f"--workdir={args.out}/{protocol}",
    ]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=ROOT))


if __name__ == "__main__":
  main()
