"""Zero-shot denoising with the pretrained prior: DiffPIR (plug-and-play) and plain partial diffusion.

DiffPIR (Zhu et al. 2023; MedDiff-FM: sigma_n ~ 0.15 on the [-1, 1] scale, lambda ~ 10) for the
identity degradation y = x + n: start at the timestep t* whose data-scale noise std matches sigma_n,
x_t* = sqrt(abar) y + sqrt(1 - abar) eps; then per step
  x0      <- model prediction
  x0_hat  <- argmin ||y - x||^2 + rho ||x - x0||^2 = (y + rho x0) / (1 + rho),  rho = lambda sigma_n^2 / sigma_t^2
  x_prev  <- sqrt(abar') x0_hat + sqrt(1 - abar') (sqrt(1 - zeta) eps_hat + sqrt(zeta) z)
with sigma_t = sqrt(1 - abar)/sqrt(abar). Partial diffusion skips the data step (SDEdit).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from meddiff_jax.diffusion import samplers, schedules


def estimate_noise_sigma(image: np.ndarray, mask: np.ndarray | None = None) -> float:
  """Robust white-noise std from first differences along the last axis (MAD / 0.6745 / sqrt(2)).

  Differences of neighbouring voxels cancel smooth anatomy; the median ignores edges.
  """
  d = np.diff(np.asarray(image, np.float64), axis=-1)
  if mask is not None:
    d = d[np.asarray(mask)[..., 1:] & np.asarray(mask)[..., :-1]]
  d = d.ravel()
  return float(np.median(np.abs(d - np.median(d))) / 0.6745 / np.sqrt(2.0))


def diffpir_timesteps(schedule: schedules.Schedule, sigma_n: float, num_steps: int) -> np.ndarray:
  """Uniformly spaced descending timesteps from the start matched to sigma_n down to 0."""
  t_start = int(schedules.timestep_for_noise_level(schedule, jnp.float32(sigma_n)))
  return np.unique(np.round(np.linspace(0, t_start, min(num_steps, t_start + 1))).astype(np.int32))[::-1].copy()


def diffpir(denoise_fn: Callable[[jax.Array, jax.Array], jax.Array], schedule: schedules.Schedule, y: jax.Array,
            sigma_n: jax.Array, timesteps: np.ndarray, rng: jax.Array, *, lam: float = 10.0, zeta: float = 0.3,
            prediction_type: str = "epsilon", progress: Callable | None = None) -> jax.Array:
  """DiffPIR restoration of y (data scale [-1, 1]) for additive Gaussian noise of std sigma_n."""
  ts = jnp.asarray(timesteps, jnp.int32)
  prev = jnp.asarray(samplers.previous_timesteps(np.asarray(timesteps)))
  n = y.shape[0]
  rng, init_rng = jax.random.split(rng)
  x = schedules.q_sample(schedule, y, jnp.full((n,), ts[0]), jax.random.normal(init_rng, y.shape))

  def body(i, carry):
    x, _, rng = carry
    rng, z_rng = jax.random.split(rng)
    t, t_prev = jnp.full((n,), ts[i]), jnp.full((n,), prev[i])
    x0, _ = schedules.split_prediction(schedule, prediction_type, denoise_fn(x, t), x, t)
    x0 = jnp.clip(x0, -1.0, 1.0)
    abar = schedules.alpha_bar(schedule, t, x.ndim)
    sigma_t2 = schedules.one_minus_alpha_bar(schedule, t, x.ndim) / abar
    rho = lam * sigma_n ** 2 / sigma_t2
    x0_hat = (y + rho * x0) / (1.0 + rho)
    eps_hat = (x - jnp.sqrt(abar) * x0_hat) / jnp.sqrt(schedules.one_minus_alpha_bar(schedule, t, x.ndim))
    abar_prev = schedules.alpha_bar(schedule, t_prev, x.ndim)
    noise = jnp.sqrt(1.0 - zeta) * eps_hat + jnp.sqrt(zeta) * jax.random.normal(z_rng, x.shape)
    x = jnp.sqrt(abar_prev) * x0_hat + jnp.sqrt(schedules.one_minus_alpha_bar(schedule, t_prev, x.ndim)) * noise
    if progress is not None:
      jax.debug.callback(progress, i)
    return x, x0_hat, rng

  _, x0_hat, _ = jax.lax.fori_loop(0, ts.shape[0], body, (x, y, rng))
  return x0_hat


def partial_diffusion(denoise_fn, schedule: schedules.Schedule, y: jax.Array, t_start: jax.Array, num_steps: int,
                      rng: jax.Array, prediction_type: str = "epsilon", progress: Callable | None = None,
                      method: str = "ddim") -> jax.Array:
  """Noise y to t_start, then run `method` (ddim | ddpm | dpmpp_2m) back (SDEdit): the comparison baseline."""
  timesteps = samplers.make_timesteps(schedule.num_timesteps, num_steps, "leading")
  return samplers.sample(denoise_fn, schedule, timesteps, rng, y, t_start=t_start, method=method,
                         prediction_type=prediction_type, progress=progress)


def run(config: Any) -> dict[str, Any]:
  """The `denoise` command: NIfTI in, denoised NIfTI out (the input's grid and affine)."""
  from meddiff_jax.data import nifti, preprocess
  from meddiff_jax.tasks import common, sliding_window
  from meddiff_jax.train import sharding

  pre = common.load_pretrained(config.checkpoint)
  original, work = common.load_ct(config.input, config.region, tuple(config.spacing) if config.spacing else None)
  region = preprocess.region_id(config.region)
  lo, hi = preprocess.window_bounds(region)
  y = preprocess.hu_to_unit(work.data, region)
  y, crop = sliding_window.pad_to_window(y, pre.patch_size, fill=-1.0)
  body = work.data > preprocess.BODY_THRESHOLD_HU
  sigma = float(config.noise_sigma_hu) * 2.0 / (hi - lo) if config.noise_sigma_hu else estimate_noise_sigma(
      preprocess.hu_to_unit(work.data, region), body)
  structures = common.structure_volume(pre, None, None, y.shape)
  mesh = common.task_mesh()
  bar = common.ProgressBar(config.num_steps, f"denoise ({config.method})")
  with sharding.activate(mesh, sharding.DEFAULT_RULES):
    fn, plan = common.windowed_denoiser(pre, y.shape, region, structures, config)
    bar.windows = int(plan.valid.sum())
    y_dev = jnp.asarray(y)[None, ..., None]
    if config.method == "diffpir":
      ts = diffpir_timesteps(pre.schedule, sigma, config.num_steps)
      out = jax.jit(lambda y, r: diffpir(fn, pre.schedule, y, jnp.float32(sigma), ts, r, lam=config.lam,
                                         zeta=config.zeta, progress=bar))(y_dev, jax.random.key(config.seed))
    elif config.method == "partial":
      t0 = int(schedules.timestep_for_noise_level(pre.schedule, jnp.float32(sigma)))
      out = jax.jit(lambda y, r: partial_diffusion(fn, pre.schedule, y, jnp.int32(t0), config.num_steps, r,
                                                   progress=bar, method=config.sampler))(y_dev, jax.random.key(config.seed))
    else:
      raise ValueError(f"config.method={config.method!r}; choose diffpir or partial")
    den = np.asarray(out)[0, ..., 0][crop]
  bar.close()
  hu = preprocess.unit_to_hu(den, region)
  # the model only sees the window: outside it (air, bone) keep the input's HU
  hu = np.where((work.data <= lo) | (work.data >= hi), work.data, hu)
  hu = common.back_to_input_grid(hu, work, original)
  nifti.save(nifti.Volume(hu, original.affine), config.output, np.int16 if config.output_int16 else np.float32)
  return {"output": config.output, "sigma_unit": sigma, "method": config.method}

