"""Validation loss per timestep bucket, and preview samples during training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from meddiff_jax.diffusion import losses, samplers, schedules
from meddiff_jax.diffusion.spec import DiffusionSpec
from meddiff_jax.models import conditions


def make_eval_step(
  apply_fn: Callable[..., jax.Array],
  schedule: schedules.Schedule,
  diffusion: DiffusionSpec,
  num_buckets: int,
  finish: Callable[[dict], dict] = lambda batch: batch,
) -> Callable[[Any, dict, jax.Array], jax.Array]:
  """(params, batch, rng) -> (num_buckets,) mean loss with t drawn inside each of equal timestep buckets.

  High-t buckets measure global structure, low-t buckets fine texture; a single averaged loss hides
  which one a change helped (maxdiffusion reports it the same way). `finish`: the shipped batch -> the model's
  (train/step.decode_inputs: data.decode_on_device).
  """
  edges = [round(i * schedule.num_timesteps / num_buckets) for i in range(num_buckets + 1)]

  def eval_step(params, batch, rng):
    batch = finish(batch)
    x0 = batch[conditions.IMAGE].astype(jnp.float32)
    n = x0.shape[0]
    cond = {k: batch[k] for k in conditions.COND_KEYS if k in batch}
    out = []
    for b in range(num_buckets):
      t_rng, n_rng = jax.random.split(jax.random.fold_in(rng, b))
      t = jax.random.randint(t_rng, (n,), edges[b], edges[b + 1])
      noise = jax.random.normal(n_rng, x0.shape, jnp.float32)
      pred = apply_fn({"params": params}, schedules.q_sample(schedule, x0, t, noise), t, cond)
      loss, _ = losses.diffusion_loss(
        schedule, pred, x0, noise, t, prediction_type=diffusion.prediction_type, loss_type=diffusion.loss_type
      )
      out.append(loss)
    return jnp.stack(out)

  return eval_step


def bucket_names(num_buckets: int, num_timesteps: int) -> list[str]:
  edges = [round(i * num_timesteps / num_buckets) for i in range(num_buckets + 1)]
  return [f"val/loss_t{edges[b]:04d}-{edges[b + 1] - 1:04d}" for b in range(num_buckets)]


def make_preview_sampler(
  apply_fn: Callable[..., jax.Array],
  schedule: schedules.Schedule,
  diffusion: DiffusionSpec,
  patch: int,
  num_steps: int,
) -> Callable[[Any, jax.Array, dict], jax.Array]:
  """(params, rng, cond) -> `num_steps`-step DDIM sample of a patch^3 volume, conditioned on cond."""
  timesteps = samplers.make_timesteps(schedule.num_timesteps, num_steps, "trailing")

  def sample(params, rng, cond):
    n = cond[conditions.REGION].shape[0]
    noise_rng, rng = jax.random.split(rng)
    x_t = jax.random.normal(noise_rng, (n, patch, patch, patch, 1), jnp.float32)
    fn = lambda x, t: apply_fn({"params": params}, x, t, cond)
    return samplers.sample(fn, schedule, timesteps, rng, x_t, method="ddim", prediction_type=diffusion.prediction_type)

  return sample
