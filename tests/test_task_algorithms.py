"""Task algorithms against independent float64 references written from the papers, with exact models (fast tier:
no UNet).

Gaussian data x0 ~ N(mu, s^2) per voxel has a closed-form posterior mean, so the oracle model is the best possible
one and the best possible denoising MSE (Wiener) is known: every task is checked for "better than the input" AND
"close to the optimum" AND (where it is deterministic) against a float64 re-implementation of the published
algorithm that never sees x0 (DiffPIR: yuanzhi-zhu/DiffPIR main_ddpir_*.py, in its own [0, 1]-image conventions;
DDIM: Song et al. 2021 eq. 12; RePaint: andreas128/RePaint guided_diffusion/scheduler.py). A pass-through model and
the known-wrong variants (fresh noise on top of y's own, lambda on the wrong scale, no known-region injection, no
jumps, the wrong start t) must fail the same checks, and every algorithm gives the same result for an eps, a v and
an x0 model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
  abar64,
  ddim64,
  diffpir64,
  exact_pretrained,
  forward_matched_start64,
  gaussian_oracle,
  gaussian_posterior_mean64,
  gaussian_problem,
  identity_denoiser,
  mse,
  repaint_walk,
  wiener_mse,
)

from meddiff_jax.diffusion import samplers, schedules
from meddiff_jax.tasks import controlled, denoise

SCHED = schedules.make_schedule("cosine", 1000)
MU, S, SIGMA = 0.1, 0.3, 0.15
PREDICTIONS = ("epsilon", "v", "x0")


def posterior_mean64(x, t):
  return gaussian_posterior_mean64(x, t, MU, S)


def diffpir_reference64(img_l, noise_level_img, n_steps, lambda_, **kw):
  return diffpir64(img_l, noise_level_img, n_steps, lambda_, posterior_mean64, **kw)


def ddim_reference64(x, seq):
  return ddim64(x, seq, posterior_mean64)


@pytest.fixture(scope="module")
def problem():
  return gaussian_problem((1, 24, 24, 24, 1), MU, S, SIGMA)


def level_sigma(t):
  """The model-scale noise std of timestep t, a hair above so that the matched start adds no noise."""
  return float(np.sqrt((1 - abar64(t)) / abar64(t)) * 1.0001)


def t_star():
  return int(schedules.timestep_for_noise_level(SCHED, jnp.float32(SIGMA)))


# ---------------------------------------------------------------------------------------------
# the noise-matched start and partial diffusion (SDEdit)


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
    assert np.std(resid) == pytest.approx(np.sqrt(1 - a), rel=0.02)


def test_partial_diffusion_matches_the_float64_reference_and_is_near_optimal(problem):
  x0, y = problem
  t0 = t_star()
  out = denoise.partial_diffusion(
    gaussian_oracle(SCHED, MU, S), SCHED, y, t0, 20, jax.random.key(3), input_sigma=np.float32(level_sigma(t0))
  )
  seq = np.unique(np.round(np.linspace(0, t0, 20)).astype(int))[::-1]
  ref = ddim_reference64(forward_matched_start64(np.asarray(y), level_sigma(t0), t0, 0.0), seq)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-4)
  opt, noisy = wiener_mse(S, SIGMA), mse(y, x0)
  assert mse(out, x0) < 0.9 * noisy and mse(out, x0) < 1.1 * opt, (mse(out, x0), opt, noisy)
  # known-wrong: fresh noise on top of y's own (the start before #14) is not near optimal
  z = np.asarray(jax.random.normal(jax.random.key(5), y.shape), np.float64)
  doubled = ddim_reference64(np.sqrt(abar64(t0)) * np.asarray(y) + np.sqrt(1 - abar64(t0)) * z, seq)
  assert mse(doubled, x0) > 1.1 * opt


@pytest.mark.parametrize("prediction_type", ["v", "x0"])
def test_partial_diffusion_gives_the_same_result_for_every_parameterisation(problem, prediction_type):
  _, y = problem
  run = lambda p: denoise.partial_diffusion(
    gaussian_oracle(SCHED, MU, S, p), SCHED, y, t_star(), 10, jax.random.key(3), p, input_sigma=SIGMA
  )
  np.testing.assert_allclose(np.asarray(run(prediction_type)), np.asarray(run("epsilon")), atol=2e-5)


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
# DiffPIR


@pytest.mark.parametrize("lam", [1.0, 10.0])
def test_diffpir_matches_the_float64_reference_in_diffpirs_own_conventions(problem, lam):
  """Our API takes y and sigma_n on the [-1, 1] model scale; DiffPIR's code a [0, 1] image and its noise std:
  the same problem is y01 = (y + 1) / 2 with noise_level_img = sigma_n / 2."""
  _, y = problem
  t0 = t_star()
  sigma_n = level_sigma(t0)
  ref, t_ref, seq = diffpir_reference64((np.asarray(y, np.float64) + 1) / 2, sigma_n / 2, 20, lam)
  ts = denoise.diffpir_timesteps(SCHED, sigma_n, 20)
  assert ts[0] == t_ref == t0 and list(ts) == list(seq)
  out = denoise.diffpir(
    gaussian_oracle(SCHED, MU, S), SCHED, y, jnp.float32(sigma_n), ts, jax.random.key(2), lam=lam, zeta=0.0
  )
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-4)
  # the known-wrong lambda scales (sigma_n on the [-1, 1] scale: 4x; squared twice: 16x) are far from it
  for scale in (4.0, 16.0):
    wrong, _, _ = diffpir_reference64((np.asarray(y, np.float64) + 1) / 2, sigma_n / 2, 20, lam, rho_scale=scale)
    assert np.max(np.abs(wrong - ref)) > 50 * 2e-4


@pytest.mark.parametrize("prediction_type", ["v", "x0"])
def test_diffpir_gives_the_same_result_for_every_parameterisation(problem, prediction_type):
  _, y = problem
  ts = denoise.diffpir_timesteps(SCHED, SIGMA, 10)
  run = lambda p: denoise.diffpir(
    gaussian_oracle(SCHED, MU, S, p), SCHED, y, jnp.float32(SIGMA), ts, jax.random.key(2), prediction_type=p
  )
  np.testing.assert_allclose(np.asarray(run(prediction_type)), np.asarray(run("epsilon")), atol=2e-5)


def test_diffpir_is_better_than_the_input_and_near_optimal_and_a_pass_through_is_not(problem):
  x0, y = problem
  ts = denoise.diffpir_timesteps(SCHED, SIGMA, 20)
  run = lambda fn: denoise.diffpir(fn, SCHED, y, jnp.float32(SIGMA), ts, jax.random.key(2), lam=10.0, zeta=0.0)
  opt, noisy = wiener_mse(S, SIGMA), mse(y, x0)
  err = mse(run(gaussian_oracle(SCHED, MU, S)), x0)
  assert err < 0.9 * noisy and err < 1.12 * opt, (err, opt, noisy)
  assert mse(run(identity_denoiser(SCHED)), x0) > 1.12 * opt
  # known-wrong: the start with fresh noise on top of y's own
  z = np.asarray(jax.random.normal(jax.random.key(5), y.shape), np.float64)
  doubled, _, _ = diffpir_reference64((np.asarray(y, np.float64) + 1) / 2, SIGMA / 2, 20, 10.0, fresh_noise=True, z=z)
  assert mse(doubled, x0) > 1.12 * opt


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
# RePaint


def test_repaint_schedule_is_repaints_walk():
  assert list(controlled.repaint_schedule(250, 10, 10)) == repaint_walk(250, 10, 10)  # the paper's setting
  assert list(controlled.repaint_schedule(50, 2, 10)) == repaint_walk(50, 2, 10)
  assert list(controlled.repaint_schedule(5, 1, 1)) == [4, 3, 2, 1, 0, -1]  # no resampling: plain DDPM
  walk = controlled.repaint_schedule(250, 10, 10)
  assert np.sum(np.asarray(walk) == -1) == 1 and len(walk) - 1 == 250 + 24 * 9 * 20  # -1 once; 4570 moves


def model_call_times(num_steps, jump_timesteps, jump_n_sample):
  """The timesteps at which `repaint` calls the model (its denoising steps), in order."""
  seen = []

  def spy(x, t):
    jax.debug.callback(lambda t: seen.append(int(t[0])), t)
    return jnp.zeros_like(x)

  ts = samplers.make_timesteps(1000, num_steps, "trailing")
  known = jnp.zeros((1, 2, 2, 2, 1))
  controlled.repaint(spy, SCHED, ts, jax.random.key(0), known, jnp.ones_like(known), jump_timesteps, jump_n_sample)
  jax.effects_barrier()
  return seen, np.sort(ts)


@pytest.mark.parametrize("num_steps,grid_jump", [(250, 10), (50, 2)])
def test_repaint_jumps_are_counted_in_timesteps(num_steps, grid_jump):
  """RePaint's jump of 10 steps on its 250-step grid over T = 1000 is 40 timesteps: on a 250-step grid it is
  RePaint's walk itself, on a 50-step grid 2 steps, with 10 passes through every jump point either way."""
  seen, asc = model_call_times(num_steps, controlled.JUMP_TIMESTEPS, controlled.JUMP_N_SAMPLE)
  walk = repaint_walk(num_steps, grid_jump, controlled.JUMP_N_SAMPLE)
  expected = [int(asc[u]) for u, v in zip(walk[:-1], walk[1:]) if v < u]  # a model call per step down
  assert seen == expected
  ups = [int(asc[v]) - int(asc[u]) for u, v in zip(walk[:-1], walk[1:]) if v > u]  # grid_jump moves per jump
  assert ups and abs(sum(ups) / (len(ups) / grid_jump) - 40) <= 1000 / num_steps  # a jump spans ~40 timesteps


