"""DPM-Solver++(2M): convergence order against the closed-form probability-flow ODE of Gaussian data,
parameterisation invariance, traced start / guidance without recompilation, diffusers parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import point_mass_oracle

from meddiff_jax.diffusion import samplers, schedules

MU = np.array([0.3, -0.5, 0.0, 0.8])  # per-voxel Gaussian data N(MU, S^2)
S = np.array([0.5, 0.1, 1.0, 0.3])


def f64_schedule(name="cosine"):
  return schedules.Schedule(
    **{k: jnp.asarray(v) for k, v in schedules.tables(schedules.make_betas(name, 1000)).items()}
  )


def gaussian_model(sched, prediction_type="epsilon"):
  """The exact model for x0 ~ N(MU, S^2): E[x0 | x_t] in any parameterisation."""
  mu, s = jnp.asarray(MU), jnp.asarray(S)

  def fn(x, t):
    a = jnp.sqrt(schedules.alpha_bar(sched, t, x.ndim))
    sg = jnp.sqrt(schedules.one_minus_alpha_bar(sched, t, x.ndim))
    var = a**2 * s**2 + sg**2
    eps = sg * (x - a * mu) / var
    x0 = mu + a * s**2 * (x - a * mu) / var
    return {"epsilon": eps, "x0": x0, "v": a * eps - sg * x0}[prediction_type]

  return fn


def exact_then_denoise(sched, x_T, t_hi, t_lo):
  """The ODE flow t_hi -> t_lo in closed form (the marginal's standard score is invariant), then the
  final x0 prediction at t_lo, which is what every sampler's last step (t_lo -> clean) returns."""
  acp = np.asarray(sched.alphas_cumprod, np.float64)
  ah, sh, al, sl = np.sqrt(acp[t_hi]), np.sqrt(1 - acp[t_hi]), np.sqrt(acp[t_lo]), np.sqrt(1 - acp[t_lo])
  z = (x_T - ah * MU) / np.sqrt(ah**2 * S**2 + sh**2)
  x_lo = al * MU + np.sqrt(al**2 * S**2 + sl**2) * z
  return MU + al * S**2 * (x_lo - al * MU) / (al**2 * S**2 + sl**2)


def grid(n, t_hi=900, t_lo=20):
  return np.round(np.linspace(t_hi, t_lo, n + 1)).astype(np.int32)


def errors(method, steps, prediction_type="epsilon"):
  with jax.enable_x64(True):
    sched = f64_schedule()
    x_T = np.random.default_rng(0).normal(size=(3, 4)) * 1.5
    ref = exact_then_denoise(sched, x_T, 900, 20)
    out = []
    for n in steps:
      x = samplers.sample(
        gaussian_model(sched, prediction_type),
        sched,
        grid(n),
        jax.random.key(0),
        jnp.asarray(x_T),
        method=method,
        prediction_type=prediction_type,
        clip_x0=False,
      )
      out.append(float(np.max(np.abs(np.asarray(x) - ref))))
  return np.array(out)


@pytest.mark.parametrize("method,order", [("dpmpp_2m", 2.0), ("ddim", 1.0)])
def test_error_falls_at_the_theoretical_order(method, order):
  # measured: dpmpp_2m 5.9e-2 1.4e-2 4.3e-3 1.1e-3 2.7e-4 (rates 2.04 1.75 1.98 2.02); ddim rates 0.97-0.99
  err = errors(method, [10, 20, 40, 80, 160])
  rates = np.log2(err[:-1] / err[1:])
  # observed order within 0.1 of the theory on the two finest doublings (the coarse grids are pre-asymptotic)
  assert np.all(np.abs(rates[-2:] - order) < 0.1), (method, err, rates)
  assert err[-1] < (5e-4 if order == 2 else 2e-2)


def test_dpmpp_beats_ddim_at_equal_steps():
  e_dpm, e_ddim = errors("dpmpp_2m", [10, 20]), errors("ddim", [10, 20])
  assert np.all(e_dpm * 2.5 < e_ddim), (e_dpm, e_ddim)


@pytest.mark.parametrize("prediction_type", ["x0", "v"])
def test_parameterisations_give_the_same_trajectory(prediction_type):
  np.testing.assert_allclose(errors("dpmpp_2m", [15], prediction_type), errors("dpmpp_2m", [15]), rtol=1e-6)


def test_first_order_update_is_ddim():
  """second_order=False must reduce to DDIM (eta=0) exactly: both are the exact solution for constant x0."""
  sched = schedules.make_schedule("cosine", 1000)
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 3, 1))
  out = jax.random.normal(jax.random.key(1), x.shape)
  t, tp = jnp.array([700, 700]), jnp.array([400, 400])
  ddim = samplers.ddim_step(sched, out, x, t, tp, jnp.zeros_like(x), clip_x0=False)
  dpm, _, _ = samplers.dpmpp_2m_step(
    sched, out, x, t, tp, jnp.zeros_like(x), jnp.ones((2, 1, 1, 1, 1)), False, clip_x0=False
  )
  np.testing.assert_allclose(np.asarray(dpm), np.asarray(ddim), atol=1e-5)


def test_partial_start_is_traced_and_compiles_once():
  x0 = jnp.full((1, 4, 4, 4, 1), 0.3)
  sched = schedules.make_schedule("cosine", 1000)
  oracle = point_mass_oracle(sched, x0)
  ts = samplers.make_timesteps(1000, 20, "trailing")
  traces = []

  def denoise(x, t):
    traces.append(1)
    return oracle(x, t)

  run = jax.jit(lambda r, x, t0: samplers.sample(denoise, sched, ts, r, x, t_start=t0, method="dpmpp_2m"))
  for t_start in (999, 500, 100):
    np.testing.assert_allclose(np.asarray(run(jax.random.key(0), x0 + 0.2, jnp.int32(t_start))), 0.3, atol=1e-3)
  assert len(traces) == 1 and run._cache_size() == 1
  np.testing.assert_allclose(np.asarray(run(jax.random.key(0), x0 + 0.2, jnp.int32(-5))), 0.5, atol=1e-6)


