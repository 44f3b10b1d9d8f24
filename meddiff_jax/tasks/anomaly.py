"""Zero-shot anomaly detection: noise the scan to t (paper: 950 of 1000), reconstruct a "healthy" version
with the prior, and score the residual.

voxel map (pixel level): |x - recon| smoothed (Gaussian) and zeroed outside the body; volume score: mean of the top
`top_fraction` of the map inside the body; slice scores: the same per 2D slice (BMAD's levels,
evaluation/metrics.anomaly_aurocs).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from meddiff_jax.tasks import denoise


def anomaly_map(image: np.ndarray, reconstruction: np.ndarray, body: np.ndarray | None = None,
                smooth_sigma: float = 1.0) -> np.ndarray:
  residual = np.abs(np.asarray(image, np.float32) - np.asarray(reconstruction, np.float32))
  if smooth_sigma:
    residual = ndimage.gaussian_filter(residual, smooth_sigma)
  return residual if body is None else np.where(body, residual, 0.0).astype(np.float32)


def volume_score(amap: np.ndarray, body: np.ndarray | None = None, top_fraction: float = 0.01) -> float:
  values = amap[body] if body is not None else amap.ravel()
  if values.size == 0:
    return 0.0
  k = max(1, int(round(top_fraction * values.size)))
  return float(np.mean(np.partition(values, values.size - k)[-k:]))


def reconstruct(pre, y_unit: np.ndarray, region: int, config: Any, structures: np.ndarray | None = None,
                frame: tuple[slice, ...] | None = None) -> np.ndarray:
  """Partial diffusion from config.noise_t with windowed blending; y_unit is the (padded) [-1,1] volume."""
  from meddiff_jax.tasks import common
  from meddiff_jax import sharding

  bar = common.ProgressBar(config.num_steps, "anomaly reconstruction")
  with sharding.activate(common.task_mesh(), sharding.DEFAULT_RULES):
    fn, plan = common.windowed_denoiser(pre, y_unit.shape, region, structures, config, frame=frame)
    bar.windows = int(plan.valid.sum())
    # the grid starts at noise_t itself (paper: 950), every step is spent below it
    run = jax.jit(lambda y, r: denoise.partial_diffusion(fn, pre.schedule, y, int(config.noise_t),
                                                         config.num_steps, r, progress=bar, method=config.sampler))
    out = np.asarray(run(jnp.asarray(y_unit)[None, ..., None], jax.random.key(config.seed)))
  bar.close()
  return out[0, ..., 0]


def run(config: Any) -> dict[str, Any]:
  """The `anomaly` command: NIfTI in; anomaly map NIfTI (input grid/affine) and a JSON score out."""
  import json

  from meddiff_jax.data import nifti, preprocess
  from meddiff_jax import pretrained
  from meddiff_jax.tasks import common, sliding_window

  pre = pretrained.load(config.checkpoint, config.inference_dtype)
  original, work = common.load_ct(config.input, config.region, common.task_spacing(pre, config), config)
  region = preprocess.region_id(config.region)
  y, crop = sliding_window.pad_to_window(preprocess.hu_to_unit(work.data, region), pre.patch_size, fill=-1.0)
  structures = common.structure_volume(pre, common.load_labels(config.labels, original, work), work.data,
                                       pre.patch_size)
  recon = reconstruct(pre, y, region, config, structures, crop)[crop]
  body = preprocess.body_mask(work.data)
  amap = anomaly_map(y[crop], recon, body, config.smooth_sigma)
  score = volume_score(amap, body, config.top_fraction)
  amap_input = common.back_to_input_grid(amap, work, original)
  common.save_like_input(amap_input, original, config.output, np.float32, f"meddiff anomaly map ({config.checkpoint})")
  from meddiff_jax.evaluation import metrics

  # per-slice scores (axis 2 of the RAS input grid: BMAD and the field score 2D slices) beside the volume score
  slices = metrics.slice_scores(amap_input, preprocess.body_mask(original.data), axis=2,
                                top_fraction=config.top_fraction)
  result = {"input": config.input, "output": config.output, "volume_score": score, "noise_t": int(config.noise_t),
            "slice_scores": [float(v) for v in slices]}
  with open(config.output.rstrip("/\\").replace(".nii.gz", "").replace(".nii", "") + ".json", "w") as f:
    json.dump(result, f, indent=1)
  return result