def constant_volume_oracle(mu, s, n):
  """Exact eps for x0 = z * ones, z ~ N(mu, s^2): the posterior of z uses the mean of x_t over all n voxels."""

  def fn(x, t):
    a = schedules.alpha_bar(SCHED, t, x.ndim)
    one_minus = 1.0 - a
    prec = 1.0 / s**2 + n * a / one_minus
    z = (mu / s**2 + jnp.sqrt(a) * jnp.sum(x, axis=(1, 2, 3, 4), keepdims=True) / one_minus) / prec
    return (x - jnp.sqrt(a) * z) / jnp.sqrt(one_minus)

  return fn


def test_repaint_harmonises_a_large_hole_with_its_jumps_and_not_without():
  """Perfectly correlated data (a constant volume) with two thirds of it unknown: the hole must take the known
  region's value. Without resampling (r = 1) the hole commits early to its own noise (mean error 0.07 measured);
  RePaint's jumps (40 timesteps, r = 10) bring it to within 0.005."""
  shape = (4, 8, 8, 8, 1)
  keep = jnp.ones(shape).at[:, 0:7, 0:7, 0:7].set(0.0)
  known = jnp.where(keep > 0, 0.6, -0.5)
  ts = samplers.make_timesteps(1000, 20, "trailing")
  err = lambda r: float(
    np.mean(
      np.abs(
        np.asarray(
          controlled.repaint(constant_volume_oracle(0.0, 0.5, 512), SCHED, ts, jax.random.key(1), known, keep, 40, r)
        )[np.asarray(keep) == 0]
        - 0.6
      )
    )
  )
  assert err(controlled.JUMP_N_SAMPLE) < 0.02 < 0.04 < err(1)


