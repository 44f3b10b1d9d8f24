"""DDPM and DDIM reverse processes as jitted `fori_loop`s with static shapes.

The timestep sequence is static (its length decides the compiled loop); the start timestep (partial
diffusion: noise an input to t*, then reverse) and the classifier-free guidance scale are traced arrays,
so changing them does not recompile. Both steps take (t, t_prev) explicitly, with t_prev = -1 meaning
"the clean image" (abar = 1), which covers full ancestral DDPM, respaced DDPM and DDIM alike.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from meddiff_jax.diffusion import schedules
from meddiff_jax.models import conditions

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, t (N,)) -> model output
METHODS = ("ddpm", "ddim", "dpmpp_2m")


def make_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading") -> np.ndarray:
  """Descending int32 timesteps, following diffusers' `timestep_spacing` conventions."""
  if not 0 < num_steps <= num_train_timesteps:
    raise ValueError(f"num_steps={num_steps} must be in [1, {num_train_timesteps}]")
  if spacing == "leading":
    ratio = num_train_timesteps // num_steps
    ts = np.arange(num_steps) * ratio
  elif spacing == "trailing":
    ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1
  elif spacing == "linspace":
    ts = np.round(np.linspace(0, num_train_timesteps - 1, num_steps))
  else:
    raise ValueError(f"unknown timestep spacing {spacing!r}; choose leading, trailing or linspace")
  return np.sort(ts.astype(np.int32))[::-1].copy()


def previous_timesteps(timesteps: np.ndarray) -> np.ndarray:
  return np.append(timesteps[1:], -1).astype(np.int32)


def ddpm_step(
  schedule: schedules.Schedule,
  model_output: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  t_prev: jax.Array,
  noise: jax.Array,
  *,
  prediction_type: str = "epsilon",
  clip_x0: bool = True,
  variance_type: str = "fixed_small",
) -> jax.Array:
  """Ancestral step x_t -> x_{t_prev} from the posterior q(x_{t_prev} | x_t, x0_hat)."""
  nd = x_t.ndim
  log_t = schedules.log_alpha_bar(schedule, t, nd)
  log_prev = schedules.log_alpha_bar(schedule, t_prev, nd)
  beta = -jnp.expm1(log_t - log_prev)  # the effective beta between t and t_prev, cancellation-free
  one_minus_t, one_minus_prev = -jnp.expm1(log_t), -jnp.expm1(log_prev)
  x0, _ = schedules.split_prediction(schedule, prediction_type, model_output, x_t, t)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
  mean = (jnp.exp(0.5 * log_prev) * beta / one_minus_t) * x0 + (
    jnp.exp(0.5 * (log_t - log_prev)) * one_minus_prev / one_minus_t
  ) * x_t
  if variance_type == "fixed_small":
    var = jnp.maximum(beta * one_minus_prev / one_minus_t, 1e-20)
  elif variance_type == "fixed_large":
    var = beta
  else:
    raise ValueError(f"variance_type {variance_type!r}; choose fixed_small or fixed_large")
  t_prev = jnp.reshape(t_prev, jnp.shape(t_prev) + (1,) * (nd - jnp.ndim(t_prev)))
  return mean + jnp.where(t_prev >= 0, jnp.sqrt(var), 0.0) * noise


def ddim_step(
  schedule: schedules.Schedule,
  model_output: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  t_prev: jax.Array,
  noise: jax.Array,
  *,
  eta: float | jax.Array = 0.0,
  prediction_type: str = "epsilon",
  clip_x0: bool = True,
) -> jax.Array:
  """DDIM (Song et al. 2021, eq. 12); eta=0 deterministic, eta=1 ~ DDPM."""
  nd = x_t.ndim
  log_t = schedules.log_alpha_bar(schedule, t, nd)
  log_prev = schedules.log_alpha_bar(schedule, t_prev, nd)
  one_minus_t, one_minus_prev = -jnp.expm1(log_t), -jnp.expm1(log_prev)
  x0, eps = schedules.split_prediction(schedule, prediction_type, model_output, x_t, t)
  if clip_x0:  # ADM: the direction term uses the eps consistent with the clipped x0
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = (x_t - jnp.exp(0.5 * log_t) * x0) / jnp.sqrt(one_minus_t)
  sigma = eta * jnp.sqrt(one_minus_prev / one_minus_t * -jnp.expm1(log_t - log_prev))
  direction = jnp.sqrt(jnp.maximum(one_minus_prev - sigma**2, 0.0)) * eps
  return jnp.exp(0.5 * log_prev) * x0 + direction + sigma * noise


def start_index(timesteps: jax.Array, t_start: jax.Array) -> jax.Array:
  """Index of the first timestep <= t_start (0 when t_start >= timesteps[0])."""
  return jnp.sum(timesteps > t_start).astype(jnp.int32)


