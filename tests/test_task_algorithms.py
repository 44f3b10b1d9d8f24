"""Task algorithms against independent references, with exact denoisers (fast tier: no UNet).

Gaussian data x0 ~ N(mu, s^2) per voxel has a closed-form posterior mean, so the oracle model is the best
possible one and the best possible denoising MSE (Wiener) is known: every task is checked for
"better than the input" AND "close to the optimum", and a pass-through denoiser must fail. DiffPIR and
partial diffusion are also compared step by step with a float64 scalar re-derivation of the published
algorithms (DiffPIR: yuanzhi-zhu/DiffPIR main_ddpir_deblur.py; RePaint: andreas128/RePaint scheduler.py).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gaussian_oracle, gaussian_problem, identity_denoiser, mse, wiener_mse

from meddiff_jax.diffusion import samplers, schedules
from meddiff_jax.tasks import controlled, denoise

SCHED = schedules.make_schedule("cosine", 1000)
T64 = schedules.tables(schedules.make_betas("cosine", 1000))
MU, S, SIGMA = 0.1, 0.3, 0.15


def abar64(t):
  return 1.0 if t < 0 else float(T64["alphas_cumprod"][t])


def posterior_mean64(x, t):
  a = abar64(t)
  return MU + S**2 * np.sqrt(a) / (a * S**2 + 1 - a) * (x - np.sqrt(a) * MU)


def reference_diffpir64(y, sigma_n, timesteps, lam):
  """DiffPIR for the identity operator, zeta = 0 (deterministic), float64, from the paper's equations.

  rho_t = lambda sigma^2 / sigma_t^2 with sigma in [0, 1] image units (DiffPIR's code), i.e. sigma_n / 2.
  """
  y = np.asarray(y, np.float64)
  t0 = int(timesteps[0])
  a0 = abar64(t0)
  x = np.sqrt(a0) * y  # at y's own noise level nothing is added (the noise is already in y)
  x0_hat = y
  prev = list(timesteps[1:]) + [-1]
  for t, tp in zip(timesteps, prev):
    a, ap = abar64(int(t)), abar64(int(tp))
    x0 = np.clip(posterior_mean64(x, int(t)), -1, 1)
    rho = lam * (sigma_n / 2) ** 2 / ((1 - a) / a)
    x0_hat = (y + rho * x0) / (1 + rho)
    eps = (x - np.sqrt(a) * x0_hat) / np.sqrt(1 - a)
    x = np.sqrt(ap) * x0_hat + np.sqrt(1 - ap) * eps
  return x0_hat


def reference_ddim_partial64(y, timesteps):
  """Deterministic DDIM from the noise-matched start sqrt(abar*) y, float64 (x0 clipped like ADM)."""
  x = np.sqrt(abar64(int(timesteps[0]))) * np.asarray(y, np.float64)
  prev = list(timesteps[1:]) + [-1]
  for t, tp in zip(timesteps, prev):
    a, ap = abar64(int(t)), abar64(int(tp))
    x0 = np.clip(posterior_mean64(x, int(t)), -1, 1)
    eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
    x = np.sqrt(ap) * x0 + np.sqrt(1 - ap) * eps
  return x


@pytest.fixture(scope="module")
def problem():
  return gaussian_problem((1, 24, 24, 24, 1), MU, S, SIGMA)


def t_star():
  return int(schedules.timestep_for_noise_level(SCHED, jnp.float32(SIGMA)))


# ---------------------------------------------------------------------------------------------
# partial diffusion (defect 1)


def test_partial_timesteps_start_at_t_star_and_use_every_step():
  ts = samplers.partial_timesteps(87, 20)
  assert ts[0] == 87 and ts[-1] == 0 and len(ts) == 20 and np.all(np.diff(ts) < 0)
  assert list(samplers.partial_timesteps(950, 50)[:2]) == [950, 931]
  assert len(samplers.partial_timesteps(-1, 5)) == 0


def test_noise_matched_start_has_the_noise_level_of_q_sample():
  """y already carries sigma_y: the start adds only what is missing, so x_t has exactly q(x_t|x0)'s noise."""
  x0 = jnp.full((1, 64, 64, 16, 1), 0.2)
  for t, sigma_y in ((87, SIGMA), (300, SIGMA), (500, 0.0)):
    y = x0 + sigma_y * jax.random.normal(jax.random.key(0), x0.shape)
    x = samplers.noise_matched_start(SCHED, y, jnp.array([t]), jax.random.normal(jax.random.key(1), x0.shape), sigma_y)
    a = abar64(t)
    resid = np.asarray(x) - np.sqrt(a) * 0.2
    assert np.mean(resid) == pytest.approx(0.0, abs=3e-3)
    assert np.std(resid) == pytest.approx(np.sqrt(max(1 - a, a * sigma_y**2)), rel=0.02)


def test_partial_diffusion_matches_the_float64_reference_and_is_near_optimal(problem):
  x0, y = problem
  t0 = t_star()
  level = np.sqrt((1 - abar64(t0)) / abar64(t0))  # y's noise read as exactly t0's: nothing is added
  out = denoise.partial_diffusion(
    gaussian_oracle(SCHED, MU, S), SCHED, y, t0, 20, jax.random.key(3), input_sigma=np.float32(level * 1.0001)
  )
  ref = reference_ddim_partial64(y, samplers.partial_timesteps(t0, 20))
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-4)
  opt, noisy = wiener_mse(S, SIGMA), mse(y, x0)
  assert mse(out, x0) < 0.9 * noisy and mse(out, x0) < 1.1 * opt, (mse(out, x0), opt, noisy)


