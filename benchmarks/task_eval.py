"""The paper's evaluation protocol, shaped to the data we have, at one or several sampler step budgets.

Denoising: simulated low-dose noise (Gaussian, --noise_hu) added to a liver crop of the real CT in
../shared/data; PSNR / SSIM (abdomen window scaled to [-1, 1], data range 2) of the noisy input, a
Gaussian filter, non-local means (scikit-image), DiffPIR and partial diffusion with the pretrained prior.
Anomaly detection: synthetic hypodense lesions (-50 HU, radius 3 voxels) inserted into half of
--num_crops liver crops (TotalSegmentator liver mask); reconstruction from --noise_t; volume-level AUROC
over crops, voxel / slice / pixel AUROC and voxel AUPRC of the anomaly map.

Step budgets (#15): `--budgets=ddim:10,ddim:20,ddim:50,dpmpp_2m:10,dpmpp_2m:20,dpmpp_2m:50` runs partial
diffusion and the anomaly reconstruction at each (sampler, steps) with the same noise, plus `--reference`
(e.g. ddpm:1000, the paper's sampler: every timestep below the start); each budget is marked "matches"
when no metric is worse than the reference's by more than --psnr_tol dB / --ssim_tol / --auroc_tol
(one-sided: a budget better than the reference matches). Without --budgets: one budget, --sampler at
--steps (the #14 protocol). `--rescore` recomputes the marks of an existing --out file with the given
tolerances and prints the markdown tables (no model run).

python benchmarks/task_eval.py [--checkpoint=tiny_phantom] [--scan=example_ct|dicom] [--spacing=native|prior|X,Y,Z] [--crop=48] [--num_crops=8] [--steps=20]
  [--noise_t=500] [--budgets=...] [--reference=ddpm:1000] [--anomaly_reference=dpmpp_2m:100] [--only=denoising|anomaly] [--montage]
Writes benchmarks/results/task_eval.json (or --out).
"""

from __future__ import annotations

import argparse
import sys
import time

import _common
import numpy as np
from scipy import ndimage