@pytest.mark.parametrize("jumps", [(40, 1), (40, 3)])
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
  # a pass-through model fills the hole with its own noise, not the prior
  through = controlled.repaint(identity_denoiser(SCHED), SCHED, ts, jax.random.key(0), known, keep, *jumps)
  assert abs(np.std(np.asarray(through)[np.asarray(keep) == 0]) - S) > 0.1 * S


@pytest.mark.parametrize("prediction_type", ["v", "x0"])
def test_repaint_gives_the_same_result_for_every_parameterisation(prediction_type):
  x0, _ = gaussian_problem((1, 8, 8, 8, 1), MU, S, 0.0, seed=4)
  keep = jnp.ones_like(x0).at[:, 2:6, 2:6, 2:6].set(0.0)
  ts = samplers.make_timesteps(1000, 20, "trailing")
  run = lambda p: controlled.repaint(
    gaussian_oracle(SCHED, MU, S, p), SCHED, ts, jax.random.key(0), x0, keep, 40, 2, prediction_type=p
  )
  np.testing.assert_allclose(np.asarray(run(prediction_type)), np.asarray(run("epsilon")), atol=5e-5)


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
  controlled.repaint(spy, SCHED, ts, jax.random.key(0), known, keep, 200, 2)
  jax.effects_barrier()
  assert len(calls) > len(ts)  # jumps revisit steps
  for t, x in calls:
    a = abar64(t)
    resid = (x - np.sqrt(a) * known_np)[keep_np]
    assert abs(resid.mean()) < 0.05 and resid.std() == pytest.approx(np.sqrt(1 - a), rel=0.05), (t, resid.std())


