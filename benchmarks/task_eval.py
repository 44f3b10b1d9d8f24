"""The paper's evaluation protocol, shaped to the data we have.

Denoising: simulated low-dose noise (Gaussian, --noise_hu) added to a crop of the real CT in
../shared/data; PSNR / SSIM (abdomen window scaled to [-1, 1], data range 2) of the noisy input, a
Gaussian filter, non-local means (scikit-image), DiffPIR and partial diffusion with the pretrained prior.
Anomaly detection: synthetic hypodense lesions inserted into liver crops (TotalSegmentator liver mask);
volume-level AUROC over crops with / without a lesion, voxel-level AUROC / AUPRC of the anomaly map.

python benchmarks/task_eval.py [--checkpoint=tiny_phantom] [--crop=48] [--num_crops=6]
Writes benchmarks/results/task_eval.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
from scipy import ndimage

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--checkpoint", default="tiny_phantom")
  p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
  p.add_argument("--crop", type=int, default=48)
  p.add_argument("--noise_hu", type=float, default=30.0)
  p.add_argument("--num_crops", type=int, default=6)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--overlap", type=float, default=0.25)
  p.add_argument("--noise_t", type=int, default=500)
  p.add_argument("--out", default="")  # results file name under benchmarks/results  # the first run's protocol; the paper uses 950
  args = p.parse_args()

  import jax.numpy as jnp
  import ml_collections
  from skimage.restoration import denoise_nl_means

  from meddiff_jax.data import nifti, preprocess
  from meddiff_jax.diffusion import schedules
  from meddiff_jax.evaluation import metrics
  from meddiff_jax.tasks import anomaly, common, denoise, sliding_window
  from meddiff_jax import pretrained, sharding

  pre = pretrained.load(args.checkpoint)
  ct = nifti.load(pathlib.Path(args.data) / "example_ct.nii.gz")
  seg = nifti.load(pathlib.Path(args.data) / "example_seg_fast_force_split.nii.gz", is_mask=True)
  region = preprocess.region_id("abdomen")
  lo, hi = preprocess.window_bounds(region)
  rng = np.random.default_rng(0)
  c = args.crop
  liver = np.argwhere(seg.data == 5)
  centre = np.clip(liver.mean(0).astype(int), c // 2, np.array(ct.shape) - c // 2)
  sl = tuple(slice(int(m - c // 2), int(m - c // 2 + c)) for m in centre)
  clean_hu = ct.data[sl]
  task_cfg = ml_collections.ConfigDict(dict(overlap=args.overlap, window_batch=8))
  sigma_unit = args.noise_hu * 2 / (hi - lo)
  result = {"checkpoint": args.checkpoint, "crop": c, "noise_hu": args.noise_hu, "sigma_unit": sigma_unit,
            "command": " ".join(sys.argv)}

  # --- denoising -------------------------------------------------------------------------------------------
  clean = preprocess.hu_to_unit(clean_hu, region)
  noisy = np.clip(clean + rng.normal(0, sigma_unit, clean.shape).astype(np.float32), -1, 1)
  est = denoise.estimate_noise_sigma(noisy, clean_hu > -500)
  candidates = {"noisy input": noisy,
                "gaussian filter (sigma=1 vox)": ndimage.gaussian_filter(noisy, 1.0),
                "non-local means (skimage)": denoise_nl_means(noisy, h=0.8 * sigma_unit, sigma=sigma_unit,
                                                              patch_size=3, patch_distance=4, fast_mode=True)}
  import jax
  with sharding.activate(common.task_mesh(), sharding.DEFAULT_RULES):
    noisy_hu = preprocess.unit_to_hu(noisy, region)
    fn, _ = common.windowed_denoiser(pre, noisy.shape, region, common.structure_volume(pre, None, noisy_hu), task_cfg)
    y = jnp.asarray(noisy)[None, ..., None]
    ts = denoise.diffpir_timesteps(pre.schedule, sigma_unit, args.steps)
    t0 = time.perf_counter()
    out = jax.jit(lambda y: denoise.diffpir(fn, pre.schedule, y, jnp.float32(sigma_unit), ts, jax.random.key(0),
                                            lam=10.0, zeta=0.0))(y)
    candidates["DiffPIR (lambda=10)"] = np.asarray(out)[0, ..., 0]
    result["diffpir_seconds"] = time.perf_counter() - t0
    t_start = int(schedules.timestep_for_noise_level(pre.schedule, jnp.float32(sigma_unit)))
    out = jax.jit(lambda y: denoise.partial_diffusion(fn, pre.schedule, y, t_start, args.steps, jax.random.key(1),
                                                      input_sigma=jnp.float32(sigma_unit)))(y)
    candidates["partial diffusion"] = np.asarray(out)[0, ..., 0]
  result["estimated_sigma_unit"] = est
  result["denoising"] = {name: {"psnr": metrics.psnr(clean, img, 2.0), "ssim": metrics.ssim(clean, img, 2.0)}
                         for name, img in candidates.items()}
  for name, m in result["denoising"].items():
    print(f"{name:32s} PSNR {m['psnr']:6.2f} dB  SSIM {m['ssim']:.4f}")
  from meddiff_jax.evaluation import montage
  montage.save_png(montage.slice_montage([clean, noisy, candidates["non-local means (skimage)"],
                                          candidates["DiffPIR (lambda=10)"]], tile=160),
                   str(ROOT / "docs" / "images" / "denoising_real_ct.png"))

  # --- anomaly detection ------------------------------------------------------------------------------------
  acfg = ml_collections.ConfigDict(dict(overlap=args.overlap, window_batch=8, noise_t=args.noise_t,
                                        num_steps=args.steps, seed=0))
  scores, labels, voxel_maps, voxel_truth = [], [], [], []
  amaps, truths, bodies = [], [], []
  for i in range(args.num_crops):
    centre_i = liver[rng.integers(len(liver))]
    centre_i = np.clip(centre_i, c // 2, np.array(ct.shape) - c // 2)
    sl_i = tuple(slice(int(m - c // 2), int(m - c // 2 + c)) for m in centre_i)
    hu = ct.data[sl_i].copy()
    truth = np.zeros(hu.shape, bool)
    if i % 2:  # lesion: hypodense sphere inside the liver
      liver_i = seg.data[sl_i] == 5
      pts = np.argwhere(ndimage.binary_erosion(liver_i, iterations=2))
      if len(pts):
        ctr = pts[rng.integers(len(pts))]
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in hu.shape], indexing="ij"), -1)
        truth = (np.linalg.norm(grid - ctr, axis=-1) <= 3.0) & liver_i
        hu[truth] -= 50.0
    unit = preprocess.hu_to_unit(hu, region)
    recon = anomaly.reconstruct(pre, unit, region, acfg, common.structure_volume(pre, None, hu))
    body = preprocess.body_mask(hu)
    amap = anomaly.anomaly_map(unit, recon, body, 1.0)
    amaps.append(amap)
    truths.append(truth)
    bodies.append(body)
    scores.append(anomaly.volume_score(amap, body))
    labels.append(bool(truth.any()))
    if truth.any():
      voxel_maps.append(amap[body].ravel())
      voxel_truth.append(truth[body].ravel())
  result["anomaly"] = {"volume_auroc": metrics.auroc(np.array(labels), np.array(scores)),
                       "voxel_auroc": metrics.auroc(np.concatenate(voxel_truth), np.concatenate(voxel_maps)),
                       "voxel_auprc": metrics.auprc(np.concatenate(voxel_truth), np.concatenate(voxel_maps)),
                       "num_crops": len(labels), "with_lesion": int(sum(labels)), "noise_t": args.noise_t,
                       **metrics.anomaly_aurocs(amaps, truths, bodies, axis=2)}
  print("anomaly:", json.dumps(result["anomaly"]))
  out = ROOT / "benchmarks" / "results" / (args.out or "task_eval.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