def partial_timesteps(t_start: int, num_steps: int) -> np.ndarray:
  """Descending grid that starts exactly at t_start and ends at 0, about `num_steps` long.

  Partial diffusion (SDEdit, DiffPIR, the anomaly reconstruction) must spend its steps below t*; a
  "leading" grid over all T would keep only the few steps under t*.
  """
  t_start = int(t_start)
  if t_start < 0:
    return np.zeros((0,), np.int32)
  n = max(1, min(int(num_steps), t_start + 1))
  return np.unique(np.round(np.linspace(0, t_start, n)).astype(np.int32))[::-1].copy()


def noise_matched_start(
  schedule: schedules.Schedule, y: jax.Array, t: jax.Array, noise: jax.Array, input_sigma: float | jax.Array = 0.0
) -> jax.Array:
  """x_t from an observation y = x0 + sigma_y n that already carries Gaussian noise of std sigma_y.

  x_t = sqrt(abar_t) y + sqrt(max(0, 1 - abar_t - abar_t sigma_y^2)) z has exactly the noise level of
  q(x_t | x0): noise is only added for what y lacks (none when t is y's own level). With sigma_y = 0
  this is q_sample. DiffPIR's code uses sqrt(abar_t / abar_ty) y (y read as x_{t_y}); that keeps a
  signal scale off by sqrt(abar_ty), under 2% for CT noise levels.
  """
  abar = schedules.alpha_bar(schedule, t, y.ndim)
  extra = jnp.maximum(schedules.one_minus_alpha_bar(schedule, t, y.ndim) - abar * jnp.square(input_sigma), 0.0)
  return jnp.sqrt(abar) * y + jnp.sqrt(extra) * noise


