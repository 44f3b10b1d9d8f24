"""Synthesis of whole volumes larger than the training patch: one global noise state, overlapping windows
each with its own whole-volume position box, blended noise estimates every step (no seams), region and
structure conditions with classifier-free guidance; output in HU via the inverse window."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from meddiff_jax.diffusion import samplers


def synthesize(pre, shape: tuple[int, int, int], region: int, structures: np.ndarray | None, config: Any) -> np.ndarray:
  """[-1, 1] volume of `shape` (each side >= the patch size)."""
  from meddiff_jax.tasks import common
  from meddiff_jax.train import sharding

  scale = jnp.float32(config.guidance_scale) if config.guidance_scale != 1.0 else None
  timesteps = samplers.make_timesteps(pre.schedule.num_timesteps, config.num_steps, "trailing")
  bar = common.ProgressBar(len(timesteps), "synthesis")
  with sharding.activate(common.task_mesh(), sharding.DEFAULT_RULES):
    fn, plan = common.windowed_denoiser(pre, shape, region, structures, config, guidance_scale=scale)
    bar.windows = int(plan.valid.sum())
    run = jax.jit(lambda r: samplers.sample(fn, pre.schedule, timesteps, r,
                                            jax.random.normal(jax.random.fold_in(r, 1), (1, *shape, 1)),
                                            method=config.sampler, eta=config.eta, progress=bar))
    out = np.asarray(run(jax.random.key(config.seed)))
  bar.close()
  return out[0, ..., 0]


def run(config: Any) -> dict[str, Any]:
  """The `synthesis` command: shape (or a TotalSegmentator label NIfTI giving shape, affine and anatomy)
  -> synthetic CT NIfTI in HU."""
  from meddiff_jax.data import nifti, preprocess
  from meddiff_jax.tasks import common

  pre = common.load_pretrained(config.checkpoint)
  region = preprocess.region_id(config.region)
  if config.structure_mask:
    mask = nifti.load(config.structure_mask, is_mask=True)
    shape, affine, labels = mask.shape, mask.affine, mask.data
    # body from the labels (any structure) stands in for the thresholded body channel
    structures = common.structure_volume(pre, labels, np.where(labels > 0, 0.0, -1000.0), shape)
  else:
    shape = tuple(int(s) for s in config.shape)
    spacing = tuple(float(s) for s in config.spacing)
    affine = np.diag([*spacing, 1.0])
    structures = common.structure_volume(pre, None, None, shape)
  if any(s < pre.patch_size for s in shape):
    raise ValueError(f"config.shape={shape}: every side must be >= the model's patch size {pre.patch_size}")
  unit = synthesize(pre, shape, region, structures, config)
  hu = preprocess.unit_to_hu(unit, region)
  nifti.save(nifti.Volume(hu, affine), config.output, np.int16)
  return {"output": config.output, "shape": list(shape), "region": config.region}