def test_partial_diffusion_with_a_pass_through_denoiser_is_not_near_optimal(problem):
  x0, y = problem
  out = denoise.partial_diffusion(
    identity_denoiser(SCHED), SCHED, y, t_star(), 20, jax.random.key(3), input_sigma=SIGMA
  )
  assert mse(out, x0) > 1.1 * wiener_mse(S, SIGMA)


@pytest.mark.parametrize("method", samplers.METHODS)
def test_sample_partial_start_steps_from_t_start_itself(method):
  """With a grid that misses t_start, the first model call is at t_start and the noise level is t_start's
  (every sampler: each has its own loop)."""
  seen = []

  def spy(x, t):
    jax.debug.callback(lambda t: seen.append(int(t[0])), t)
    return jnp.zeros_like(x)

  ts = samplers.make_timesteps(1000, 10, "leading")  # 900, 800, ..., 0
  samplers.sample(spy, SCHED, ts, jax.random.key(0), jnp.zeros((1, 2, 2, 2, 1)), t_start=jnp.int32(950), method=method)
  jax.effects_barrier()
  assert seen == [950, 900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
  seen.clear()
  samplers.sample(spy, SCHED, ts, jax.random.key(0), jnp.zeros((1, 2, 2, 2, 1)), t_start=jnp.int32(300), method=method)
  jax.effects_barrier()
  assert seen == [300, 200, 100, 0]


# ---------------------------------------------------------------------------------------------
# DiffPIR (defects 2, 3)


@pytest.mark.parametrize("lam", [1.0, 10.0])
def test_diffpir_matches_the_float64_reference(problem, lam):
  _, y = problem
  ts = denoise.diffpir_timesteps(SCHED, SIGMA, 20)
  sigma = np.float32(np.sqrt((1 - abar64(ts[0])) / abar64(ts[0])) * 1.0001)  # exactly ts[0]'s level: no added noise
  out = denoise.diffpir(
    gaussian_oracle(SCHED, MU, S), SCHED, y, jnp.float32(sigma), ts, jax.random.key(2), lam=lam, zeta=0.0
  )
  np.testing.assert_allclose(np.asarray(out), reference_diffpir64(y, float(sigma), ts, lam), atol=2e-4)


def test_diffpir_is_better_than_the_input_and_near_optimal_and_a_pass_through_is_not(problem):
  x0, y = problem
  ts = denoise.diffpir_timesteps(SCHED, SIGMA, 20)
  run = lambda fn: denoise.diffpir(fn, SCHED, y, jnp.float32(SIGMA), ts, jax.random.key(2), lam=10.0, zeta=0.0)
  opt, noisy = wiener_mse(S, SIGMA), mse(y, x0)
  err = mse(run(gaussian_oracle(SCHED, MU, S)), x0)
  assert err < 0.9 * noisy and err < 1.12 * opt, (err, opt, noisy)
  assert mse(run(identity_denoiser(SCHED)), x0) > 1.12 * opt


def test_diffpir_data_step_pulls_a_wrong_prior_towards_y(problem):
  """A prior with the wrong mean: the data step (weight lambda) keeps the result near y; without it the
  result drifts to the wrong prior."""
  x0, y = problem
  ts = denoise.diffpir_timesteps(SCHED, SIGMA, 20)
  wrong = gaussian_oracle(SCHED, MU + 0.4, S)
  run = lambda lam: float(
    np.mean(
      np.asarray(denoise.diffpir(wrong, SCHED, y, jnp.float32(SIGMA), ts, jax.random.key(2), lam=lam, zeta=0.0))
      - np.asarray(x0)
    )
  )
  assert abs(run(0.1)) < 0.5 * abs(run(100.0))


def test_diffpir_zeta_injects_fresh_noise(problem):
  """zeta = 1 replaces eps_hat by fresh noise each step: a posterior sample, about twice the optimal MSE."""
  x0, y = problem
  ts = denoise.diffpir_timesteps(SCHED, SIGMA, 20)
  run = lambda z: mse(
    denoise.diffpir(
      gaussian_oracle(SCHED, MU, S), SCHED, y, jnp.float32(SIGMA), ts, jax.random.key(2), lam=10.0, zeta=z
    ),
    x0,
  )
  assert run(1.0) > 1.4 * run(0.0)


# ---------------------------------------------------------------------------------------------
# RePaint (defect 5)


def test_repaint_schedule_follows_the_reference_walk():
  walk = controlled.repaint_schedule(250, 10, 10)  # the RePaint paper's setting
  assert walk[0] == 249 and walk[-1] == -1 and np.all(np.abs(np.diff(walk)) == 1)
  assert np.sum(walk == -1) == 1  # the clean image is reached once
  # 24 jump points (0, 10, ..., 230), each revisited 9 times, 10 up + 10 down each: 250 + 24 * 9 * 20 moves
  assert len(walk) - 1 == 250 + 24 * 9 * 20
  assert list(controlled.repaint_schedule(5, 1, 1)) == [4, 3, 2, 1, 0, -1]  # no jumps: plain DDPM
  walk = controlled.repaint_schedule(6, 2, 2)
  assert list(walk) == [5, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]


@pytest.mark.parametrize("jumps", [(1, 1), (2, 3)])
def test_repaint_fills_iid_gaussian_holes_with_the_prior_and_keeps_the_known_region(jumps):
  """i.i.d. Gaussian data: the hole is independent of the known part, so it must be filled with samples of
  N(mu, s^2) (mean and std), not a shrunken re-denoised x0; the known region comes back exactly."""
  x0, _ = gaussian_problem((1, 24, 24, 24, 1), MU, S, 0.0, seed=4)
  keep = jnp.ones_like(x0).at[:, 4:20, 4:20, 4:20].set(0.0)
  known = jnp.where(keep > 0, x0, 0.9)
  ts = samplers.make_timesteps(1000, 100, "trailing")  # coarse DDPM grids under-disperse (posterior-mean x0)
  out = jax.jit(lambda r: controlled.repaint(gaussian_oracle(SCHED, MU, S), SCHED, ts, r, known, keep, *jumps))(
    jax.random.key(0)
  )
  hole = np.asarray(out)[np.asarray(keep) == 0]
  assert np.mean(hole) == pytest.approx(MU, abs=0.02) and np.std(hole) == pytest.approx(S, rel=0.1)
  np.testing.assert_allclose(np.asarray(out)[np.asarray(keep) > 0], np.asarray(x0)[np.asarray(keep) > 0], atol=1e-6)


def constant_volume_oracle(mu, s, n):
  """Exact eps for x0 = z * ones, z ~ N(mu, s^2): the posterior of z uses the mean of x_t over all n voxels."""

  def fn(x, t):
    a = schedules.alpha_bar(SCHED, t, x.ndim)
    one_minus = 1.0 - a
    prec = 1.0 / s**2 + n * a / one_minus
    z = (mu / s**2 + jnp.sqrt(a) * jnp.sum(x, axis=(1, 2, 3, 4), keepdims=True) / one_minus) / prec
    return (x - jnp.sqrt(a) * z) / jnp.sqrt(one_minus)

  return fn


def test_repaint_fills_a_hole_consistently_with_the_known_region():
  """Perfectly correlated data (a constant volume): the hole must take the known region's value; this
  needs the known region at the right noise level at every step and the jumps to harmonise."""
  shape = (1, 8, 8, 8, 1)
  keep = jnp.ones(shape).at[:, 2:6, 2:6, 2:6].set(0.0)
  known = jnp.where(keep > 0, 0.6, -0.5)
  ts = samplers.make_timesteps(1000, 20, "trailing")
  out = controlled.repaint(constant_volume_oracle(0.0, 0.5, 512), SCHED, ts, jax.random.key(1), known, keep, 2, 3)
  hole = np.asarray(out)[np.asarray(keep) == 0]
  assert np.mean(np.abs(hole - 0.6)) < 0.05, np.mean(hole)


# ---------------------------------------------------------------------------------------------
# anomaly reconstruction noise level (defect 6)


def test_anomaly_reconstruction_starts_at_exactly_noise_t_with_the_gaussian_prior():
  """The whole anomaly path (windows, partial diffusion) with an exact prior: the first model call is at
  t = noise_t itself, and the reconstruction of pure-prior data is a fresh draw near the prior mean."""
  from meddiff_jax.configs import anomaly as anomaly_config
  from meddiff_jax.tasks import anomaly, common

  seen = []
  oracle = gaussian_oracle(SCHED, MU, S)

  def apply(x, t, cond):
    jax.debug.callback(lambda t: seen.append(int(t[0])), t)
    return oracle(x, t)

  pre = types.SimpleNamespace(
    patch_size=8, schedule=SCHED, apply=apply, spec=types.SimpleNamespace(num_regions=3, structure_channels=0)
  )
  cfg = anomaly_config.get_config()
  cfg.update(overlap=0.5, window_batch=8, noise_t=950, num_steps=10, seed=0, sampler="ddim")
  x0, _ = gaussian_problem((1, 8, 8, 8, 1), MU, S, 0.0, seed=7)
  canvas = common.Canvas((8, 8, 8), 0, None, None, None)
  recon = anomaly.reconstruct(pre, np.asarray(x0)[0, ..., 0], canvas, anomaly.AnomalySpec.from_config(cfg))
  jax.effects_barrier()
  assert seen[0] == 950 and seen[-1] == 0 and len(set(seen)) == 10
  # at t = 950 little of x0 survives: the reconstruction correlates with it only weakly (sqrt(abar) ~ 0.08)
  a = abar64(950)
  corr = np.corrcoef(recon.ravel(), np.asarray(x0).ravel())[0, 1]
  expected = np.sqrt(a) * S / np.sqrt(a * S**2 + 1 - a)  # corr(x0, E[x0|x_950])-ish scale
  assert corr < 0.5 and abs(corr - expected) < 0.25


def test_repaint_known_region_carries_the_noise_level_of_every_model_call():
  """At every model call at time t, the known voxels are a draw of q(x_t | known): residual
  x - sqrt(abar_t) known has mean 0 and std sqrt(1 - abar_t) (after denoising steps and jumps alike)."""
  shape = (1, 24, 24, 24, 1)
  keep = jnp.ones(shape).at[:, 8:16, 8:16, 8:16].set(0.0)
  known = jnp.asarray(np.random.default_rng(0).uniform(-0.8, 0.8, shape), jnp.float32)
  keep_np, known_np = np.asarray(keep) > 0, np.asarray(known)
  calls = []

  def spy(x, t):
    jax.debug.callback(lambda x, t: calls.append((int(t[0]), np.asarray(x))), x, t)
    return jnp.zeros_like(x)

  ts = samplers.make_timesteps(1000, 10, "trailing")
  controlled.repaint(spy, SCHED, ts, jax.random.key(0), known, keep, 2, 2)
  jax.effects_barrier()
  assert len(calls) > len(ts)  # jumps revisit steps
  for t, x in calls:
    a = abar64(t)
    resid = (x - np.sqrt(a) * known_np)[keep_np]
    assert abs(resid.mean()) < 0.05 and resid.std() == pytest.approx(np.sqrt(1 - a), rel=0.05), (t, resid.std())