def test_partial_start_first_step_is_first_order():
  """From a partial start the history is empty: the run must equal a fresh run on the truncated grid."""
  with jax.enable_x64(True):
    sched = f64_schedule()
    model = gaussian_model(sched)
    ts = grid(20)
    y = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4)))
    k = jax.random.key(3)
    start = int(ts[5])
    part = samplers.sample(model, sched, ts, k, y, t_start=jnp.int32(start), method="dpmpp_2m", clip_x0=False)
    x_start = schedules.q_sample(sched, y, jnp.array([start]), jax.random.normal(jax.random.split(k)[1], y.shape))
    fresh = samplers.sample(model, sched, ts[5:], k, x_start, method="dpmpp_2m", clip_x0=False)
    np.testing.assert_allclose(np.asarray(part), np.asarray(fresh), rtol=1e-10)


def test_guidance_scale_is_traced():
  sched = schedules.make_schedule("cosine", 1000)

  def apply_fn(x, t, cond):
    return 0.1 * x + cond["region"].astype(x.dtype)[:, None, None, None, None] * 0.3

  ts = samplers.make_timesteps(1000, 10, "trailing")
  cond = {"region": jnp.array([1])}

  @jax.jit
  def run(s):
    return samplers.sample(
      samplers.guided_denoise_fn(apply_fn, cond, 3, s),
      sched,
      ts,
      jax.random.key(0),
      jnp.ones((1, 2, 2, 2, 1)),
      method="dpmpp_2m",
      clip_x0=False,
    )

  a, b = run(jnp.float32(1.0)), run(jnp.float32(3.0))
  assert run._cache_size() == 1 and not np.allclose(np.asarray(a), np.asarray(b))


def test_unknown_method_is_refused():
  sched = schedules.make_schedule("cosine", 1000)
  with pytest.raises(ValueError, match="dpmpp_2m"):
    samplers.sample(lambda x, t: x, sched, np.array([5, 0]), jax.random.key(0), jnp.zeros((1, 2)), method="euler")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_matches_diffusers_dpmsolver_multistep(prediction_type):
  """Whole deterministic trajectories (hence every single step) against diffusers' scheduler."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  steps = 12
  sch = diffusers.DPMSolverMultistepScheduler(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    prediction_type="v_prediction" if prediction_type == "v" else "epsilon",
    timestep_spacing="trailing",
    final_sigmas_type="zero",
    lower_order_final=True,
    thresholding=False,
  )
  # diffusers computes in float32; start where alpha_t is not tiny (at t=999 of the cosine schedule x0 =
  # (x - sigma eps) / alpha amplifies its float32 rounding ~1e4-fold), so the comparison sees the algorithm
  ts = np.round(np.linspace(850, 10, steps)).astype(np.int32)
  sch.set_timesteps(timesteps=ts.tolist())
  with jax.enable_x64(True):
    tab = schedules.tables(sch.betas.numpy().astype(np.float64))
    acp = sch.alphas_cumprod.numpy().astype(np.float64)  # diffusers' float32 cumprod: use its values exactly
    tab.update(alphas_cumprod=acp, log_alphas_cumprod=np.log(acp))
    sched = schedules.Schedule(**{k: jnp.asarray(v) for k, v in tab.items()})
    model = gaussian_model(sched, prediction_type)
    x_T = np.random.default_rng(2).normal(size=(2, 4))
    x = torch.tensor(x_T, dtype=torch.float64)
    for t in sch.timesteps:
      out = torch.tensor(np.asarray(model(jnp.asarray(x.numpy()), jnp.full((2,), int(t)))))
      x = sch.step(out, t, x).prev_sample
    ours = samplers.sample(
      model,
      sched,
      ts,
      jax.random.key(0),
      jnp.asarray(x_T),
      method="dpmpp_2m",
      prediction_type=prediction_type,
      clip_x0=False,
    )
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["synthesis", "denoise", "anomaly", "super_resolution", "lesion"])
def test_every_sampling_task_config_has_a_valid_sampler_and_budget(name):
  import importlib

  c = importlib.import_module(f"meddiff_jax.configs.{name}").get_config()
  assert c.sampler in samplers.METHODS and c.num_steps >= 1


def test_partial_diffusion_task_uses_the_configured_sampler():
  """denoise.partial_diffusion(method=...) reaches the solver: dpmpp_2m and ddim differ on a non-trivial model
  and dpmpp_2m matches a direct sample() call."""
  from meddiff_jax.tasks import denoise

  sched = schedules.make_schedule("cosine", 1000)
  model = lambda x, t: 0.5 * x
  y = jnp.full((1, 2, 2, 2, 1), 0.2)
  k = jax.random.key(0)
  got = {m: np.asarray(denoise.partial_diffusion(model, sched, y, 600, 10, k, method=m)) for m in ("ddim", "dpmpp_2m")}
  ts = samplers.partial_timesteps(600, 10)  # the grid partial diffusion spends below its start
  ref = samplers.sample(model, sched, ts, k, y, t_start=jnp.int32(ts[0]), method="dpmpp_2m")
  np.testing.assert_allclose(got["dpmpp_2m"], np.asarray(ref), rtol=1e-6)
  assert not np.allclose(got["ddim"], got["dpmpp_2m"])
