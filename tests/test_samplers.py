"""Sampling loops: oracle denoiser recovers x0, no recompilation for t_start / guidance, CFG algebra."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import point_mass_oracle

from meddiff_jax.diffusion import samplers, schedules

SCHED = schedules.make_schedule("cosine", 1000)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_oracle_denoiser_recovers_x0(method):
  x0 = jax.random.uniform(jax.random.key(0), (2, 4, 4, 4, 1), minval=-0.9, maxval=0.9)
  ts = samplers.make_timesteps(1000, 20 if method == "ddim" else 1000, "leading")
  xT = jax.random.normal(jax.random.key(1), x0.shape)
  out = jax.jit(lambda r, x: samplers.sample(point_mass_oracle(SCHED, x0), SCHED, ts, r, x, method=method))(
    jax.random.key(2), xT
  )
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-3)


def test_partial_diffusion_start_is_traced_and_does_not_recompile():
  x0 = jnp.full((1, 4, 4, 4, 1), 0.3)
  ts = samplers.make_timesteps(1000, 50, "leading")
  calls = []

  def denoise(x, t):
    calls.append(1)  # counts traces, not executions
    return point_mass_oracle(SCHED, x0)(x, t)

  run = jax.jit(lambda r, x, t0: samplers.sample(denoise, SCHED, ts, r, x, t_start=t0))
  for t_start in (950, 500, 100):
    out = run(jax.random.key(0), x0 + 0.2, jnp.int32(t_start))
    # the oracle pulls any noised input to x0; partial start still ends at x0
    np.testing.assert_allclose(np.asarray(out), 0.3, atol=1e-3)
  assert len(calls) == 1
  # t_start below every timestep: nothing happens
  out = run(jax.random.key(0), x0 + 0.2, jnp.int32(-5))
  np.testing.assert_allclose(np.asarray(out), 0.5, atol=1e-6)
  assert int(samplers.start_index(jnp.asarray(ts), jnp.int32(500))) == int(np.sum(ts > 500))


def test_classifier_free_guidance_combines_branches_and_scale_is_traced():
  def apply_fn(x, t, cond):  # "model": conditional output = region id, unconditional = 3 (null)
    return jnp.broadcast_to(cond["region"].astype(jnp.float32)[:, None, None, None, None], x.shape)

  cond = {"region": jnp.array([1, 2]), "structures": jnp.ones((2, 2, 2, 2, 1))}
  traces = []

  @jax.jit
  def guided(x, t, s):
    traces.append(1)
    return samplers.guided_denoise_fn(apply_fn, cond, 3, s)(x, t)

  x, t = jnp.zeros((2, 2, 2, 2, 1)), jnp.zeros((2,), jnp.int32)
  for s in (1.0, 2.5):
    out = guided(x, t, jnp.float32(s))
    expected = 3 + s * (np.array([1, 2]) - 3)
    np.testing.assert_allclose(np.asarray(out[:, 0, 0, 0, 0]), expected)
  assert len(traces) == 1
  null = samplers.null_condition(cond, 3)
  assert np.all(np.asarray(null["region"]) == 3) and float(null["structures"].sum()) == 0


# ------------------------------------------------------------------------------------------------
# Gaussian data: the exact model, every parameterisation, with and without x0 clipping


@pytest.mark.parametrize(
  "method,prediction_type,clip_x0,steps",
  [
    ("ddpm", "epsilon", True, 1000),
    ("ddpm", "x0", False, 1000),
    ("ddpm", "v", True, 1000),
    ("ddim", "epsilon", True, 100),
    ("ddim", "epsilon", False, 100),
    ("ddim", "v", True, 100),
  ],
)
def test_sampling_gaussian_data_with_the_exact_model_gives_the_data_distribution(
  method, prediction_type, clip_x0, steps
):
  from conftest import gaussian_oracle

  mu, s = 0.1, 0.25
  ts = samplers.make_timesteps(1000, steps, "trailing")
  xT = jax.random.normal(jax.random.key(1), (1, 24, 24, 24, 1))
  out = jax.jit(
    lambda r, x: samplers.sample(
      gaussian_oracle(SCHED, mu, s, prediction_type),
      SCHED,
      ts,
      r,
      x,
      method=method,
      prediction_type=prediction_type,
      clip_x0=clip_x0,
    )
  )(jax.random.key(2), xT)
  out = np.asarray(out)
  assert np.mean(out) == pytest.approx(mu, abs=0.01)
  assert np.std(out) == pytest.approx(s, rel=0.05)


def test_clipped_steps_match_the_float64_closed_form():
  """x0 predicted outside [-1, 1] is clipped; DDIM's direction uses the eps consistent with the clipped x0."""
  t64 = schedules.tables(schedules.make_betas("cosine", 1000))
  t, tp = 600, 400
  a, ap = t64["alphas_cumprod"][t], t64["alphas_cumprod"][tp]
  x_t = np.array([0.3, -0.2, 1.4, -1.1], np.float64).reshape(4, 1, 1, 1, 1)
  x0_out = np.array([1.7, -0.3, 2.5, -3.0], np.float64).reshape(x_t.shape)
  noise = np.array([0.5, -1.0, 0.1, 2.0], np.float64).reshape(x_t.shape)
  x0c = np.clip(x0_out, -1, 1)
  beta = 1 - a / ap
  mean = np.sqrt(ap) * beta / (1 - a) * x0c + np.sqrt(a / ap) * (1 - ap) / (1 - a) * x_t
  ref_ddpm = mean + np.sqrt(beta * (1 - ap) / (1 - a)) * noise
  eps_c = (x_t - np.sqrt(a) * x0c) / np.sqrt(1 - a)
  ref_ddim = np.sqrt(ap) * x0c + np.sqrt(1 - ap) * eps_c
  tt, ttp = jnp.full((4,), t), jnp.full((4,), tp)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  got = samplers.ddpm_step(SCHED, f32(x0_out), f32(x_t), tt, ttp, f32(noise), prediction_type="x0", clip_x0=True)
  np.testing.assert_allclose(np.asarray(got), ref_ddpm, atol=2e-5)
  eps_out = (x_t - np.sqrt(a) * x0_out) / np.sqrt(1 - a)  # the same x0 as an eps prediction
  got = samplers.ddim_step(SCHED, f32(eps_out), f32(x_t), tt, ttp, f32(noise), prediction_type="epsilon", clip_x0=True)
  np.testing.assert_allclose(np.asarray(got), ref_ddim, atol=2e-5)


