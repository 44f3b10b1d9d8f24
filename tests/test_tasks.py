"""Sliding windows, the noise estimate, anomaly maps, and the task commands end to end with the shipped prior
(NIfTI in, NIfTI out with the input's affine). The algorithms against references: test_task_algorithms.py; each
task's run() with exact models: test_task_runs.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mesh_of, run_main

from meddiff_jax import sharding
from meddiff_jax.data import nifti, phantom, preprocess, volume_io, volumes
from meddiff_jax.diffusion import schedules
from meddiff_jax.evaluation import metrics
from meddiff_jax.models import embeddings
from meddiff_jax.tasks import anomaly, denoise, sliding_window

SCHED = schedules.make_schedule("cosine", 1000)


def test_window_starts_cover_and_overlap():
  assert sliding_window.window_starts(16, 16, 0.5) == [0]
  starts = sliding_window.window_starts(40, 16, 0.5)
  assert starts[0] == 0 and starts[-1] == 24 and all(b - a <= 8 for a, b in zip(starts, starts[1:]))
  plan = sliding_window.plan_windows((40, 16, 24), 16, 0.5, batch=4)
  assert len(plan.starts) % 4 == 0 and plan.valid.sum() == len(starts) * 1 * len(
    sliding_window.window_starts(24, 16, 0.5)
  )
  with pytest.raises(ValueError, match="smaller than the window"):
    sliding_window.plan_windows((8, 16, 16), 16)


def _blend(apply_fn, shape, mesh_sizes, window=8, batch=8):
  plan = sliding_window.plan_windows(shape, window, 0.5, batch)
  mesh = mesh_of(mesh_sizes)
  axes = ("data",) if mesh_sizes.get("data", 1) > 1 else None
  with sharding.activate(mesh, sharding.DEFAULT_RULES):
    fn = sliding_window.blended_denoise_fn(apply_fn, plan, {"region": jnp.array([0])}, axes)
    x = jax.random.normal(jax.random.key(0), (1, *shape, 1))
    return x, jax.jit(fn)(x, jnp.array([5]))


def test_blending_an_identity_model_returns_the_volume_on_any_mesh():
  for mesh_sizes in ({"data": 1}, {"data": 8}):
    x, out = _blend(lambda xw, t, c: xw, (20, 12, 16), mesh_sizes)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x), atol=1e-5)


def test_window_position_boxes_agree_with_the_whole_volume_frame():
  """A 'model' that outputs its window's voxel coordinates must blend into the global coordinate grid."""
  shape = (20, 12, 16)
  coord_model = lambda xw, t, c: embeddings.coordinate_grid(c["pos_box"], xw.shape[1:4])[..., :1]
  _, out = _blend(coord_model, shape, {"data": 8})
  expected = np.asarray(embeddings.coordinate_grid(jnp.array([[[-1.0, 1.0]] * 3]), shape))[..., :1]
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


@pytest.mark.parametrize("correlation", [0.0, 0.7, 1.0])
def test_noise_estimate_holds_for_correlated_noise(correlation):
  """Smooth anatomy + Gaussian noise of known std, white or correlated like CT noise (lag-1 correlation up
  to ~0.8): the estimate is within 10%. First differences would read the correlated case ~40% low."""
  from scipy import ndimage

  rng = np.random.default_rng(0)
  anatomy = ndimage.gaussian_filter(rng.normal(size=(48, 48, 48)), 6) * 10
  noise = rng.normal(size=anatomy.shape)
  if correlation:
    noise = ndimage.gaussian_filter(noise, correlation)
  noise *= 0.1 / noise.std()
  assert denoise.estimate_noise_sigma(anatomy + noise) == pytest.approx(0.1, rel=0.1)
  body = np.zeros(anatomy.shape, bool)
  body[8:40, 8:40, 8:40] = True
  assert denoise.estimate_noise_sigma(np.where(body, anatomy + noise, -1.0), body) == pytest.approx(0.1, rel=0.1)


