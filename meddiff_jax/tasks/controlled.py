"""ControlNet-conditioned tasks on whole volumes: super-resolution, lesion generation, lesion inpainting.

All three sample with the frozen base + fine-tuned branch through overlapping windows (the condition
volume is windowed with the image). Inpainting is RePaint (Lugmayr et al. 2022): at every step the known
region (outside the lesion mask) is replaced by the forward-noised original, with `resample` re-noise /
re-denoise rounds per step so the generated region harmonises with its surroundings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import ndimage

from meddiff_jax.diffusion import samplers, schedules
from meddiff_jax.models import controlnet
from meddiff_jax.tasks import common


@dataclasses.dataclass
class ControlledModel:
  pre: common.Pretrained
  branch: controlnet.ControlNet
  branch_params: Any
  config: ml_collections.ConfigDict

  def apply_fn(self, scale: float = 1.0):
    def fn(x, t, cond):
      return controlnet.controlled_apply(self.pre.model, self.branch, self.pre.params, self.branch_params, x, t, cond,
                                         cond["hint"], scale=scale)
    return fn


def load_controlled(workdir: str) -> ControlledModel:
  """A fine-tuning workdir: branch EMA params from its newest checkpoint, base from `base_checkpoint`."""
  from meddiff_jax.train import checkpoint, sharding
  from meddiff_jax.train import controlnet as cn_train

  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  if not ck.all_steps():
    raise FileNotFoundError(f"{workdir}: no ControlNet checkpoints under checkpoints/")
  meta = ck.latest_config()
  config = ml_collections.ConfigDict(meta)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  pre, branch, st, shardings, _, _ = cn_train.setup(config, mesh, sharding.DEFAULT_RULES)
  restored = ck.restore_latest(checkpoint.abstract_target(st, shardings), None)
  ck.close()
  return ControlledModel(pre, branch, restored.state.ema_params, config)


def repaint(denoise_fn, schedule: schedules.Schedule, timesteps: np.ndarray, rng: jax.Array, known: jax.Array,
            keep: jax.Array, resample: int = 5) -> jax.Array:
  """RePaint with DDPM steps over `timesteps`: `keep` (1 = known voxel) takes the noised `known` image."""
  ts = jnp.asarray(timesteps, jnp.int32)
  prev = jnp.asarray(samplers.previous_timesteps(np.asarray(timesteps)), jnp.int32)
  n = known.shape[0]
  rng, init = jax.random.split(rng)
  x = jax.random.normal(init, known.shape)

  def one_round(x, t, t_prev, rng):
    k1, k2 = jax.random.split(rng)
    unknown = samplers.ddpm_step(schedule, denoise_fn(x, t), x, t, t_prev, jax.random.normal(k1, x.shape))
    known_prev = schedules.q_sample(schedule, known, t_prev, jax.random.normal(k2, x.shape))
    known_prev = jnp.where(t_prev.reshape(-1, 1, 1, 1, 1) < 0, known, known_prev)
    return keep * known_prev + (1.0 - keep) * unknown

  def body(i, carry):
    x, rng = carry
    t, t_prev = jnp.full((n,), ts[i]), jnp.full((n,), prev[i])

    def inner(j, carry):
      x, rng = carry
      rng, r1, r2 = jax.random.split(rng, 3)
      x_prev = one_round(x, t, t_prev, r1)
      last = (j == resample - 1) | (prev[i] < 0)
      # re-noise t_prev -> t: q(x_t | x_{t_prev}) with abar_t / abar_{t_prev}
      ratio = schedules.alpha_bar(schedule, t, x.ndim) / schedules.alpha_bar(schedule, t_prev, x.ndim)
      renoised = jnp.sqrt(ratio) * x_prev + jnp.sqrt(1.0 - ratio) * jax.random.normal(r2, x.shape)
      return jnp.where(last, x_prev, renoised), rng

    x, rng = jax.lax.fori_loop(0, resample, inner, (x, rng))
    return x, rng

  x, _ = jax.lax.fori_loop(0, ts.shape[0], body, (x, rng))
  return x


def lesion_dice(generated_hu: np.ndarray, background_hu: np.ndarray, mask: np.ndarray, threshold_hu: float = 20.0
                ) -> float:
  """Dice between the lesion mask and a simple threshold segmentation of what changed: voxels within a
  dilated mask whose HU differs from the lesion-free scan by more than threshold_hu."""
  from meddiff_jax.evaluation import metrics

  region = ndimage.binary_dilation(mask, iterations=2)
  seg = (np.abs(generated_hu - background_hu) > threshold_hu) & region
  return metrics.dice(seg, mask)


def run_super_resolution(config: Any) -> dict[str, Any]:
  """LR NIfTI (thick slices) -> trilinear onto the thin grid -> ControlNet sample -> HR NIfTI; with a
  reference, PSNR / SSIM against trilinear and cubic interpolation."""
  from meddiff_jax.data import nifti, preprocess
  from meddiff_jax.evaluation import metrics
  from meddiff_jax.tasks import sliding_window
  from meddiff_jax.train import sharding

  cm = load_controlled(config.controlnet)
  region = preprocess.region_id(config.region)
  lr = nifti.load(config.input)
  nifti.check_ct(lr)
  target_spacing = tuple(float(s) for s in config.spacing)
  up = nifti.resample(lr, target_spacing, order=1, fill=-1024.0)
  hint, crop = sliding_window.pad_to_window(preprocess.hu_to_unit(up.data, region), cm.pre.patch_size, -1.0)
  shape = hint.shape
  timesteps = samplers.make_timesteps(cm.pre.schedule.num_timesteps, config.num_steps, "trailing")
  with sharding.activate(common.task_mesh(), sharding.DEFAULT_RULES):
    fn, _ = common.windowed_denoiser(cm.pre, shape, region, common.structure_volume(cm.pre, None, None, shape), config,
                                     hint=hint[..., None], apply_fn=cm.apply_fn(config.conditioning_scale))
    out = jax.jit(lambda r: samplers.sample(fn, cm.pre.schedule, timesteps, r, jax.random.normal(r, (1, *shape, 1)),
                                            method=config.sampler))(
        jax.random.key(config.seed))
  sr = preprocess.unit_to_hu(np.asarray(out)[0, ..., 0][crop], region)
  nifti.save(nifti.Volume(sr, up.affine), config.output, np.int16)
  result: dict[str, Any] = {"output": config.output, "shape": list(sr.shape)}
  if config.reference:
    ref = nifti.load(config.reference)
    cubic = nifti.resample(lr, target_spacing, order=3, fill=-1024.0).data
    sl = tuple(slice(0, min(a, b)) for a, b in zip(ref.shape, sr.shape))
    unit = lambda v: preprocess.hu_to_unit(v[sl], region)
    result["metrics"] = {name: {"psnr": metrics.psnr(unit(ref.data), unit(v), 2.0),
                                "ssim": metrics.ssim(unit(ref.data), unit(v), 2.0)}
                         for name, v in (("controlnet", sr), ("trilinear", up.data), ("cubic", cubic))}
  _write_json(config.output, result)
  return result


def run_lesion(config: Any) -> dict[str, Any]:
  """CT + lesion mask NIfTI -> a lesion generated inside the mask. method 'inpaint' (RePaint: the scan is
  kept outside the mask) or 'generate' (the whole window resampled, conditioned on the mask)."""
  from meddiff_jax.data import nifti, preprocess
  from meddiff_jax.evaluation import metrics
  from meddiff_jax.tasks import sliding_window
  from meddiff_jax.train import sharding

  cm = load_controlled(config.controlnet)
  region = preprocess.region_id(config.region)
  ct = nifti.load(config.input)
  nifti.check_ct(ct)
  mask = nifti.load(config.mask, is_mask=True)
  nifti.check_same_grid(ct, mask)
  lesion = mask.data > 0
  unit, crop = sliding_window.pad_to_window(preprocess.hu_to_unit(ct.data, region), cm.pre.patch_size, -1.0)
  m, _ = sliding_window.pad_to_window(lesion.astype(np.float32), cm.pre.patch_size, 0.0)
  shape = unit.shape
  timesteps = samplers.make_timesteps(cm.pre.schedule.num_timesteps, config.num_steps, "trailing")
  with sharding.activate(common.task_mesh(), sharding.DEFAULT_RULES):
    fn, _ = common.windowed_denoiser(cm.pre, shape, region, common.structure_volume(cm.pre, None, None, shape), config,
                                     hint=(m * 2.0 - 1.0)[..., None], apply_fn=cm.apply_fn(config.conditioning_scale))
    known = jnp.asarray(unit)[None, ..., None]
    if config.method == "inpaint":
      keep = 1.0 - jnp.asarray(ndimage.binary_dilation(m > 0, iterations=1), jnp.float32)[None, ..., None]
      out = jax.jit(lambda r: repaint(fn, cm.pre.schedule, timesteps, r, known, keep, config.resample))(
          jax.random.key(config.seed))
    elif config.method == "generate":
      out = jax.jit(lambda r: samplers.sample(fn, cm.pre.schedule, timesteps, r, jax.random.normal(r, known.shape),
                                                    method=config.sampler))(
          jax.random.key(config.seed))
    else:
      raise ValueError(f"config.method={config.method!r}; choose inpaint or generate")
  gen_unit = np.asarray(out)[0, ..., 0][crop]
  gen = preprocess.unit_to_hu(gen_unit, region)
  nifti.save(nifti.Volume(gen, ct.affine), config.output, np.int16)
  orig_unit = unit[crop]
  result = {"output": config.output, "method": config.method,
            "psnr_inside_mask": metrics.psnr(orig_unit[lesion], gen_unit[lesion], 2.0) if lesion.any() else None,
            "psnr_outside_mask": metrics.psnr(orig_unit[~lesion], gen_unit[~lesion], 2.0),
            "dice_threshold_segmentation": lesion_dice(gen, ct.data, lesion, config.dice_threshold_hu)}
  _write_json(config.output, result)
  return result


def _write_json(output: str, result: dict) -> None:
  with open(output.replace(".nii.gz", "").replace(".nii", "") + ".json", "w") as f:
    json.dump(result, f, indent=1, default=float)
