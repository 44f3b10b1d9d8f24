"""Which working spacing the denoise task should default to: the checkpoint's training spacing (resampled there and
back) or the scan's own grid, measured on held-out real CT finer than the checkpoint's spacing.

python benchmarks/spacing_choice.py [--checkpoint=tiny_phantom] [--noise_hu=30,50] [--crop=64] [--steps=10]

Scans (../shared/data, neither seen by tiny_phantom; the DICOM series is held out of tiny_ct too): a thorax crop
of the 1.5 mm CT angiography (aorta_ct_cropped_lps, chest window) and an abdomen crop of the 0.98 x 0.98 x 2 mm
DICOM series (abdomen window). Per scan and noise level: Gaussian noise of --noise_hu added in HU on the scan's
own grid (seed 0); then the whole `denoise` task as a user runs it (tasks/denoise.run with the region estimated
on the whole scan, the noise estimated, the window blend, back onto the scan's grid) with
--config.spacing=checkpoint and =input, and non-local means (scikit-image, h = 0.8 sigma, on the scan's grid)
as the classical reference. PSNR / SSIM against the clean crop in the region's window scaled to [-1, 1] (data
range 2), as benchmarks/task_eval.py scores.
Writes benchmarks/results/spacing_choice.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import _common
import numpy as np

SCANS = {
  "thorax (aorta_ct_cropped_lps, 1.5 mm)": "aorta_ct_cropped_lps.nii.gz",
  "abdomen (example_ct_dicom, 0.98 x 0.98 x 2 mm)": "example_ct_dicom",
}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--checkpoint", default="tiny_phantom")
  p.add_argument("--data", default=str(_common.DATA))
  p.add_argument("--noise_hu", default="30,50")
  p.add_argument("--crop", type=int, default=64)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--out", default="spacing_choice.json")
  args = p.parse_args()

  from skimage.restoration import denoise_nl_means

  from meddiff_jax import checks
  from meddiff_jax.configs import denoise as denoise_config
  from meddiff_jax.data import nifti, preprocess, regions, volume_io, volumes
  from meddiff_jax.evaluation import metrics
  from meddiff_jax.tasks import denoise

  result = {"command": " ".join(sys.argv), "commit": _common.commit(), "checkpoint": args.checkpoint, "rows": []}
  rng = np.random.default_rng(0)
  for label, name in SCANS.items():
    scan = volume_io.load(f"{args.data}/{name}")
    region = regions.estimate(scan.data, scan.affine).parts[0].region
    body = np.argwhere(preprocess.body_mask(scan.data)).mean(0).round().astype(int)
    index = tuple(
      slice(int(np.clip(c - args.crop // 2, 0, max(n - args.crop, 0))), None) for c, n in zip(body, scan.shape)
    )
    index = tuple(slice(s.start, min(s.start + args.crop, n)) for s, n in zip(index, scan.shape))
    affine = scan.affine.copy()
    affine[:3, 3] = scan.affine[:3, :3] @ np.array([s.start for s in index], float) + scan.affine[:3, 3]
    clean_hu = np.ascontiguousarray(scan.data[index]).astype(np.float32)
    unit = lambda hu, r=region: preprocess.hu_to_unit(hu, r)
    score = lambda hu, c=clean_hu: {
      "psnr": round(metrics.psnr(unit(c), unit(hu), 2.0), 3),
      "ssim": round(metrics.ssim(unit(c), unit(hu), 2.0), 4),
    }
    for noise_hu in (float(v) for v in args.noise_hu.split(",")):
      noisy_hu = np.round(clean_hu + rng.normal(0, noise_hu, clean_hu.shape)).astype(np.float32)
      lo, hi = preprocess.window_bounds(region)
      sigma_unit = noise_hu * 2 / (hi - lo)
      row = {"scan": label, "crop": list(clean_hu.shape), "region": region, "noise_hu": noise_hu}
      row["noisy input"] = score(noisy_hu)
      nlm = denoise_nl_means(
        unit(noisy_hu), h=0.8 * sigma_unit, sigma=sigma_unit, patch_size=3, patch_distance=4, fast_mode=True
      )
      row["non-local means"] = score(preprocess.unit_to_hu(nlm, region))
      with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/noisy.nii.gz"
        nifti.save(volumes.Volume(noisy_hu.astype(np.int16), affine), src, np.int16)
        for spacing in ("checkpoint", "input"):
          config = denoise_config.get_config()
          config.update(
            checkpoint=args.checkpoint,
            input=src,
            output=f"{tmp}/{spacing}.nii.gz",
            spacing=spacing,
            num_steps=args.steps,
            region=region,  # the whole scan's (a small crop of it is too small to tell)
          )
          t0 = time.perf_counter()
          denoise.run(checks.task(config))
          out = volume_io.load(f"{tmp}/{spacing}.nii.gz").data
          row[f"denoise, spacing={spacing}"] = {**score(out), "seconds": round(time.perf_counter() - t0, 1)}
      result["rows"].append(row)
      print(row, flush=True)
  _common.write_json(args.out, result)
  keys = ["noisy input", "non-local means", "denoise, spacing=checkpoint", "denoise, spacing=input"]
  print("| scan | noise | " + " | ".join(keys) + " |")
  for row in result["rows"]:
    cells = [f"{row[k]['psnr']:.2f} dB / {row[k]['ssim']:.3f}" for k in keys]
    print(f"| {row['scan']} | {row['noise_hu']:g} HU | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