def test_clipped_steps_match_diffusers():
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  x_t = (2.0 * rng.normal(size=(1, 1, 4, 4, 4))).astype(np.float32)  # large: x0 estimates leave [-1, 1]
  eps = rng.normal(size=x_t.shape).astype(np.float32)
  jx = lambda a: jnp.asarray(np.moveaxis(a, 1, -1))
  ddpm = diffusers.DDPMScheduler(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    clip_sample=True,
    clip_sample_range=1.0,
    variance_type="fixed_small",
  )
  ddpm.set_timesteps(1000)
  t = 300
  noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3)).numpy()
  ref = ddpm.step(
    torch.tensor(eps), t, torch.tensor(x_t), generator=torch.Generator().manual_seed(3)
  ).prev_sample.numpy()
  got = samplers.ddpm_step(SCHED, jx(eps), jx(x_t), jnp.array([t]), jnp.array([t - 1]), jx(noise), clip_x0=True)
  np.testing.assert_allclose(np.asarray(got), np.moveaxis(ref, 1, -1), rtol=1e-4, atol=1e-4)
  ddim = diffusers.DDIMScheduler(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    clip_sample=True,
    clip_sample_range=1.0,
    set_alpha_to_one=True,
    timestep_spacing="trailing",
  )
  ddim.set_timesteps(20)
  ours = samplers.make_timesteps(1000, 20, "trailing")
  prev = samplers.previous_timesteps(ours)
  for i in (0, 10, 19):
    ref = ddim.step(
      torch.tensor(eps), int(ours[i]), torch.tensor(x_t), eta=0.0, use_clipped_model_output=True
    ).prev_sample.numpy()  # ADM: eps from the clipped x0
    got = samplers.ddim_step(SCHED, jx(eps), jx(x_t), jnp.array([ours[i]]), jnp.array([prev[i]]), jx(eps), clip_x0=True)
    np.testing.assert_allclose(np.asarray(got), np.moveaxis(ref, 1, -1), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# training-side conditions dropout and loss type


def test_drop_conditions_nulls_exactly_the_dropped_samples():
  from meddiff_jax.train import step

  cond = {
    "region": jnp.array([0, 2]),
    "structures": jnp.ones((2, 2, 2, 2, 3), jnp.uint8),
    "pos_box": jnp.ones((2, 3, 2)),
  }
  out = step.drop_conditions(cond, jnp.array([True, False]), 3)
  assert list(np.asarray(out["region"])) == [3, 2]
  assert int(out["structures"][0].sum()) == 0 and int(out["structures"][1].sum()) == 2 * 2 * 2 * 3
  np.testing.assert_array_equal(np.asarray(out["pos_box"]), 1.0)  # position is never dropped


@pytest.mark.parametrize("loss_type,expected", [("l1", np.sqrt(2 / np.pi)), ("l2", 1.0)])
def test_loss_type_is_used_by_the_training_loss(loss_type, expected):
  """A model that predicts eps = 0: the L1 loss is E|eps| = sqrt(2/pi), the L2 loss E eps^2 = 1."""
  from conftest import tiny

  from meddiff_jax.train import step

  config = tiny(**{"diffusion.loss_type": loss_type, "diffusion.cond_drop_prob": 0.0})
  apply_fn = lambda variables, x, t, cond, **kw: jnp.zeros_like(x)
  loss_fn = step.make_loss_fn(apply_fn, SCHED, config.diffusion, config.model)
  batch = {"image": jnp.zeros((2, 32, 32, 32, 1)), "region": jnp.array([0, 1])}
  loss, _ = loss_fn({}, batch, jax.random.key(0))
  assert float(loss) == pytest.approx(expected, rel=0.01)