def main():
  p = argparse.ArgumentParser()
  _common.add_prior_flags(p)
  _common.add_scan_flags(p)
  p.add_argument("--data", default=str(_common.DATA))
  p.add_argument("--crop", type=int, default=48)
  p.add_argument("--noise_hu", type=float, default=30.0)
  p.add_argument("--num_crops", type=int, default=8)
  p.add_argument("--steps", type=int, default=20, help="DiffPIR's steps, and the single budget without --budgets")
  p.add_argument(
    "--diffpir_steps",
    default="",
    help="DiffPIR budgets, e.g. 10,20,50,1000 (the largest is its "
    "reference; 1000 = every timestep below t*); default --steps",
  )
  p.add_argument("--sampler", default="ddim", help="the single budget's sampler without --budgets")
  p.add_argument("--budgets", default="", help="method:steps,... e.g. ddim:10,dpmpp_2m:20")
  p.add_argument("--reference", default="", help="method:steps of the reference budget, e.g. ddpm:1000")
  p.add_argument(
    "--anomaly_reference",
    default="",
    help="method:steps for the anomaly half (default --reference; DDPM from t=950 costs 951 network calls per window)",
  )
  p.add_argument("--overlap", type=float, default=0.25)
  p.add_argument("--noise_t", type=int, default=500, help="anomaly start (the first run's protocol; the paper: 950)")
  p.add_argument("--only", default="", help="denoising | anomaly (default both)")
  p.add_argument("--skip_diffpir", action="store_true")
  p.add_argument("--psnr_tol", type=float, default=0.1)
  p.add_argument("--ssim_tol", type=float, default=0.005)
  p.add_argument("--auroc_tol", type=float, default=0.01)
  p.add_argument("--montage", action="store_true", help="write docs/images/denoising_real_ct.png")
  p.add_argument("--out", default="task_eval.json")
  p.add_argument("--rescore", action="store_true")
  args = p.parse_args()
  if args.rescore:
    import json

    result = json.loads((_common.RESULTS / args.out).read_text())
    mark_matches(result, args)
    _common.write_json(args.out, result)
    print(markdown(result))
    return

  import jax
  import jax.numpy as jnp
  from skimage.restoration import denoise_nl_means

  from meddiff_jax import sharding
  from meddiff_jax.configs import denoise as denoise_config
  from meddiff_jax.data import geometry, preprocess
  from meddiff_jax.diffusion import samplers, schedules
  from meddiff_jax.evaluation import metrics
  from meddiff_jax.tasks import anomaly, common, denoise, sliding_window

  pre = _common.load_prior(args)
  ct, seg = _common.real_ct(args.data, args.scan, _common.scan_spacing(args, pre))
  region = preprocess.region_id("abdomen")
  lo, hi = preprocess.window_bounds(region)
  rng = np.random.default_rng(0)
  c = args.crop
  budgets = _common.parse_budgets(args.budgets) or [(args.sampler, args.steps)]
  reference = _common.parse_budgets(args.reference)
  runs = budgets + [r for r in reference if r not in budgets]
  a_reference = _common.parse_budgets(args.anomaly_reference) or reference
  a_runs = budgets + [r for r in a_reference if r not in budgets]
  sigma_unit = args.noise_hu * 2 / (hi - lo)
  wcfg = denoise_config.get_config()
  wcfg.update(overlap=args.overlap, window_batch=8)
  wcfg = denoise.DenoiseSpec.from_config(wcfg)  # the window options, typed as the tasks take them
  result = {
    "command": " ".join(sys.argv),
    "commit": _common.commit(),
    "checkpoint": args.checkpoint,
    "scan": args.scan,
    "spacing_mm": list(geometry.spacing_of(ct.affine)),
    "compute_dtype": str(pre.spec.dtype),
    "crop": c,
    "noise_hu": args.noise_hu,
    "sigma_unit": sigma_unit,
    "budgets": [f"{m}:{s}" for m, s in budgets],
    "reference": args.reference or None,
    "diffpir_steps": [int(s) for s in args.diffpir_steps.split(",")] if args.diffpir_steps else [args.steps],
    "anomaly_reference": args.anomaly_reference or args.reference or None,
  }
  mesh = common.task_mesh()

  def reconstructor(shape, frame, t_start, method, steps, input_sigma):
    """jit(y (1,X,Y,Z,1), structures, rng) -> partial diffusion from t_start; one compile per budget,
    reused for every crop (structures are an argument, not a constant)."""

    def f(y, structures, key):
      fn, _ = common.windowed_denoiser(pre, common.Canvas(shape, region, structures, frame, None), wcfg)
      return denoise.partial_diffusion(fn, pre.schedule, y, t_start, steps, key, input_sigma=input_sigma, method=method)

    return jax.jit(f)

  def timed(f, *a):
    t0 = time.perf_counter()
    out = np.asarray(jax.block_until_ready(f(*a)))
    return out, time.perf_counter() - t0

  # --- denoising -------------------------------------------------------------------------------------------
  if args.only in ("", "denoising"):
    sl = _common.crop_around(_common.liver_centre(seg), c, ct.shape)
    clean_hu = ct.data[sl]
    clean = preprocess.hu_to_unit(clean_hu, region)
    noisy = np.clip(clean + rng.normal(0, sigma_unit, clean.shape).astype(np.float32), -1, 1)
    result["estimated_sigma_unit"] = denoise.estimate_noise_sigma(noisy, clean_hu > -500)
    baselines = {
      "noisy input": noisy,
      "gaussian filter (sigma=1 vox)": ndimage.gaussian_filter(noisy, 1.0),
      "non-local means (skimage)": denoise_nl_means(
        noisy, h=0.8 * sigma_unit, sigma=sigma_unit, patch_size=3, patch_distance=4, fast_mode=True
      ),
    }
    score = lambda img: {"psnr": metrics.psnr(clean, img, 2.0), "ssim": metrics.ssim(clean, img, 2.0)}
    den = {name: score(img) for name, img in baselines.items()}
    noisy_hu = preprocess.unit_to_hu(noisy, region)
    y_pad, crop = sliding_window.pad_to_window(noisy, pre.patch_size, fill=-1.0)
    structures = common.structure_volume(pre, None, noisy_hu, pre.patch_size)
    y = jnp.asarray(y_pad)[None, ..., None]
    t_star = int(schedules.timestep_for_noise_level(pre.schedule, jnp.float32(sigma_unit)))
    result["t_star"] = t_star
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
      if not args.skip_diffpir:
        fn, plan = common.windowed_denoiser(pre, common.Canvas(y_pad.shape, region, structures, crop, None), wcfg)
        result["windows_per_step"] = int(plan.valid.sum())
        for steps in result["diffpir_steps"]:
          ts = denoise.diffpir_timesteps(pre.schedule, sigma_unit, steps)
          out, secs = timed(
            jax.jit(
              lambda y: denoise.diffpir(
                fn, pre.schedule, y, jnp.float32(sigma_unit), ts, jax.random.key(0), lam=10.0, zeta=0.0
              )
            ),
            y,
          )
          name = diffpir_name(result, steps)
          baselines[name] = out[0, ..., 0][crop]
          den[name] = {**score(baselines[name]), "seconds_incl_compile": secs, "network_calls": len(ts)}
          print(
            f"{name:32s} PSNR {den[name]['psnr']:6.2f} dB  SSIM {den[name]['ssim']:.4f}  ({secs:.1f} s)", flush=True
          )
        longest = diffpir_name(result, max(result["diffpir_steps"]))
        for steps in result["diffpir_steps"]:
          if len(result["diffpir_steps"]) > 1 and diffpir_name(result, steps) != longest:
            den[diffpir_name(result, steps)]["rmse_to_reference"] = _common.rmse(
              baselines[diffpir_name(result, steps)], baselines[longest]
            )
      partial = {}
      for method, steps in runs:
        f = reconstructor(y_pad.shape, crop, t_star, method, steps, jnp.float32(sigma_unit))
        out, secs = timed(f, y, structures, jax.random.key(1))
        partial[method, steps] = out[0, ..., 0][crop]
        name = f"partial diffusion {method}:{steps}"
        den[name] = {
          **score(partial[method, steps]),
          "seconds_incl_compile": secs,
          "network_calls": len(np.asarray(samplers.partial_timesteps(t_star, steps))),
        }
        print(f"{name:32s} PSNR {den[name]['psnr']:6.2f} dB  SSIM {den[name]['ssim']:.4f}  ({secs:.1f} s)", flush=True)
    if reference:
      for method, steps in budgets:
        den[f"partial diffusion {method}:{steps}"]["rmse_to_reference"] = _common.rmse(
          partial[method, steps], partial[reference[0]]
        )
    result["denoising"] = den
    if args.montage:
      from meddiff_jax.evaluation import montage

      montage.save_png(
        montage.slice_montage(
          [
            clean,
            noisy,
            baselines["non-local means (skimage)"],
            baselines[diffpir_name(result, result["diffpir_steps"][0])],
          ],
          tile=160,
        ),
        str(_common.ROOT / "docs" / "images" / "denoising_real_ct.png"),
      )
    _common.write_json(args.out, result)

  # --- anomaly detection ------------------------------------------------------------------------------------
  if args.only in ("", "anomaly"):
    liver = np.argwhere(seg.data == _common.LIVER)
    crops = []
    for i in range(args.num_crops):
      sl_i = _common.crop_around(liver[rng.integers(len(liver))], c, ct.shape)
      hu = ct.data[sl_i].copy()
      truth = np.zeros(hu.shape, bool)
      if i % 2:  # lesion: hypodense sphere inside the liver
        liver_i = seg.data[sl_i] == _common.LIVER
        pts = np.argwhere(ndimage.binary_erosion(liver_i, iterations=2))
        if len(pts):
          ctr = pts[rng.integers(len(pts))]
          grid = np.stack(np.meshgrid(*[np.arange(n) for n in hu.shape], indexing="ij"), -1)
          truth = (np.linalg.norm(grid - ctr, axis=-1) <= 3.0) & liver_i
          hu[truth] -= 50.0
      unit = preprocess.hu_to_unit(hu, region)
      y_pad, crop = sliding_window.pad_to_window(unit, pre.patch_size, fill=-1.0)
      crops.append(
        dict(
          hu=hu,
          unit=unit,
          truth=truth,
          body=preprocess.body_mask(hu),
          y=y_pad,
          crop=crop,
          structures=common.structure_volume(pre, None, hu, pre.patch_size),
        )
      )
    rows, recons = {}, {}
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
      for method, steps in a_runs:
        f = reconstructor(crops[0]["y"].shape, crops[0]["crop"], args.noise_t, method, steps, 0.0)
        amaps, secs, recons[method, steps] = [], 0.0, []
        for k in crops:  # same key per crop across budgets: the same x_T at noise_t
          out, s = timed(f, jnp.asarray(k["y"])[None, ..., None], k["structures"], jax.random.key(0))
          secs += s
          recons[method, steps].append(out[0, ..., 0][k["crop"]])
          amaps.append(anomaly.anomaly_map(k["unit"], recons[method, steps][-1], k["body"], 1.0))
        truths = [k["truth"] for k in crops]
        bodies = [k["body"] for k in crops]
        labels = np.array([t.any() for t in truths])
        vmaps = np.concatenate([a[b].ravel() for a, t, b in zip(amaps, truths, bodies) if t.any()])
        vtruth = np.concatenate([t[b].ravel() for t, b in zip(truths, bodies) if t.any()])
        row = {
          "volume_auroc": metrics.auroc(labels, np.array([anomaly.volume_score(a, b) for a, b in zip(amaps, bodies)])),
          "voxel_auroc": metrics.auroc(vtruth, vmaps),
          "voxel_auprc": metrics.auprc(vtruth, vmaps),
          **metrics.anomaly_aurocs(amaps, truths, bodies, axis=2),
          "seconds_incl_compile": secs,
          "network_calls_per_window": len(samplers.partial_timesteps(args.noise_t, steps)),
        }
        rows[f"{method}:{steps}"] = row
        print(f"anomaly {method}:{steps}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    if a_reference:  # distance of each budget's reconstructions to the reference's (same x_T per crop)
      for method, steps in budgets:
        rows[f"{method}:{steps}"]["recon_rmse_to_reference"] = float(
          np.mean([_common.rmse(a, b) for a, b in zip(recons[method, steps], recons[a_reference[0]])])
        )
    result["anomaly"] = {
      "num_crops": len(crops),
      "with_lesion": int(sum(k["truth"].any() for k in crops)),
      "noise_t": args.noise_t,
      "budgets": rows,
    }
  mark_matches(result, args)
  _common.write_json(args.out, result)
  print(markdown(result))


def diffpir_name(result: dict, steps: int) -> str:
  return "DiffPIR (lambda=10)" if len(result["diffpir_steps"]) == 1 else f"DiffPIR (lambda=10) {steps}"


def _worse_by_at_most(row: dict, ref: dict, keys_tols) -> bool:
  return all(ref[k] - row[k] <= tol for k, tol in keys_tols if np.isfinite(ref[k]))


def mark_matches(result: dict, args) -> None:
  """'matches_reference' on every budget: no metric worse than the reference's by more than its tolerance
  (denoising: PSNR and SSIM; anomaly: voxel / slice / pixel AUROC; the volume AUROC over a handful of crops
  moves in steps of 1/(positives x negatives) and is reported, not used)."""
  result["tolerances"] = {"psnr_db": args.psnr_tol, "ssim": args.ssim_tol, "auroc": args.auroc_tol}
  budgets = result["budgets"]
  den = result.get("denoising")
  if den and result.get("reference"):
    ref = den[f"partial diffusion {result['reference']}"]
    for b in budgets:
      row = den[f"partial diffusion {b}"]
      row["matches_reference"] = _worse_by_at_most(row, ref, (("psnr", args.psnr_tol), ("ssim", args.ssim_tol)))
  dsteps = result.get("diffpir_steps", [])
  if den and len(dsteps) > 1 and diffpir_name(result, max(dsteps)) in den:  # DiffPIR: against its longest run
    ref = den[diffpir_name(result, max(dsteps))]
    for steps in [s for s in dsteps if s != max(dsteps)]:
      den[diffpir_name(result, steps)]["matches_reference"] = _worse_by_at_most(
        den[diffpir_name(result, steps)], ref, (("psnr", args.psnr_tol), ("ssim", args.ssim_tol))
      )
  an = result.get("anomaly")
  if an and result.get("anomaly_reference"):
    ref = an["budgets"][result["anomaly_reference"]]
    keys = [(k, args.auroc_tol) for k in ("voxel_auroc", "slice_auroc", "pixel_auroc")]
    for b in budgets:
      an["budgets"][b]["matches_reference"] = _worse_by_at_most(an["budgets"][b], ref, keys)


def markdown(result: dict) -> str:
  lines = []
  den = result.get("denoising")
  if den:
    lines += [
      "| method | network calls | PSNR (dB) | SSIM | RMSE to reference | s (incl. compile) | matches reference |",
      "|---|---|---|---|---|---|---|",
    ]
    for name, m in den.items():
      calls = m.get("network_calls", "")
      rmse = f"{m['rmse_to_reference']:.4f}" if "rmse_to_reference" in m else ""
      lines.append(
        f"| {name} | {calls} | {m['psnr']:.2f} | {m['ssim']:.4f} | {rmse} | "
        f"{m.get('seconds_incl_compile', float('nan')):.0f} | {m.get('matches_reference', '')} |"
      )
  an = result.get("anomaly")
  if an:
    lines += [
      "",
      f"anomaly: {an['num_crops']} crops ({an['with_lesion']} with a lesion), noise_t {an['noise_t']}",
      "",
      "| budget | network calls | volume AUROC | voxel AUROC | voxel AUPRC | slice AUROC | pixel AUROC | "
      "recon RMSE to reference | s (incl. compile, all crops) | matches reference |",
      "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in an["budgets"].items():
      lines.append(
        f"| {name} | {r['network_calls_per_window']} | {r['volume_auroc']:.3f} | {r['voxel_auroc']:.3f} | "
        f"{r['voxel_auprc']:.4f} | {r['slice_auroc']:.3f} | {r['pixel_auroc']:.3f} | "
        f"{r.get('recon_rmse_to_reference', float('nan')):.4f} | {r['seconds_incl_compile']:.0f} | "
        f"{r.get('matches_reference', '')} |"
      )
  return "\n".join(lines)


if __name__ == "__main__":
  main()