def _extended_grid(ts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Step e runs ts_ext[e] -> prev_ext[e] with ts_ext = [t_start, ts] and prev_ext = [ts, -1]."""
  return jnp.concatenate([ts[:1], ts]), jnp.append(ts, -1).astype(jnp.int32)


def _partial_start(
  schedule: schedules.Schedule,
  ts: jax.Array,
  x_init: jax.Array,
  t_start: jax.Array | None,
  rng: jax.Array,
  input_sigma: float | jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(first step index into the extended grid, first timestep, x at it). With t_start, x_init is noised to
  exactly t_start counting its own noise; grid points above t_start are skipped, and off the grid one extra
  step t_start -> ts[above] runs first. t_start < 0: nothing to do."""
  n = x_init.shape[0]
  if t_start is None:
    return jnp.int32(1), ts[0], x_init
  t_first = jnp.asarray(t_start, jnp.int32)
  above = start_index(ts, t_first)
  on_grid = (above < ts.shape[0]) & (ts[jnp.minimum(above, ts.shape[0] - 1)] == t_first)
  first = above + on_grid.astype(jnp.int32)
  noised = noise_matched_start(
    schedule, x_init, jnp.full((n,), t_first), jax.random.normal(rng, x_init.shape, x_init.dtype), input_sigma
  )
  x = jnp.where(t_first >= 0, noised, x_init)
  first = jnp.where(t_first >= 0, first, ts.shape[0] + 1)
  return first, t_first, x


def sample(
  denoise_fn: DenoiseFn,
  schedule: schedules.Schedule,
  timesteps: np.ndarray,
  rng: jax.Array,
  x_init: jax.Array,
  *,
  t_start: jax.Array | None = None,
  method: str = "ddim",
  eta: float | jax.Array = 0.0,
  prediction_type: str = "epsilon",
  clip_x0: bool = True,
  variance_type: str = "fixed_small",
  progress: Callable[[jax.Array], None] | None = None,
  input_sigma: float | jax.Array = 0.0,
) -> jax.Array:
  """Run the reverse process.

  Args:
    denoise_fn: (x_t, t) -> model output; closes over params, conditions and guidance.
    schedule: noise tables.
    timesteps: static descending sequence (see `make_timesteps`).
    rng: PRNG key.
    x_init: with t_start None, the initial x_T (pure noise); otherwise the input that is first noised
      to exactly t_start (partial diffusion, SDEdit-style), counting the noise it already carries
      (`input_sigma`, data scale; see `noise_matched_start`).
    t_start: traced scalar start timestep, or None to run the whole sequence. The first step goes from
      t_start to the grid's first timestep below it; use `partial_timesteps` for a grid that starts at
      t_start so that all steps are spent below it.
    method: "ddim", "ddpm" or "dpmpp_2m" (DPM-Solver++(2M); eta and variance_type do not apply).
    progress: host callback called with the step index after every step (e.g. a progress bar).

  Returns:
    x_0 estimate, same shape as x_init.
  """
  if method == "dpmpp_2m":
    return sample_dpmpp_2m(
      denoise_fn,
      schedule,
      timesteps,
      rng,
      x_init,
      t_start=t_start,
      prediction_type=prediction_type,
      clip_x0=clip_x0,
      progress=progress,
      input_sigma=input_sigma,
    )
  if method not in ("ddim", "ddpm"):
    raise ValueError(f"sampler method {method!r}; choose one of {METHODS}")
  ts = jnp.asarray(timesteps, jnp.int32)
  n = x_init.shape[0]
  rng, init_rng = jax.random.split(rng)
  # Step e runs ts_ext[e] -> prev_ext[e] with ts_ext = [t_start, ts] and prev_ext = [ts, -1].
  first, t_first, x = _partial_start(schedule, ts, x_init, t_start, init_rng, input_sigma)
  ts_ext, prev_ext = _extended_grid(ts)

  def body(e, carry):
    x, rng = carry
    i = jnp.maximum(e - 1, 0)
    rng, step_rng = jax.random.split(rng)
    t = jnp.full((n,), jnp.where(e == first, t_first, ts_ext[e]))
    t_prev = jnp.full((n,), prev_ext[e])
    out = denoise_fn(x, t)
    noise = jax.random.normal(step_rng, x.shape, x.dtype)
    if method == "ddim":
      x = ddim_step(schedule, out, x, t, t_prev, noise, eta=eta, prediction_type=prediction_type, clip_x0=clip_x0)
    else:
      x = ddpm_step(
        schedule,
        out,
        x,
        t,
        t_prev,
        noise,
        prediction_type=prediction_type,
        clip_x0=clip_x0,
        variance_type=variance_type,
      )
    if progress is not None:
      jax.debug.callback(progress, i)
    return x, rng

  x, _ = jax.lax.fori_loop(first, ts.shape[0] + 1, body, (x, rng))
  return x


def null_condition(cond: dict[str, jax.Array], num_regions: int) -> dict[str, jax.Array]:
  """The unconditional counterpart used for classifier-free guidance.

  Region -> the "unknown" class, structure masks -> zeros. Position is kept: it says where the sample
  sits, not what it contains, and is never dropped in training either.
  """
  null = dict(cond)
  if conditions.REGION in null:
    null[conditions.REGION] = jnp.full_like(null[conditions.REGION], num_regions)
  if conditions.STRUCTURES in null:
    null[conditions.STRUCTURES] = jnp.zeros_like(null[conditions.STRUCTURES])
  return null


def epsilon_fn(denoise_fn: DenoiseFn, schedule: schedules.Schedule, prediction_type: str) -> DenoiseFn:
  """A model read in its own parameterisation (config.diffusion.prediction_type: epsilon, x0 or v) as the eps
  prediction the task algorithms take, through `schedules.split_prediction`, the one conversion every sampler
  uses. Affine in the model output, so it commutes with window blending and classifier-free guidance."""
  if prediction_type not in schedules.PREDICTION_TYPES:
    raise ValueError(f"prediction_type {prediction_type!r} not in {schedules.PREDICTION_TYPES}")
  if prediction_type == "epsilon":
    return denoise_fn
  return lambda x, t: schedules.split_prediction(schedule, prediction_type, denoise_fn(x, t), x, t)[1]


def guided_denoise_fn(
  apply_fn: Callable[..., jax.Array], cond: dict[str, jax.Array], num_regions: int, guidance_scale: jax.Array | None
) -> DenoiseFn:
  """Classifier-free guidance: out_u + s * (out_c - out_u), both halves in one batched call.

  guidance_scale is a traced array; None disables guidance (single conditional pass).
  """
  if guidance_scale is None:
    return lambda x, t: apply_fn(x, t, cond)
  both = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u]), cond, null_condition(cond, num_regions))

  def fn(x: jax.Array, t: jax.Array) -> jax.Array:
    out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    out_c, out_u = jnp.split(out, 2)
    return out_u + guidance_scale * (out_c - out_u)

  return fn


# ------------------------------------------------------------------------------------------------
# DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2; diffusers' DPMSolverMultistepScheduler
# with algorithm_type="dpmsolver++", solver_type="midpoint", final_sigmas_type="zero").
# In lambda = log(alpha / sigma) the probability-flow ODE for the data prediction D is solved exactly
# for the linear part: x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) D, h = lambda_t - lambda_s,
# with D = x0_s (first order, == DDIM) or the multistep D = x0_s + (h / (2 h_prev)) (x0_s - x0_prev).


