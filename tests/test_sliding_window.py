"""Blended sliding windows against a plain numpy reference: separable normaliser, scatter-add accumulation,
condition windows cut once or every step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import sample_spec

from meddiff_jax.tasks import sliding_window


def reference_blend(model, vol, cond_vol, plan):
  """Loop over windows in numpy: sum w * model(window) / sum w (valid windows only)."""
  g = sliding_window.gaussian_weight(plan.window).astype(np.float64)
  acc, norm = np.zeros(vol.shape, np.float64), np.zeros(vol.shape[:3], np.float64)
  w = plan.window
  for s, ok in zip(plan.starts, plan.valid):
    if not ok:
      continue
    sl = tuple(slice(a, a + w) for a in s)
    out = np.asarray(model(vol[sl][None], cond_vol[sl][None]))[0]
    acc[sl] += g[..., None] * out
    norm[sl] += g
  return acc / norm[..., None]


def test_separable_normaliser_equals_the_sum_of_window_weights():
  plan = sliding_window.plan_windows((21, 16, 30), 8, 0.5, batch=4)
  nx, ny, nz = plan.axis_norms()
  brute = np.zeros(plan.volume_shape)
  g = sliding_window.gaussian_weight(8)
  for s, ok in zip(plan.starts, plan.valid):
    brute[s[0] : s[0] + 8, s[1] : s[1] + 8, s[2] : s[2] + 8] += ok * g
  np.testing.assert_allclose(nx[:, None, None] * ny[None, :, None] * nz[None, None, :], brute, rtol=1e-5)


@pytest.mark.parametrize("budget,accumulate", [(1 << 30, "scatter"), (0, "loop"), (1 << 30, "loop")])
def test_blend_matches_a_numpy_reference_for_a_nonlinear_model(budget, accumulate):
  """budget 0: condition windows cut every step, else once; scatter-add or slice-update accumulation."""
  shape, window = (20, 13, 17), 8
  plan = sliding_window.plan_windows(shape, window, 0.5, batch=3)  # 3 does not divide the count: padding
  rng = np.random.default_rng(0)
  vol = rng.normal(size=(*shape, 1)).astype(np.float32)
  hint = rng.normal(size=(*shape, 2)).astype(np.float32)
  # window-dependent nonlinear "model": blending is only exact if each window sees its own input and hint
  model = lambda x, h: jnp.tanh(x * h[..., :1]) + h[..., 1:] ** 2 + jnp.mean(x, axis=(1, 2, 3), keepdims=True)

  apply_fn = lambda x, t, c: model(x, c["hint"])
  fn = sliding_window.blended_denoise_fn(
    apply_fn,
    plan,
    {"region": jnp.array([0]), "hint": jnp.asarray(hint)},
    precompute_budget_bytes=budget,
    accumulate=accumulate,
  )
  out = jax.jit(fn)(jnp.asarray(vol)[None], jnp.array([3]))
  np.testing.assert_allclose(np.asarray(out[0]), reference_blend(model, vol, hint, plan), atol=2e-5)


def test_progress_bar_estimates_total_time_from_the_second_step(capsys):
  from meddiff_jax.tasks import common

  clock = iter([10.0, 12.0, 12.5, 13.0])  # step 0 at 10 s (after compile), step 1 at 12 s: 2 s/step
  bar = common.ProgressBar(11, "test", windows=50)
  bar._clock = lambda: next(clock)
  bar(0)
  assert bar.estimate() is None
  bar(1)
  per_step, rest = bar.estimate()
  assert per_step == 2.0 and rest == 2.0 * 9  # 9 steps left after step index 1
  bar(2)
  assert "40.0 windows/s" in str(bar.bar)  # 2 steps x 50 windows in 2.5 s since step 0
  bar.close()
  assert "2.00 s/step, 25.0 windows/s; estimated 0.3 min for the remaining 9 steps" in capsys.readouterr().out


def test_window_boxes_equal_the_training_boxes_for_the_same_window():
  """A window of the sliding-window plan and a training patch at the same place get the same pos_box
  (models/conditions.py), also on a size-1 axis (a one-slice volume padded to the window) and on an axis
  shorter than the window, and both equal the closed form 2 i / (S - 1) - 1 (0 when S = 1)."""
  from meddiff_jax.data import multilevel

  shape, window = (20, 1, 6), 8
  hu = np.zeros(shape, np.float32)
  padded, crop = sliding_window.pad_to_window(hu, window, -1.0)
  plan = sliding_window.plan_windows(padded.shape, window, 0.5, batch=1, frame=crop)
  frame_start = np.array([c.start for c in crop])

  def closed_form(start):  # float64, written out independently of the code under test
    box = np.zeros((3, 2))
    for a in range(3):
      for j, i in enumerate((start[a], start[a] + window - 1)):
        box[a, j] = 0.0 if shape[a] == 1 else 2.0 * i / (shape[a] - 1) - 1.0
    return box

  for start, box in zip(plan.starts, plan.boxes()):
    np.testing.assert_allclose(box, closed_form(start - frame_start), atol=1e-6)
  assert np.all(plan.boxes()[:, 1] == 0.0)  # the size-1 axis
  seen = 0
  for seed in range(40):  # training patches at random starts; the window placed at the same start
    start, _ = multilevel.choose_box(shape, window, "patch", np.random.default_rng(seed))
    sample = multilevel.make_sample(hu, None, 0, sample_spec(window), np.random.default_rng(seed), operation="patch")
    one = sliding_window.WindowPlan(
      padded.shape,
      window,
      (start + frame_start)[None].astype(np.int32),
      np.ones(1, np.float32),
      1,
      tuple(frame_start),
      shape,
    )
    np.testing.assert_array_equal(one.boxes()[0], sample["pos_box"])
    seen += any(np.array_equal(start + frame_start, s) for s in plan.starts)
  assert seen  # some training patches sit exactly on a plan window
