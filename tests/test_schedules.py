"""Schedule tables and single sampler steps against float64 closed forms (and diffusers if installed)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ddpm_posterior_tables

from meddiff_jax.diffusion import samplers, schedules

T = 1000


def cosine_alpha_bar_f64(t):
  s = 0.008
  f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2
  return f(t + 1) / f(0)  # abar after t+1 noising steps (index t)


def test_cosine_alpha_bar_matches_closed_form():
  sched = schedules.make_schedule("cosine", T)
  ref = np.array([cosine_alpha_bar_f64(t) for t in range(T)])
  # the 0.999 beta clip only bites at the very end
  np.testing.assert_allclose(np.asarray(sched.alphas_cumprod)[:990], ref[:990], rtol=2e-5, atol=1e-7)
  assert np.all(np.diff(np.asarray(sched.alphas_cumprod)) < 0)
  assert float(sched.betas.max()) <= 0.999 + 1e-6


def test_linear_schedule_endpoints_and_posterior():
  betas = schedules.make_betas("linear", T)
  assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
  tab = ddpm_posterior_tables(betas)
  acp = np.cumprod(1 - betas)
  t = 500
  var = betas[t] * (1 - acp[t - 1]) / (1 - acp[t])
  assert tab["posterior_variance"][t] == pytest.approx(var, rel=1e-12)
  assert tab["posterior_mean_coef1"][t] == pytest.approx(betas[t] * math.sqrt(acp[t - 1]) / (1 - acp[t]), rel=1e-12)
  # the sampler's ancestral step (from log abar, any t -> t') is that posterior for t -> t-1
  np.testing.assert_allclose(schedules.tables(betas)["alphas_cumprod"], acp, rtol=1e-12)
  with jax.enable_x64(True):
    sched = schedules.Schedule(**{k: jnp.asarray(v) for k, v in schedules.tables(betas).items()})
    x_t, x0, noise = (
      jnp.asarray(np.array(v, np.float64).reshape(2, 1, 1, 1, 1)) for v in ([0.3, -1.2], [0.5, -0.25], [1.0, -2.0])
    )
    out = samplers.ddpm_step(
      sched, x0, x_t, jnp.full((2,), t), jnp.full((2,), t - 1), noise, prediction_type="x0", clip_x0=False
    )
  ref = tab["posterior_mean_coef1"][t] * x0 + tab["posterior_mean_coef2"][t] * x_t + np.sqrt(var) * noise
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6)  # a wrong term is O(1) off


@pytest.mark.parametrize("pred", ["epsilon", "x0", "v"])
def test_prediction_parameterisations_round_trip(pred):
  sched = schedules.make_schedule("cosine", T)
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.uniform(k1, (4, 3, 3, 3, 1), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 10, 500, 999])
  x_t = schedules.q_sample(sched, x0, t, eps)
  target = schedules.training_target(sched, pred, x0, eps, t)
  x0_hat, eps_hat = schedules.split_prediction(sched, pred, target, x_t, t)
  # t=999 has abar ~ 0, so x0 from eps is ill-conditioned; compare where it is well posed
  np.testing.assert_allclose(x0_hat[:3], x0[:3], atol=2e-3)
  np.testing.assert_allclose(eps_hat[1:], eps[1:], atol=2e-3)


def _ddpm_f64(betas, x_t, x0, t, noise):
  acp = np.cumprod(1 - betas)
  acp_prev = acp[t - 1] if t > 0 else 1.0
  mean = (
    betas[t] * math.sqrt(acp_prev) / (1 - acp[t]) * x0 + (1 - acp_prev) * math.sqrt(1 - betas[t]) / (1 - acp[t]) * x_t
  )
  var = betas[t] * (1 - acp_prev) / (1 - acp[t])
  return mean + (math.sqrt(var) * noise if t > 0 else 0.0)


@pytest.mark.parametrize("t", [0, 1, 250, 999])
def test_ddpm_step_matches_float64(t):
  betas = schedules.make_betas("cosine", T)
  sched = schedules.make_schedule("cosine", T)
  rng = np.random.default_rng(t)
  x_t, x0, noise = (rng.normal(size=(2, 4, 4, 4, 1)) for _ in range(3))
  x0 = np.clip(x0, -1, 1)
  tt = jnp.full((2,), t)
  # x0-parameterised: at t~0 an eps output would be ~1/sqrt(1-abar) times larger and float32-ill-posed.
  got = samplers.ddpm_step(
    sched,
    jnp.asarray(x0, jnp.float32),
    jnp.asarray(x_t, jnp.float32),
    tt,
    tt - 1,
    jnp.asarray(noise, jnp.float32),
    prediction_type="x0",
    clip_x0=False,
  )
  ref = _ddpm_f64(betas, x_t, x0, t, noise)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-3, atol=2e-3 if t == 999 else 2e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_float64(eta):
  betas = schedules.make_betas("linear", T)
  acp = np.cumprod(1 - betas)
  sched = schedules.make_schedule("linear", T)
  t, tp = 600, 580
  rng = np.random.default_rng(1)
  x_t, eps, noise = (rng.normal(size=(1, 4, 4, 4, 1)) for _ in range(3))
  x0 = (x_t - math.sqrt(1 - acp[t]) * eps) / math.sqrt(acp[t])
  sigma = eta * math.sqrt((1 - acp[tp]) / (1 - acp[t]) * (1 - acp[t] / acp[tp]))
  ref = math.sqrt(acp[tp]) * x0 + math.sqrt(1 - acp[tp] - sigma**2) * eps + sigma * noise
  got = samplers.ddim_step(
    sched,
    jnp.asarray(eps, jnp.float32),
    jnp.asarray(x_t, jnp.float32),
    jnp.array([t]),
    jnp.array([tp]),
    jnp.asarray(noise, jnp.float32),
    eta=eta,
    clip_x0=False,
  )
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)


def test_timestep_spacings():
  np.testing.assert_array_equal(samplers.make_timesteps(1000, 4, "leading"), [750, 500, 250, 0])
  np.testing.assert_array_equal(samplers.make_timesteps(1000, 4, "trailing"), [999, 749, 499, 249])
  np.testing.assert_array_equal(samplers.make_timesteps(1000, 3, "linspace"), [999, 500, 0])
  np.testing.assert_array_equal(samplers.previous_timesteps(np.array([750, 500, 250, 0])), [500, 250, 0, -1])
  with pytest.raises(ValueError, match="num_steps"):
    samplers.make_timesteps(1000, 0)


def test_timestep_for_noise_level_inverts_image_scale_std():
  sched = schedules.make_schedule("cosine", T)
  t = int(schedules.timestep_for_noise_level(sched, 0.15))
  acp = float(sched.alphas_cumprod[t])
  assert math.sqrt(1 - acp) / math.sqrt(acp) == pytest.approx(0.15, rel=0.05)


def test_min_snr_weights_closed_form():
  from meddiff_jax.diffusion import losses

  sched = schedules.make_schedule("cosine", T)
  t = jnp.array([10, 900])
  snr = np.asarray(sched.alphas_cumprod)[[10, 900]]
  snr = snr / (1 - snr)
  w = np.asarray(losses.min_snr_weight(sched, t, "epsilon", 5.0))
  np.testing.assert_allclose(w, np.minimum(snr, 5.0) / snr, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# diffusers parity (torch extra)


def test_matches_diffusers_ddpm_and_ddim():
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  x_t = rng.normal(size=(1, 1, 4, 4, 4)).astype(np.float32)
  eps = rng.normal(size=x_t.shape).astype(np.float32)
  noise = rng.normal(size=x_t.shape).astype(np.float32)
  jx = lambda a: jnp.asarray(np.moveaxis(a, 1, -1))

  ddpm = diffusers.DDPMScheduler(
    num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=False, variance_type="fixed_small"
  )
  sched = schedules.make_schedule("cosine", T)
  np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), ddpm.alphas_cumprod.numpy(), rtol=5e-5)
  ddpm.set_timesteps(T)
  t = 400
  # diffusers draws the step noise as torch.randn(shape, generator=g): replay it for our step
  noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7)).numpy()
  ref = ddpm.step(
    torch.tensor(eps), t, torch.tensor(x_t), generator=torch.Generator().manual_seed(7)
  ).prev_sample.numpy()
  got = samplers.ddpm_step(sched, jx(eps), jx(x_t), jnp.array([t]), jnp.array([t - 1]), jx(noise), clip_x0=False)
  np.testing.assert_allclose(np.asarray(got), np.moveaxis(ref, 1, -1), rtol=1e-4, atol=1e-5)

  ddim = diffusers.DDIMScheduler(
    num_train_timesteps=T, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing"
  )
  ddim.set_timesteps(50)
  ours = samplers.make_timesteps(T, 50, "trailing")
  np.testing.assert_array_equal(ddim.timesteps.numpy(), ours)
  sched = schedules.make_schedule("linear", T)
  prev = samplers.previous_timesteps(ours)
  for i in (0, 25, 49):
    t = int(ours[i])
    ref = ddim.step(torch.tensor(eps), t, torch.tensor(x_t), eta=0.0).prev_sample.numpy()
    got = samplers.ddim_step(sched, jx(eps), jx(x_t), jnp.array([t]), jnp.array([prev[i]]), jx(noise), clip_x0=False)
    np.testing.assert_allclose(np.asarray(got), np.moveaxis(ref, 1, -1), rtol=1e-4, atol=1e-4)
