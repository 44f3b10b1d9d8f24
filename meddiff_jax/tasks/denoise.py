"""Zero-shot denoising with the pretrained prior: DiffPIR (plug-and-play) and plain partial diffusion.

DiffPIR (Zhu et al. 2023; MedDiff-FM: lambda ~ 10) for the identity degradation y = x + n, sigma_n the
noise std on the [-1, 1] data scale. Start at the timestep t* whose data-scale noise std matches
sigma_n, counting the noise y already carries (`samplers.noise_matched_start`: at t* nothing is added,
x_t* = sqrt(abar*) y); then per step
  x0      <- model prediction
  x0_hat  <- argmin ||y - x||^2 + rho ||x - x0||^2 = (y + rho x0) / (1 + rho),
             rho = lambda (sigma_n / 2)^2 / sigma_t^2   (DiffPIR's code: its sigma is in [0, 1] image units)
  x_prev  <- sqrt(abar') x0_hat + sqrt(1 - abar') (sqrt(1 - zeta) eps_hat + sqrt(zeta) z)
with sigma_t = sqrt(1 - abar)/sqrt(abar). Partial diffusion skips the data step (SDEdit): the same
noise-matched start and a DDIM grid from t* down to 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from meddiff_jax import pretrained, sections
from meddiff_jax.data import preprocess
from meddiff_jax.diffusion import samplers, schedules
from meddiff_jax.tasks import common, scans

METHODS = ("diffpir", "partial")  # config.method
ESTIMATE = "estimate"  # config.noise_sigma_hu: estimated from the image (`estimate_noise_sigma`)


@dataclasses.dataclass(frozen=True)
class DenoiseSpec(common.TaskSpec):
  """configs/denoise.py, typed."""

  MODE = "denoise"
  checkpoint: str
  input: str
  spacing: tuple[float, float, float] | str  # mm, 'checkpoint' or 'input' (tasks/scans.decide_spacing)
  method: str
  noise_sigma_hu: float | str  # HU, or 'estimate'
  lam: float
  zeta: float
  window_blend_hu: float  # the scan's own HU outside the window, blended over this around its edges
  output_int16: bool

  def __post_init__(self):
    super().__post_init__()
    sections.keyword_or("config.spacing", self.spacing, (common.CHECKPOINT, common.INPUT), sections.sizes)
    sections.choice("config.method", self.method, METHODS)
    sections.keyword_or("config.noise_sigma_hu", self.noise_sigma_hu, (ESTIMATE,), sections.positive)
    sections.positive("config.lam", self.lam)
    sections.fraction("config.zeta", self.zeta)
    sections.at_least("config.window_blend_hu", self.window_blend_hu, 0.0)
    sections.flag("config.output_int16", self.output_int16)


# Enough second differences for the median to be exact to ~1e-3 of sigma (its standard error ~1.25 / sqrt(n)):
# a big scan is read in slabs and every k-th difference kept, so the estimate never holds a copy of the volume.
NOISE_SAMPLES = 1 << 24
NOISE_SLAB = 16  # rows along axis 0 per slab


def estimate_noise_sigma(
  image: np.ndarray, mask: np.ndarray | None = None, lag: int = 4, max_samples: int = NOISE_SAMPLES
) -> float:
  """Robust noise std that holds for spatially correlated (CT-like) noise.

  CT noise is correlated over a few voxels by the reconstruction kernel, so neighbour differences cancel
  much of it (a white-noise formula reads CT noise ~40% low). Second differences x[i-k] - 2 x[i] + x[i+k]
  at a lag k past the correlation length keep it all (variance 6 sigma^2) while still cancelling smooth
  anatomy up to linear trends; the MAD over all three axes (voxels whose stencil lies in `mask`) ignores
  organ edges. Computed slab by slab along axis 0; past `max_samples` differences, every k-th one in scan
  order is kept (the same subset whatever the slab size).
  """
  x = np.asarray(image)
  inside = None if mask is None else np.asarray(mask, bool)
  axes = [a for a in range(x.ndim) if x.shape[a] > 2 * lag]
  total = sum(x.size // x.shape[a] * (x.shape[a] - 2 * lag) for a in axes)
  stride = max(1, -(-total // max_samples))
  values, seen = [], 0
  for axis in axes:
    reach = 2 * lag if axis == 0 else 0  # extra rows a slab reads past its last output row
    for lo in range(0, x.shape[0] - reach, NOISE_SLAB):
      hi = min(lo + NOISE_SLAB, x.shape[0] - reach)
      block = x[lo : hi + reach].astype(np.float64)
      n = block.shape[axis] - 2 * lag
      take = lambda a, at: np.take(a, np.arange(at, at + n), axis=axis)
      d = take(block, 0) - 2.0 * take(block, lag) + take(block, 2 * lag)
      if inside is not None:
        m = inside[lo : hi + reach]
        d = d[take(m, 0) & take(m, lag) & take(m, 2 * lag)]
      d = d.ravel()
      values.append(d[(-seen) % stride :: stride])
      seen += d.size
  d = np.concatenate(values) if values else np.zeros(1)
  if d.size < 2:
    raise ValueError(f"cannot estimate the noise: the volume {x.shape} (mask) is too small for lag {lag}")
  return float(np.median(np.abs(d - np.median(d))) / 0.6745 / np.sqrt(6.0))


def diffpir_timesteps(schedule: schedules.Schedule, sigma_n: float, num_steps: int) -> np.ndarray:
  """Uniformly spaced descending timesteps from the start matched to sigma_n down to 0."""
  t_start = int(schedules.timestep_for_noise_level(schedule, jnp.float32(sigma_n)))
  return np.unique(np.round(np.linspace(0, t_start, min(num_steps, t_start + 1))).astype(np.int32))[::-1].copy()


def diffpir(
  denoise_fn: Callable[[jax.Array, jax.Array], jax.Array],
  schedule: schedules.Schedule,
  y: jax.Array,
  sigma_n: jax.Array,
  timesteps: np.ndarray,
  rng: jax.Array,
  *,
  lam: float = 10.0,
  zeta: float = 0.3,
  prediction_type: str = "epsilon",
  progress: Callable | None = None,
) -> jax.Array:
  """DiffPIR restoration of y (data scale [-1, 1]) for additive Gaussian noise of std sigma_n."""
  ts = jnp.asarray(timesteps, jnp.int32)
  prev = jnp.asarray(samplers.previous_timesteps(np.asarray(timesteps)))
  n = y.shape[0]
  rng, init_rng = jax.random.split(rng)
  x = samplers.noise_matched_start(schedule, y, jnp.full((n,), ts[0]), jax.random.normal(init_rng, y.shape), sigma_n)

  def body(i, carry):
    x, _, rng = carry
    rng, z_rng = jax.random.split(rng)
    t, t_prev = jnp.full((n,), ts[i]), jnp.full((n,), prev[i])
    x0, _ = schedules.split_prediction(schedule, prediction_type, denoise_fn(x, t), x, t)
    x0 = jnp.clip(x0, -1.0, 1.0)
    abar = schedules.alpha_bar(schedule, t, x.ndim)
    sigma_t2 = schedules.one_minus_alpha_bar(schedule, t, x.ndim) / abar
    rho = lam * (0.5 * sigma_n) ** 2 / sigma_t2  # DiffPIR's lambda scale (sigma in [0, 1] units)
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


def partial_diffusion(
  denoise_fn,
  schedule: schedules.Schedule,
  y: jax.Array,
  t_start: int,
  num_steps: int,
  rng: jax.Array,
  prediction_type: str = "epsilon",
  progress: Callable | None = None,
  input_sigma: float | jax.Array = 0.0,
  method: str = "ddim",
) -> jax.Array:
  """SDEdit: y to t_start (counting its own noise `input_sigma`), then `method` (ddim | ddpm | dpmpp_2m) over
  a grid from t_start to 0."""
  timesteps = samplers.partial_timesteps(int(t_start), num_steps)
  return samplers.sample(
    denoise_fn,
    schedule,
    timesteps,
    rng,
    y,
    t_start=jnp.int32(timesteps[0]),
    method=method,
    prediction_type=prediction_type,
    progress=progress,
    input_sigma=input_sigma,
  )


def denoise_part(pre: pretrained.Pretrained, inp: common.TaskInput, task: DenoiseSpec) -> scans.PartResult:
  """One region part of the scan denoised on its working grid: (HU, the noise level used)."""
  lo, hi = preprocess.window_bounds(inp.region)
  sigma = (
    estimate_noise_sigma(inp.unit[inp.crop], preprocess.body_mask(inp.work.data))
    if task.noise_sigma_hu == ESTIMATE
    else float(task.noise_sigma_hu) * 2.0 / (hi - lo)
  )
  if task.method == "diffpir":
    ts = diffpir_timesteps(pre.schedule, sigma, task.num_steps)
    sample = lambda fn, y, r: diffpir(
      fn, pre.schedule, y, jnp.float32(sigma), ts, r, lam=task.lam, zeta=task.zeta, progress=bar
    )
  else:  # partial
    t0 = int(schedules.timestep_for_noise_level(pre.schedule, jnp.float32(sigma)))
    sample = lambda fn, y, r: partial_diffusion(
      fn, pre.schedule, y, t0, task.num_steps, r, progress=bar, input_sigma=jnp.float32(sigma), method=task.sampler
    )
  bar = common.ProgressBar(task.num_steps, f"denoise ({task.method}, {inp.part.region})")
  y = (jnp.asarray(inp.unit)[None, ..., None],)
  den = common.run_windowed(pre, sample, y, inp.canvas(), task, progress=bar)
  sigma_hu = sigma * (hi - lo) / 2.0
  return scans.PartResult(inp.part, inp.work, preprocess.unit_to_hu(den, inp.region), {"noise_sigma_hu": sigma_hu})


def run(task: DenoiseSpec, memory: common.InMemory | None = None) -> dict[str, Any]:
  """The `denoise` command: a CT in, denoised on the input's grid out (the scan's own HU outside the window), with
  its JSON sidecar. Everything about the scan is decided before the model loads (tasks/scans.open_scan). `memory`:
  the model and the CT given in memory, the result kept there (meddiff_jax/api.py)."""
  scan = common.open_scan(task, common.model_data(task, memory), memory=memory)
  summary = common.summary(task, scan, task.checkpoint, task.window_blend_hu)
  pre = common.load_model(task, memory)
  results = [denoise_part(pre, inp, task) for inp in common.prepare_inputs(pre, scan)]
  sigmas = [r.info["noise_sigma_hu"] for r in results]
  how = "estimated from the scan" if task.noise_sigma_hu == ESTIMATE else "given (--config.noise_sigma_hu)"
  summary.add(
    "noise", f"{', '.join(f'{s:.1f}' for s in sigmas)} HU (std), {how}; {task.method}, {task.num_steps} steps"
  )
  return common.finish_scan(
    scan,
    results,
    task,
    summary,
    window_blend_hu=task.window_blend_hu,
    dtype=np.int16 if task.output_int16 else np.float32,
    description=f"meddiff denoise {task.method} ({task.checkpoint})",
    sidecar={"method": task.method, "noise_sigma_hu": sigmas[0] if len(sigmas) == 1 else sigmas},
    memory=memory,
  )