def test_jump_steps_round_timesteps_to_the_grid():
  assert controlled.jump_steps(1000, 250, 40) == 10 and controlled.jump_steps(1000, 50, 40) == 2
  assert controlled.jump_steps(1000, 10, 40) == 1  # at least one step
  assert controlled.jump_steps(1000, 40, 40) == 2  # 1.6 steps: rounded, not truncated
  with pytest.raises(ValueError, match="jump_timesteps=1000"):
    controlled.jump_steps(1000, 50, 1000)


# ---------------------------------------------------------------------------------------------
# anomaly reconstruction: exactly from noise_t


def anomaly_spec(**kw):
  from meddiff_jax.configs import anomaly as anomaly_config
  from meddiff_jax.tasks import anomaly

  cfg = anomaly_config.get_config()
  cfg.update(**{**dict(overlap=0.0, window_batch=8, noise_t=950, num_steps=10, seed=0, sampler="ddim"), **kw})
  return anomaly.AnomalySpec.from_config(cfg)


def reconstruct_with_a_spy(prediction_type, task, x0):
  """anomaly.reconstruct over one window (the volume is the patch) with the exact Gaussian model; returns the
  reconstruction and the model calls' (t, x)."""
  from meddiff_jax.tasks import anomaly, common

  calls = []
  oracle = gaussian_oracle(SCHED, MU, S, prediction_type)

  def apply(x, t, cond):
    jax.debug.callback(lambda x, t: calls.append((int(t[0]), np.asarray(x))), x, t)
    return oracle(x, t)

  pre = exact_pretrained(apply, prediction_type=prediction_type, patch=8)
  canvas = common.Canvas((8, 8, 8), 0, None, None, None)
  recon = anomaly.reconstruct(pre, np.asarray(x0)[0, ..., 0], canvas, task)
  jax.effects_barrier()
  return recon, calls


def test_anomaly_reconstruction_starts_at_exactly_noise_t_and_is_ddim_from_there():
  """The anomaly path (windows, partial diffusion) with the exact prior: the first model call is at t = noise_t
  itself, the state there has q(x_noise_t | x0)'s statistics, and the reconstruction is the float64 DDIM from that
  state; a pass-through model's is not."""
  task = anomaly_spec()
  x0, _ = gaussian_problem((1, 8, 8, 8, 1), MU, S, 0.0, seed=7)
  recon, calls = reconstruct_with_a_spy("epsilon", task, x0)
  times = [t for t, _ in calls]
  seq = samplers.partial_timesteps(950, 10)
  assert times == list(seq)
  x_start = calls[0][1][0, ..., 0]
  resid = x_start - np.sqrt(abar64(950)) * np.asarray(x0)[0, ..., 0]
  assert abs(resid.mean()) < 0.2 and resid.std() == pytest.approx(np.sqrt(1 - abar64(950)), rel=0.12)  # 512 draws
  ref = ddim_reference64(x_start, seq)
  np.testing.assert_allclose(recon, ref, atol=2e-4)
  # known-wrong: from the wrong t (one grid step low) the same state gives another reconstruction
  assert np.max(np.abs(ddim_reference64(x_start, samplers.partial_timesteps(940, 10)) - ref)) > 10 * 2e-4
  for p in ("v", "x0"):
    np.testing.assert_allclose(reconstruct_with_a_spy(p, task, x0)[0], recon, atol=2e-5)


def test_anomaly_refuses_a_noise_t_outside_the_schedule():
  from meddiff_jax import sections
  from meddiff_jax.tasks import anomaly, common

  pre = exact_pretrained(lambda x, t, c: jnp.zeros_like(x), patch=8)
  canvas = common.Canvas((8, 8, 8), 0, None, None, None)
  with pytest.raises(sections.ConfigError, match="noise_t=1000"):
    anomaly.reconstruct(pre, np.zeros((8, 8, 8), np.float32), canvas, anomaly_spec(noise_t=1000))
