"""Denoising losses: L1 (MedDiff-FM) or L2, any prediction target, optional min-SNR weighting."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meddiff_jax.diffusion import schedules

LOSS_TYPES = ("l1", "l2")  # config.diffusion.loss_type


def min_snr_weight(schedule: schedules.Schedule, t: jax.Array, prediction_type: str, gamma: float) -> jax.Array:
  """Min-SNR-gamma weights (Hang et al. 2023), expressed for the chosen prediction target.

  The x0-space weight min(SNR, gamma) becomes min(SNR, gamma)/SNR for eps and min(SNR, gamma)/(SNR+1) for v.
  """
  snr = schedules.snr(schedule, t)
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == "epsilon":
    return clipped / snr
  if prediction_type == "x0":
    return clipped
  if prediction_type == "v":
    return clipped / (snr + 1.0)
  raise ValueError(f"prediction_type {prediction_type!r} not in {schedules.PREDICTION_TYPES}")


def per_sample_loss(model_output: jax.Array, target: jax.Array, loss_type: str = "l1") -> jax.Array:
  """Mean over all non-batch axes, in float32."""
  diff = model_output.astype(jnp.float32) - target.astype(jnp.float32)
  if loss_type == "l1":
    err = jnp.abs(diff)
  elif loss_type == "l2":
    err = jnp.square(diff)
  else:
    raise ValueError(f"loss_type {loss_type!r}; choose l1 or l2")
  return jnp.mean(err, axis=tuple(range(1, err.ndim)))


def diffusion_loss(
  schedule: schedules.Schedule,
  model_output: jax.Array,
  x0: jax.Array,
  noise: jax.Array,
  t: jax.Array,
  *,
  prediction_type: str = "epsilon",
  loss_type: str = "l1",
  min_snr_gamma: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Returns (scalar loss, per-sample loss before weighting)."""
  target = schedules.training_target(schedule, prediction_type, x0, noise, t)
  per_sample = per_sample_loss(model_output, target, loss_type)
  weights = jnp.ones_like(per_sample)
  if min_snr_gamma:
    weights = min_snr_weight(schedule, t, prediction_type, min_snr_gamma)
  return jnp.mean(weights * per_sample), per_sample
