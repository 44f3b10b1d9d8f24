"""Exact denoisers for test data whose posterior is known in closed form.

Gaussian data x0 ~ N(mu, s^2) i.i.d. per voxel: E[x0 | x_t] is linear in x_t, so the "model" below is
the best possible one, and for y = x0 + sigma n the best possible estimate of x0 is the Wiener filter
with MSE s^2 sigma^2 / (s^2 + sigma^2). A task run with this oracle can be checked against both
"better than the input" and "close to the optimum"; a pass-through denoiser fails the second.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from meddiff_jax.diffusion import schedules


def gaussian_posterior_mean(schedule, x, t, mu: float, s: float):
  a = schedules.alpha_bar(schedule, t, x.ndim)
  return mu + s ** 2 * jnp.sqrt(a) / (a * s ** 2 + 1.0 - a) * (x - jnp.sqrt(a) * mu)


def gaussian_oracle(schedule, mu: float, s: float, prediction_type: str = "epsilon"):
  """(x_t, t) -> the exact model output for i.i.d. N(mu, s^2) data."""
  def fn(x, t):
    x0 = gaussian_posterior_mean(schedule, x, t, mu, s)
    a = schedules.alpha_bar(schedule, t, x.ndim)
    one_minus = schedules.one_minus_alpha_bar(schedule, t, x.ndim)
    eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(one_minus)
    if prediction_type == "epsilon":
      return eps
    if prediction_type == "x0":
      return x0
    return jnp.sqrt(a) * eps - jnp.sqrt(one_minus) * x0  # v
  return fn


def identity_denoiser(schedule, prediction_type: str = "epsilon"):
  """A pass-through "model": claims x_t / sqrt(abar) is already clean. Task tests must fail with it."""
  def fn(x, t):
    a = schedules.alpha_bar(schedule, t, x.ndim)
    if prediction_type == "x0":
      return x / jnp.sqrt(a)
    return jnp.zeros_like(x)  # eps = 0 -> x0_hat = x_t / sqrt(abar)
  return fn


def wiener_mse(s: float, sigma: float) -> float:
  return s ** 2 * sigma ** 2 / (s ** 2 + sigma ** 2)


def gaussian_problem(shape=(1, 24, 24, 24, 1), mu: float = 0.1, s: float = 0.3, sigma: float = 0.15, seed: int = 0):
  """(x0, y) with x0 ~ N(mu, s^2) and y = x0 + sigma n, float32 jax arrays."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  x0 = mu + s * jax.random.normal(k1, shape)
  return x0, x0 + sigma * jax.random.normal(k2, shape)


def mse(a, b) -> float:
  return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
