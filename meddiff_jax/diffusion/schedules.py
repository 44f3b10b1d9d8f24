"""Noise schedules and the closed-form forward process q(x_t | x_0).

Tables are computed in float64 numpy (as guided-diffusion does) and stored as float32 jax arrays in a
pytree, so they can be passed into jitted functions and sharded/replicated like any other array.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "x0", "v")
SCHEDULES = ("linear", "cosine", "scaled_linear")  # config.diffusion.schedule


def make_betas(name: str, num_timesteps: int = 1000) -> np.ndarray:
  """float64 betas.

  linear: ADM's linear schedule, scaled so that any T gives the same curve as T=1000 (1e-4 .. 0.02).
  cosine: Nichol & Dhariwal (2021), s=0.008, betas clipped at 0.999.
  scaled_linear: linear in sqrt(beta) (Stable Diffusion's), kept for diffusers parity checks.
  """
  if name == "linear":
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
  if name == "scaled_linear":
    return np.linspace(1e-4**0.5, 0.02**0.5, num_timesteps, dtype=np.float64) ** 2
  if name == "cosine":
    s = 0.008
    f = lambda t: math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
    return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(num_timesteps)], dtype=np.float64)
  raise ValueError(f"unknown beta schedule {name!r}; choose linear, cosine or scaled_linear")


@flax.struct.dataclass
class Schedule:
  """Per-timestep tables, float32. Index t in [0, T). The samplers compute the DDPM posterior q(x_t' | x_t, x0)
  from log abar for any pair of timesteps (samplers.ddpm_step), so no per-step posterior tables are kept."""

  betas: jax.Array
  alphas_cumprod: jax.Array
  log_alphas_cumprod: jax.Array  # for 1 - abar and ratios near t=0 without float32 cancellation

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def tables(betas: np.ndarray) -> dict[str, np.ndarray]:
  """float64 schedule tables from betas (DDPM, Ho et al. 2020)."""
  betas = np.asarray(betas, np.float64)
  alphas = 1.0 - betas
  return dict(betas=betas, alphas_cumprod=np.cumprod(alphas), log_alphas_cumprod=np.cumsum(np.log(alphas)))


def make_schedule(name: str = "cosine", num_timesteps: int = 1000) -> Schedule:
  return Schedule(**{k: jnp.asarray(v, jnp.float32) for k, v in tables(make_betas(name, num_timesteps)).items()})


def _gather(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """table[t] broadcast to an (N, 1, ..., 1) array of rank ndim; t < 0 reads as abar=1 via callers."""
  vals = jnp.take(table, jnp.clip(t, 0, table.shape[0] - 1))
  return vals.reshape(vals.shape + (1,) * (ndim - vals.ndim))


def log_alpha_bar(schedule: Schedule, t: jax.Array, ndim: int) -> jax.Array:
  """log abar_t, with abar_{-1} := 1 (the clean image), broadcastable against an x of rank ndim."""
  log_abar = _gather(schedule.log_alphas_cumprod, t, ndim)
  t = jnp.asarray(t).reshape(jnp.shape(t) + (1,) * (ndim - jnp.ndim(t)))
  return jnp.where(t < 0, 0.0, log_abar)


def alpha_bar(schedule: Schedule, t: jax.Array, ndim: int) -> jax.Array:
  return jnp.exp(log_alpha_bar(schedule, t, ndim))


def one_minus_alpha_bar(schedule: Schedule, t: jax.Array, ndim: int) -> jax.Array:
  """1 - abar_t via expm1: exact near t=0 where float32 `1 - abar` cancels."""
  return -jnp.expm1(log_alpha_bar(schedule, t, ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
  return jnp.sqrt(alpha_bar(schedule, t, x0.ndim)) * x0 + jnp.sqrt(one_minus_alpha_bar(schedule, t, x0.ndim)) * noise


def velocity(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
  return jnp.sqrt(alpha_bar(schedule, t, x0.ndim)) * noise - jnp.sqrt(one_minus_alpha_bar(schedule, t, x0.ndim)) * x0


def training_target(
  schedule: Schedule, prediction_type: str, x0: jax.Array, noise: jax.Array, t: jax.Array
) -> jax.Array:
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "x0":
    return x0
  if prediction_type == "v":
    return velocity(schedule, x0, noise, t)
  raise ValueError(f"prediction_type {prediction_type!r} not in {PREDICTION_TYPES}")


def split_prediction(
  schedule: Schedule, prediction_type: str, model_output: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(x0_hat, eps_hat) from any model parameterisation."""
  sa = jnp.sqrt(alpha_bar(schedule, t, x_t.ndim))
  s1a = jnp.sqrt(one_minus_alpha_bar(schedule, t, x_t.ndim))
  if prediction_type == "epsilon":
    eps = model_output
    x0 = (x_t - s1a * eps) / sa
  elif prediction_type == "x0":
    x0 = model_output
    eps = (x_t - sa * x0) / s1a
  elif prediction_type == "v":
    x0 = sa * x_t - s1a * model_output
    eps = s1a * x_t + sa * model_output
  else:
    raise ValueError(f"prediction_type {prediction_type!r} not in {PREDICTION_TYPES}")
  return x0, eps


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
  log_abar = jnp.take(schedule.log_alphas_cumprod, t)
  return jnp.exp(log_abar) / -jnp.expm1(log_abar)


def noise_std_on_image_scale(schedule: Schedule) -> jax.Array:
  """sqrt(1 - abar)/sqrt(abar): the Gaussian std that x_t/sqrt(abar) carries on the data scale.

  DiffPIR's `reduced_alpha_cumprod`; used to pick the start timestep matching a noise level.
  """
  acp = schedule.alphas_cumprod
  return jnp.sqrt(1.0 - acp) / jnp.sqrt(acp)


def timestep_for_noise_level(schedule: Schedule, sigma: jax.Array) -> jax.Array:
  """The t whose image-scale noise std is closest to sigma (data in [-1, 1])."""
  return jnp.argmin(jnp.abs(noise_std_on_image_scale(schedule) - sigma)).astype(jnp.int32)