def dpmpp_2m_update(
  x_s: jax.Array,
  x0: jax.Array,
  x0_prev: jax.Array,
  alpha_t: jax.Array,
  sigma_ratio: jax.Array,
  h: jax.Array,
  h_prev: jax.Array,
  second_order: jax.Array | bool,
) -> jax.Array:
  """One DPM-Solver++(2M) update from s to t in terms of the schedule quantities.

  sigma_ratio = sigma_t / sigma_s (0 when t is the clean image), h = lambda_t - lambda_s (inf then),
  h_prev = lambda_s - lambda_{s_prev}. second_order=False gives the first-order (DDIM) update.
  """
  # 1 / (2 r) with r = h_prev / h; unused (and possibly inf) on first-order steps, so select it away
  coef = jnp.where(second_order, 0.5 * h / jnp.where(second_order, h_prev, 1.0), 0.0)
  d = x0 + coef * (x0 - x0_prev)
  return sigma_ratio * x_s - alpha_t * jnp.expm1(-h) * d


def _lambda(log_abar: jax.Array) -> jax.Array:
  """lambda = log(alpha / sigma) = 0.5 (log abar - log(1 - abar)); +inf for the clean image."""
  return 0.5 * (log_abar - jnp.log(-jnp.expm1(log_abar)))


def dpmpp_2m_step(
  schedule: schedules.Schedule,
  model_output: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  t_prev: jax.Array,
  x0_prev: jax.Array,
  h_prev: jax.Array,
  second_order: jax.Array | bool,
  *,
  prediction_type: str = "epsilon",
  clip_x0: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x_t -> x_{t_prev}; returns (x_{t_prev}, x0 prediction at t, h) to carry into the next step.

  The step onto the clean image (t_prev = -1, sigma = 0) is always first order: there h is infinite and
  the update is exactly x0 (diffusers' final_sigmas_type="zero" behaves the same way).
  """
  nd = x_t.ndim
  log_t = schedules.log_alpha_bar(schedule, t, nd)
  log_prev = schedules.log_alpha_bar(schedule, t_prev, nd)
  x0, _ = schedules.split_prediction(schedule, prediction_type, model_output, x_t, t)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
  final = jnp.reshape(t_prev, jnp.shape(t_prev) + (1,) * (nd - jnp.ndim(t_prev))) < 0
  lam_s = _lambda(log_t)
  lam_t = jnp.where(final, jnp.inf, _lambda(jnp.where(final, log_t, log_prev)))
  h = lam_t - lam_s
  sigma_ratio = jnp.where(final, 0.0, jnp.sqrt(jnp.expm1(log_prev) / jnp.expm1(log_t)))
  x = dpmpp_2m_update(
    x_t,
    x0,
    x0_prev,
    jnp.exp(0.5 * log_prev),
    sigma_ratio,
    h,
    h_prev,
    jnp.logical_and(second_order, jnp.logical_not(final)),
  )
  return x, x0, h


def sample_dpmpp_2m(
  denoise_fn: DenoiseFn,
  schedule: schedules.Schedule,
  timesteps: np.ndarray,
  rng: jax.Array,
  x_init: jax.Array,
  *,
  t_start: jax.Array | None = None,
  prediction_type: str = "epsilon",
  clip_x0: bool = True,
  progress: Callable[[jax.Array], None] | None = None,
  input_sigma: float | jax.Array = 0.0,
) -> jax.Array:
  """DPM-Solver++(2M) reverse process; same contract as `sample` (deterministic after the start noise),
  including the partial start at exactly t_start with the input's own noise counted (`input_sigma`).

  One network call per step, like DDIM, but second-order accurate: ~10-20 steps match DDIM-50+ (see
  benchmarks/RESULTS.md #15). The first executed step (also after a traced partial start) is first order
  because no previous x0 exists yet.
  """
  ts = jnp.asarray(timesteps, jnp.int32)
  n = x_init.shape[0]
  first, t_first, x = _partial_start(schedule, ts, x_init, t_start, jax.random.split(rng)[1], input_sigma)
  ts_ext, prev_ext = _extended_grid(ts)
  h_shape = (n,) + (1,) * (x_init.ndim - 1)

  def body(e, carry):
    x, x0_prev, h_prev = carry
    t = jnp.full((n,), jnp.where(e == first, t_first, ts_ext[e]))
    t_prev = jnp.full((n,), prev_ext[e])
    out = denoise_fn(x, t)
    x, x0, h = dpmpp_2m_step(
      schedule, out, x, t, t_prev, x0_prev, h_prev, e > first, prediction_type=prediction_type, clip_x0=clip_x0
    )
    if progress is not None:
      jax.debug.callback(progress, jnp.maximum(e - 1, 0))
    return x, x0.astype(x.dtype), h.astype(jnp.float32)

  init = (x, jnp.zeros_like(x), jnp.ones(h_shape, jnp.float32))
  x, _, _ = jax.lax.fori_loop(first, ts.shape[0] + 1, body, init)
  return x