def test_noise_estimate_read_in_slabs_is_the_whole_volume_estimate():
  """The slab-wise estimate equals the one-pass MAD of every second difference (float64, numpy, written out
  here); with a sample cap it keeps every k-th difference in that order, within 3% of the whole (the MAD's sampling
  error)."""
  rng = np.random.default_rng(1)
  image = rng.normal(size=(37, 29, 23)) * 0.1 + np.linspace(0, 1, 23)  # 37 rows: slabs end mid-volume
  mask = np.zeros(image.shape, bool)
  mask[3:33, 2:27, 1:22] = True

  def reference(x, inside, lag=4, every=1):
    d = []
    for axis in range(3):
      n = x.shape[axis] - 2 * lag
      t = lambda a, lo: np.take(a, np.arange(lo, lo + n), axis=axis)
      ok = t(inside, 0) & t(inside, lag) & t(inside, 2 * lag)
      d.append((t(x, 0) - 2 * t(x, lag) + t(x, 2 * lag))[ok])
    d = np.concatenate(d)[::every]
    return np.median(np.abs(d - np.median(d))) / 0.6745 / np.sqrt(6.0)

  full = reference(image, mask)
  assert denoise.estimate_noise_sigma(image, mask) == pytest.approx(full, rel=1e-12)
  assert denoise.estimate_noise_sigma(image.astype(np.float32), mask) == pytest.approx(full, rel=1e-6)
  centres = sum(image.size // n * (n - 8) for n in image.shape)  # 53,309 stencils (the mask not counted)
  every = -(-centres // 15000)  # 4
  sampled = denoise.estimate_noise_sigma(image, mask, max_samples=15000)
  assert sampled == pytest.approx(reference(image, mask, every=every), rel=1e-12)
  assert sampled != full and sampled == pytest.approx(full, rel=0.03)


def test_anomaly_map_and_score_localise_a_residual():
  image = np.zeros((16, 16, 16), np.float32)
  recon = image.copy()
  image[6:9, 6:9, 6:9] = 1.0
  body = np.ones_like(image, bool)
  amap = anomaly.anomaly_map(image, recon, body, smooth_sigma=0.5)
  assert np.unravel_index(np.argmax(amap), amap.shape) == (7, 7, 7)
  assert anomaly.volume_score(amap, body, 0.01) > anomaly.volume_score(np.zeros_like(amap), body, 0.01)


# ------------------------------------------------------------------------------------------------
# commands end to end


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory):
  d = tmp_path_factory.mktemp("ct")
  p = phantom.make_phantom((20, 18, 16), (6.0, 6.0, 6.0), "abdomen", seed=5, num_lesions=1)
  affine = p.affine.copy()
  affine[:3, 3] += [10.0, -20.0, 30.0]
  path = d / "ct.nii.gz"
  nifti.save(volumes.Volume(np.round(p.hu), affine), path, np.int16)
  return path


@pytest.fixture(scope="module")
def seg_file(ct_file):
  """The TotalSegmentator-style label map of ct_file, on its grid."""
  p = phantom.make_phantom((20, 18, 16), (6.0, 6.0, 6.0), "abdomen", seed=5, num_lesions=1)
  path = ct_file.parent / "seg.nii.gz"
  nifti.save(volumes.Volume(p.labels.astype(np.int16), volume_io.load(ct_file).affine), path, np.int16)
  return path


@pytest.mark.slow
@pytest.mark.parametrize(
  "task,extra",
  [
    ("denoise", ["--config.num_steps=3", "--config.window_batch=2", "--config.region=abdomen"]),
    ("denoise", ["--config.method=partial", "--config.num_steps=3", "--config.noise_sigma_hu=20", "LABELS"]),
    ("anomaly", ["--config.num_steps=3", "--config.noise_t=500", "LABELS", "--config.inference_dtype=bfloat16"]),
  ],
)
def test_task_commands_write_nifti_on_the_input_grid(tmp_path, ct_file, seg_file, task, extra):
  out = tmp_path / "out.nii.gz"
  extra = [f"--config.labels={seg_file}" if e == "LABELS" else e for e in extra]
  proc = run_main(f"--config=configs/{task}.py", f"--config.input={ct_file}", f"--config.output={out}", *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  src, res = volume_io.load(ct_file), volume_io.load(out)
  assert res.shape == src.shape
  np.testing.assert_allclose(res.affine, src.affine, atol=1e-4)
  assert np.all(np.isfinite(res.data))
  if task == "anomaly":  # the sidecar's slice scores are those of the written map (input grid, body of the input)
    scores = json.loads((tmp_path / "out.json").read_text())["slice_scores"]
    expected = metrics.slice_scores(res.data, preprocess.body_mask(src.data), axis=2, top_fraction=0.01)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-7)
  else:
    assert np.corrcoef(res.data.ravel(), src.data.ravel())[0, 1] > 0.5  # still the same anatomy
    inside = (src.data > -100) & (src.data < 200)
    assert np.mean(np.abs(res.data[inside] - src.data[inside])) > 1.0  # not a pass-through


@pytest.mark.slow
def test_synthesis_command_larger_than_the_patch(tmp_path):
  out = tmp_path / "syn.nii.gz"
  proc = run_main(
    "--config=configs/synthesis.py",
    f"--config.output={out}",
    "--config.shape=(24,16,20)",
    "--config.region=abdomen",
    "--config.num_steps=3",
    "--config.guidance_scale=2.0",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  vol = volume_io.load(out)
  assert vol.shape == (24, 16, 20) and np.all(np.isfinite(vol.data))


@pytest.mark.slow
def test_synthesis_from_a_label_map_on_another_grid(tmp_path, seg_file):
  """A 6 mm label map, a 3 mm model: sampling runs at 3 mm and the result comes back on the labels' grid."""
  out = tmp_path / "syn.nii.gz"
  proc = run_main(
    "--config=configs/synthesis.py", f"--config.output={out}", f"--config.labels={seg_file}", "--config.num_steps=2"
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  seg, vol = volume_io.load(seg_file), volume_io.load(out)
  assert vol.shape == seg.shape
  np.testing.assert_allclose(vol.affine, seg.affine, atol=1e-4)


@pytest.mark.slow
def test_task_commands_fail_with_one_line_errors(tmp_path, ct_file):
  proc = run_main(
    "--config=configs/denoise.py",
    "--config.checkpoint=/nope",
    f"--config.input={ct_file}",
    f"--config.output={tmp_path / 'o.nii.gz'}",
  )
  assert proc.returncode != 0 and "--config.checkpoint='/nope' does not exist" in proc.stderr
  proc = run_main(
    "--config=configs/anomaly.py",
    f"--config.input={tmp_path / 'missing.nii.gz'}",
    f"--config.output={tmp_path / 'o.nii.gz'}",
  )
  assert proc.returncode != 0 and "is not a file" in proc.stderr
