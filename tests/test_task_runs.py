"""Each task's run(spec) end to end with an exact model in place of the checkpoint (fast tier: no UNet).

The stand-in (conftest.exact_pretrained / exact_controlled) returns the exact model output of the test data in the
checkpoint's parameterisation, so a whole task (files, region window, working grid, label map, windows, sampler,
back onto the input's grid) can be compared with a float64 reference of its algorithm computed from the input, and
an eps, a v and an x0 checkpoint must give the same result. What each reference uses (the noise level in HU, the
region's window, the training spacing, the label map, the branch run's spacing, the mask) is what the task's
wiring must pass on.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
  abar64,
  ddim64,
  diffpir64,
  exact_controlled,
  exact_pretrained,
  forward_matched_start64,
  gaussian_oracle,
  gaussian_posterior_mean64,
  point_mass_prediction,
)
from scipy import ndimage

from meddiff_jax import pretrained
from meddiff_jax.configs import anomaly as anomaly_config
from meddiff_jax.configs import denoise as denoise_config
from meddiff_jax.configs import lesion as lesion_config
from meddiff_jax.configs import super_resolution as sr_config
from meddiff_jax.configs import synthesis as synthesis_config
from meddiff_jax.data import geometry, nifti, preprocess, volume_io, volumes
from meddiff_jax.diffusion import samplers, schedules
from meddiff_jax.evaluation import metrics
from meddiff_jax.tasks import anomaly, common, controlled, denoise, sliding_window, synthesis

SCHED = schedules.make_schedule("cosine", 1000)
MU, S = 0.1, 0.3
LIVER = 5  # TotalSegmentator id; in the 'liver' structure group
PREDICTIONS = ("epsilon", "v", "x0")


def gaussian_volume(shape, seed=0, sigma=0.0):
  """(x0, y = x0 + sigma n) with x0 ~ N(MU, S^2), float64, on the [-1, 1] scale."""
  rng = np.random.default_rng(seed)
  x0 = MU + S * rng.normal(size=shape)
  return x0, x0 + sigma * rng.normal(size=shape)


def save_ct(path, unit, region, spacing):
  """A float32 NIfTI in HU whose `region` window maps back to `unit` (RAS, the given spacing)."""
  nifti.save(volumes.Volume(preprocess.unit_to_hu(unit, region), np.diag([*spacing, 1.0])), path, np.float32)
  return str(path)


def task_spec(module, spec_cls, **keys):
  cfg = module.get_config()
  # (region given: a synthetic volume has no anatomy to estimate it from)
  cfg.update(**{**dict(overlap=0.5, window_batch=8, seed=0, num_steps=10, region="abdomen"), **keys})
  return spec_cls.from_config(cfg)


def use(monkeypatch, model):
  """Load `model` wherever a task loads its checkpoint (and read its data layout, which the scan's region and
  spacing are decided with before the model loads)."""
  monkeypatch.setattr(pretrained, "load", lambda *a, **k: model)
  monkeypatch.setattr(pretrained, "load_controlled", lambda *a, **k: model)
  monkeypatch.setattr(common, "data_spec", lambda *a, **k: model.data)


def mean_map_oracle(mean_of_cond, prediction_type):
  """The exact model for x0 ~ N(mean, S^2) per voxel with the mean a function of the window's conditions."""
  return lambda x, t, cond: gaussian_oracle(SCHED, mean_of_cond(cond), S, prediction_type)(x, t)


def organ_mean(cond):
  """MU outside the organs, MU + 0.3 where a structure group (not the body) is set: the tasks hold the structures
  packed (conditions.pack_structures: group id << 1 | body), the model expands them per window."""
  s = cond["structures"]
  assert s.shape[-1] == 1, s.shape
  return MU + 0.3 * ((s >> 1) > 0)


def region_mean(cond):
  return MU + 0.2 * (cond["region"][:, None, None, None, None] - 1.0)  # head_neck -0.1, chest 0.1, abdomen 0.3


# ---------------------------------------------------------------------------------------------------------- denoise


def denoise_reference(unit_y, sigma_n, method, steps, mu=MU):
  model = lambda x, t: gaussian_posterior_mean64(x, t, mu, S)
  if method == "diffpir":
    return diffpir64((unit_y + 1) / 2, sigma_n / 2, steps, 10.0, model)[0]
  t0 = int(schedules.timestep_for_noise_level(SCHED, jnp.float32(sigma_n)))
  return ddim64(forward_matched_start64(unit_y, sigma_n, t0, 0.0), samplers.partial_timesteps(t0, steps), model)


def matched_sigma_hu(region, t=87):
  """A noise level in HU whose [-1, 1] std is t's model-scale std (a hair above: the start adds no noise)."""
  lo, hi = preprocess.window_bounds(region)
  return float(np.sqrt((1 - abar64(t)) / abar64(t)) * 1.0001 * (hi - lo) / 2)


def inside(*units):
  return np.all([np.abs(u) < 0.97 for u in units], axis=0)  # away from the window edges (the HU epilogue)


@pytest.mark.parametrize("method", denoise.METHODS)
def test_denoise_run_is_its_reference_for_every_parameterisation(tmp_path, monkeypatch, method):
  region = "abdomen"
  sigma_hu = matched_sigma_hu(region)
  lo, hi = preprocess.window_bounds(region)
  _, y = gaussian_volume((8, 8, 8), sigma=sigma_hu * 2 / (hi - lo))
  path = save_ct(tmp_path / "ct.nii.gz", y, region, (6.0, 6.0, 6.0))
  unit_y = preprocess.hu_to_unit(volume_io.load(path).data, region).astype(np.float64)
  ref = denoise_reference(unit_y, sigma_hu * 2 / (hi - lo), method, 10)
  outs = []
  for p in PREDICTIONS:
    use(monkeypatch, exact_pretrained(lambda x, t, c, p=p: gaussian_oracle(SCHED, MU, S, p)(x, t), prediction_type=p))
    spec = task_spec(
      denoise_config,
      denoise.DenoiseSpec,
      checkpoint="exact",
      input=path,
      output=str(tmp_path / f"{p}.nii.gz"),
      method=method,
      noise_sigma_hu=sigma_hu,
      sampler="ddim",
      output_int16=False,
    )
    denoise.run(spec)
    outs.append(preprocess.hu_to_unit(volume_io.load(tmp_path / f"{p}.nii.gz").data, region))
  ok = inside(unit_y, ref)
  assert ok.mean() > 0.9
  for out in outs:
    np.testing.assert_allclose(out[ok], ref[ok], atol=3e-4)


@pytest.mark.parametrize("spacing", ["checkpoint", "input"])
def test_denoise_run_wires_sigma_region_spacing_and_labels(tmp_path, monkeypatch, spacing):
  """A chest CT at 6 mm, the model at 12 mm with structure channels and a mean that depends on them, a label map
  with a liver: the result is the reference computed with the chest window, the noise level given in HU and the
  liver's mean, on the 12 mm grid and resampled back to 6 mm (spacing=checkpoint) or on the scan's own 6 mm grid
  (spacing=input, the default)."""
  region = "chest"
  sigma_hu = matched_sigma_hu(region)
  lo, hi = preprocess.window_bounds(region)
  _, y = gaussian_volume((16, 16, 16), sigma=sigma_hu * 2 / (hi - lo), seed=1)
  path = save_ct(tmp_path / "ct.nii.gz", y, region, (6.0, 6.0, 6.0))
  labels = np.zeros((16, 16, 16), np.int16)
  labels[4:12, 4:12, 2:10] = LIVER
  nifti.save(volumes.Volume(labels, np.diag([6.0, 6.0, 6.0, 1.0])), tmp_path / "seg.nii.gz", np.int16)
  model = exact_pretrained(
    mean_map_oracle(organ_mean, "v"), prediction_type="v", spacing=(12.0, 12.0, 12.0), structures=True
  )
  use(monkeypatch, model)
  keys = {} if spacing == "input" else {"spacing": spacing}
  spec = task_spec(
    denoise_config,
    denoise.DenoiseSpec,
    checkpoint="exact",
    input=path,
    output=str(tmp_path / "out.nii.gz"),
    labels=str(tmp_path / "seg.nii.gz"),
    region=region,
    method="diffpir",
    noise_sigma_hu=sigma_hu,
    output_int16=False,
    **keys,
  )
  denoise.run(spec)
  original = volume_io.load(path)
  work = volumes.resample(original, (12.0, 12.0, 12.0), order=1) if spacing == "checkpoint" else original
  liver = volumes.resample_like(volume_io.load(tmp_path / "seg.nii.gz", is_mask=True), work.shape, work.affine, order=0)
  unit_y = preprocess.hu_to_unit(work.data, region).astype(np.float64)
  ref = denoise_reference(unit_y, sigma_hu * 2 / (hi - lo), "diffpir", 10, mu=MU + 0.3 * (liver.data == LIVER))
  ref_hu = common.back_to_input_grid(preprocess.unit_to_hu(ref, region), work, original)
  out = volume_io.load(tmp_path / "out.nii.gz")
  assert out.shape == original.shape
  ok = inside(preprocess.hu_to_unit(ref_hu, region), preprocess.hu_to_unit(original.data, region))
  assert ok.mean() > 0.5
  np.testing.assert_allclose(out.data[ok], ref_hu[ok], atol=0.1)  # HU, chest window 1800 wide


# ---------------------------------------------------------------------------------------------------------- anomaly


def anomaly_run(tmp_path, monkeypatch, prediction_type, path, **keys):
  starts = []
  oracle = gaussian_oracle(SCHED, MU, S, prediction_type)

  def apply(x, t, cond):
    jax.debug.callback(lambda x, t: starts.append((int(t[0]), np.asarray(x[0, ..., 0]))), x, t)
    return oracle(x, t)

  use(monkeypatch, exact_pretrained(apply, prediction_type=prediction_type))
  out = str(tmp_path / f"map_{prediction_type}.nii.gz")
  spec = task_spec(
    anomaly_config, anomaly.AnomalySpec, checkpoint="exact", input=path, output=out, sampler="ddim", **keys
  )
  result = anomaly.run(spec)
  jax.effects_barrier()
  return result, volume_io.load(out).data, starts


def test_anomaly_run_is_ddim_from_noise_t_and_scores_its_map(tmp_path, monkeypatch):
  """The volume is one window (8^3 at the model's 6 mm): the first model call sees x at exactly noise_t, the map
  is |x - DDIM(x_noise_t)| smoothed inside the body, the scores are the map's; eps, v and x0 agree."""
  region = "abdomen"
  x0, _ = gaussian_volume((8, 8, 8), seed=2)
  path = save_ct(tmp_path / "ct.nii.gz", x0, region, (6.0, 6.0, 6.0))
  unit = preprocess.hu_to_unit(volume_io.load(path).data, region)
  result, amap, calls = anomaly_run(tmp_path, monkeypatch, "epsilon", path, overlap=0.0, noise_t=900)
  times = [t for t, _ in calls]
  assert times == list(samplers.partial_timesteps(900, 10))
  recon = ddim64(calls[0][1], samplers.partial_timesteps(900, 10), lambda x, t: gaussian_posterior_mean64(x, t, MU, S))
  body = preprocess.body_mask(volume_io.load(path).data)
  ref = anomaly.anomaly_map(unit, recon, body, 1.0)
  np.testing.assert_allclose(amap, ref, atol=2e-4)
  assert result["volume_score"] == pytest.approx(anomaly.volume_score(ref, body, 0.01), abs=2e-4)
  sidecar = json.loads((tmp_path / "map_epsilon.json").read_text())
  assert sidecar["volume_score"] == pytest.approx(result["volume_score"]) and sidecar["noise_t"] == 900
  for p in ("v", "x0"):
    np.testing.assert_allclose(
      anomaly_run(tmp_path, monkeypatch, p, path, overlap=0.0, noise_t=900)[1], amap, atol=2e-5
    )


# ---------------------------------------------------------------------------------------------------------- synthesis


def synthesis_run(tmp_path, monkeypatch, prediction_type, mean_of_cond, structures=False, **keys):
  use(
    monkeypatch,
    exact_pretrained(
      mean_map_oracle(mean_of_cond, prediction_type), prediction_type=prediction_type, structures=structures
    ),
  )
  out = str(tmp_path / f"syn_{prediction_type}.nii.gz")
  synthesis.run(task_spec(synthesis_config, synthesis.SynthesisSpec, checkpoint="exact", output=out, **keys))
  return volume_io.load(out)


def test_synthesis_run_samples_the_prior_of_its_region_for_every_parameterisation(tmp_path, monkeypatch):
  """Gaussian data whose mean depends on the region: the synthetic volume has the region's mean and the prior's
  std (the probability-flow ODE from x_T ~ N(0, I) with the exact model keeps the marginal: DPM-Solver++, the
  default sampler); eps, v and x0 give the same volume."""
  units = []
  for p in PREDICTIONS:
    vol = synthesis_run(tmp_path, monkeypatch, p, region_mean, region="chest", shape=(16, 16, 16), num_steps=25)
    units.append(preprocess.hu_to_unit(vol.data, "chest"))
  assert np.mean(units[0]) == pytest.approx(MU, abs=0.03) and np.std(units[0]) == pytest.approx(S, rel=0.08)
  for u in units[1:]:
    np.testing.assert_allclose(u, units[0], atol=2 * 1800 / 2 / 32767 + 2 / 1800)  # int16 HU: 1 HU apart at most


def test_synthesis_run_conditions_on_the_label_map(tmp_path, monkeypatch):
  """A label map with a liver block: the synthetic liver has the liver's mean, the rest the body's."""
  labels = np.zeros((16, 16, 16), np.int16)
  labels[2:14, 2:14, 2:14] = 1  # spleen: a body around the organ of interest
  labels[4:12, 4:12, 4:12] = LIVER
  nifti.save(volumes.Volume(labels, np.diag([6.0, 6.0, 6.0, 1.0])), tmp_path / "seg.nii.gz", np.int16)
  liver_mean = lambda cond: MU + 0.3 * ((cond["structures"] >> 1) == 4)  # packed: channel 3 ('liver') is group id 4
  vol = synthesis_run(
    tmp_path, monkeypatch, "epsilon", liver_mean, structures=True, labels=str(tmp_path / "seg.nii.gz"), num_steps=20
  )
  unit = preprocess.hu_to_unit(vol.data, "abdomen")
  assert vol.shape == labels.shape
  assert np.mean(unit[labels == LIVER]) == pytest.approx(MU + 0.3, abs=0.06)
  assert np.mean(unit[labels != LIVER]) == pytest.approx(MU, abs=0.03)


# ---------------------------------------------------------------------------------------------------------- ControlNet


def test_super_resolution_runs_at_the_branch_runs_spacing_for_every_parameterisation(tmp_path, monkeypatch):
  """A model that reproduces its hint exactly (point mass at the trilinear upsampled LR): the output is that
  upsampled volume on the grid the branch was trained at (3 mm here; its base says 6 mm)."""
  rng = np.random.default_rng(3)
  lr = volumes.Volume(preprocess.unit_to_hu(rng.uniform(-0.8, 0.8, (8, 8, 4)), "chest"), np.diag([3.0, 3.0, 9.0, 1.0]))
  nifti.save(lr, tmp_path / "lr.nii.gz", np.float32)
  up = preprocess.hu_to_unit(volumes.resample(lr, (3.0, 3.0, 3.0), order=1).data, "chest")
  outs = []
  for p in PREDICTIONS:
    apply = lambda x, t, cond, p=p: point_mass_prediction(SCHED, x, t, cond["hint"], p)
    use(monkeypatch, exact_controlled(apply, branch_spacing=(3.0, 3.0, 3.0), prediction_type=p))
    out = str(tmp_path / f"sr_{p}.nii.gz")
    spec = task_spec(
      sr_config,
      controlled.SuperResolutionSpec,
      controlnet="exact",
      input=str(tmp_path / "lr.nii.gz"),
      output=out,
      sampler="ddim",
      region="chest",  # the LR's HU lie inside the chest window: the output is the network's everywhere
    )
    result = controlled.run_super_resolution(spec)
    vol = volume_io.load(out)
    assert result["spacing"] == pytest.approx([3.0, 3.0, 3.0]) and vol.shape == up.shape
    outs.append(preprocess.hu_to_unit(vol.data, "chest"))
  for out in outs:
    np.testing.assert_allclose(out, up, atol=2 / 1800 + 1e-4)  # int16 HU


def lesion_problem(tmp_path, spacing=(6.0, 6.0, 6.0)):
  x0, _ = gaussian_volume((8, 8, 8), seed=4)
  path = save_ct(tmp_path / "ct.nii.gz", x0, "abdomen", spacing)
  mask = np.zeros((8, 8, 8), np.uint8)
  mask[3:5, 3:6, 2:5] = 1
  nifti.save(volumes.Volume(mask, np.diag([*spacing, 1.0])), tmp_path / "mask.nii.gz", np.uint8)
  return path, str(tmp_path / "mask.nii.gz"), mask > 0


def lesion_run(tmp_path, monkeypatch, prediction_type, method, model_spacing=(6.0, 6.0, 6.0), **keys):
  """The lesion task with a model whose data is the scan plus 0.5 inside the lesion hint (a point mass); the base
  checkpoint says 6 mm, the branch run `model_spacing`."""
  hints = []
  path, mask_path, lesion = lesion_problem(tmp_path)
  work = volumes.resample(volume_io.load(path), model_spacing, order=1)
  scan = sliding_window.pad_to_window(preprocess.hu_to_unit(work.data, "abdomen"), 8, -1.0)[0]

  def apply(x, t, cond):
    jax.debug.callback(lambda h: hints.append(np.asarray(h[0, ..., 0])), cond["hint"])
    target = jnp.asarray(scan)[None, ..., None] + 0.25 * (cond["hint"] + 1.0)
    return point_mass_prediction(SCHED, x, t, jnp.clip(target, -1.0, 1.0), prediction_type)

  use(monkeypatch, exact_controlled(apply, branch_spacing=model_spacing, prediction_type=prediction_type))
  out = str(tmp_path / f"lesion_{method}_{prediction_type}.nii.gz")
  spec = task_spec(
    lesion_config,
    controlled.LesionSpec,
    controlnet="exact",
    input=path,
    mask=mask_path,
    output=out,
    method=method,
    **keys,
  )
  result = controlled.run_lesion(spec)
  jax.effects_barrier()
  return result, volume_io.load(out).data, volume_io.load(path).data, lesion, hints


@pytest.mark.parametrize("method", controlled.LESION_METHODS)
def test_lesion_run_puts_the_lesion_inside_the_mask_for_every_parameterisation(tmp_path, monkeypatch, method):
  """The exact model of 'the scan, 0.5 brighter inside the hint': inpainting returns the scan as read outside the
  regenerated region and the brighter lesion inside the mask, generation the same everywhere (within int16)."""
  outs = []
  for p in PREDICTIONS:
    _, out, ct, lesion, _ = lesion_run(tmp_path, monkeypatch, p, method, sampler="ddim", num_steps=10)
    outs.append(out)
  expected = preprocess.unit_to_hu(np.clip(preprocess.hu_to_unit(ct, "abdomen") + 0.5 * lesion, -1, 1), "abdomen")
  for out in outs:
    np.testing.assert_allclose(out, np.round(expected), atol=1.0)
  if method == "inpaint":
    np.testing.assert_array_equal(outs[0][~lesion], np.round(ct[~lesion]))  # the scan itself, as read


def test_lesion_runs_at_the_branch_runs_spacing(tmp_path, monkeypatch):
  """The branch trained at 12 mm, the scan at 6 mm: the model sees the mask on the 12 mm grid (nearest), and the
  result comes back onto the 6 mm grid with the scan kept outside the regenerated region."""
  result, out, ct, lesion, hints = lesion_run(
    tmp_path, monkeypatch, "epsilon", "inpaint", model_spacing=(12.0, 12.0, 12.0), num_steps=5, jump_timesteps=200
  )
  original = volume_io.load(tmp_path / "ct.nii.gz")
  work = volumes.resample(original, (12.0, 12.0, 12.0), order=1)
  mask_work = volumes.resample_like(
    volume_io.load(tmp_path / "mask.nii.gz", is_mask=True), work.shape, work.affine, order=0
  )
  assert hints and hints[0].shape == (8, 8, 8)  # the 4^3 working grid padded to the patch
  # RePaint's walk, not a plain reverse pass: 5 steps, jumps of 200 timesteps = 1 grid step at the points 0..3
  # (range(0, N - L, L)), each passed r = 10 times: N + (r - 1) * L * 4 model calls (one window)
  assert len(hints) == 5 + (10 - 1) * 1 * 4
  seen = hints[0] > 0
  assert seen.sum() == (mask_work.data > 0).sum() > 0
  assert out.shape == ct.shape
  hole_work = ndimage.binary_dilation(mask_work.data > 0).astype(np.float32)
  hole = common.back_to_input_grid(hole_work, work, original, order=0) > 0.5
  np.testing.assert_array_equal(out[~(hole | lesion)], np.round(ct[~(hole | lesion)]))
  assert result["psnr_inside_mask"] < result["psnr_outside_mask"]
  # the scores are those of the written volume against the scan (scored slab by slab as it is written)
  unit = lambda v: preprocess.hu_to_unit(v, "abdomen")
  assert result["psnr_inside_mask"] == pytest.approx(metrics.psnr(unit(ct)[lesion], unit(out)[lesion], 2.0))
  assert result["psnr_outside_mask"] == pytest.approx(metrics.psnr(unit(ct)[~lesion], unit(out)[~lesion], 2.0))
  assert result["dice_threshold_segmentation"] == controlled.lesion_dice(out.astype(np.float32), ct, lesion, 20.0)


@pytest.mark.parametrize("case", ["coarser", "much-coarser", "flipped-shifted", "at-the-edge", "same-grid"])
def test_the_box_a_moved_hole_can_reach_holds_all_of_it(case):
  """controlled.grid_box: every voxel a nearest resampling of the selected voxels sets on the scan's grid (the whole
  volume resampled, geometry.resample_to) lies inside the box, and the box is not much larger than their own."""
  scan = volumes.Volume(np.zeros((40, 36, 30), np.int16), np.diag([1.5, 1.5, 2.0, 1.0]))
  affine = np.diag([3.0, 3.0, 4.0, 1.0])
  if case == "flipped-shifted":
    affine = np.array([[-3.0, 0, 0, 58.5], [0, 3.0, 0, 0.7], [0, 0, 4.0, -1.1], [0, 0, 0, 1]])
  elif case == "same-grid":
    affine = scan.affine
  elif case == "much-coarser":  # a work voxel reaches 2.5 scan voxels either side of its centre, and past the edge
    affine = np.diag([7.5, 7.5, 10.0, 1.0])
  shape = {"same-grid": (40, 36, 30), "much-coarser": (8, 8, 6)}.get(case, (20, 18, 15))
  selected = np.zeros(shape, bool)
  if case == "at-the-edge":
    selected[0:2, 17:, 5:7] = True
  elif case == "much-coarser":
    selected[3:5, 7:, 2:3] = True
  else:
    selected[6:9, 4:6, 7:10] = True
  moved = geometry.resample_to(selected.astype(np.float32), affine, scan.shape, scan.affine, order=0) > 0.5
  box = controlled.grid_box(selected, affine, scan)
  reached = controlled.bounding_box(moved)
  assert reached is not None and box is not None
  ratio = max(geometry.spacing_of(affine)[k] / scan.spacing[k] for k in range(3))  # scan voxels per grid voxel
  for r, b in zip(reached, box):
    assert b.start <= r.start and r.stop <= b.stop  # holds it all
    assert r.start - b.start <= 1.5 * ratio + 3 and b.stop - r.stop <= 1.5 * ratio + 3  # and not much more
  assert controlled.grid_box(np.zeros(shape, bool), affine, scan) is None


@pytest.mark.parametrize("corner", [False, True], ids=["inside", "at-the-border"])
def test_change_scores_by_block_equal_the_whole_volume_scores(corner):
  """ChangeScores fed slab by slab (as onto_scan writes) equals metrics.psnr and lesion_dice on the whole volumes,
  with the mask's dilation box inside the volume or clipped by its border."""
  rng = np.random.default_rng(0)
  before = rng.normal(0, 80, (20, 18, 16)).astype(np.float32)
  after = np.round(before + rng.normal(0, 15, before.shape) * (rng.random(before.shape) < 0.3)).astype(np.float32)
  lesion = np.zeros(before.shape, bool)
  lesion[(slice(0, 4) if corner else slice(7, 11)), 5:9, (slice(12, 16) if corner else slice(3, 6))] = True
  after[lesion] += 60.0
  scores = controlled.ChangeScores(lesion, preprocess.region_id("abdomen"), 20.0)
  for start in range(0, 18, 5):  # slabs along axis 1
    index = (slice(0, 20), slice(start, min(18, start + 5)), slice(0, 16))
    scores.add(index, before[index], after[index])
  unit = lambda v: preprocess.hu_to_unit(v, "abdomen")
  got = scores.result()
  assert got["psnr_inside_mask"] == pytest.approx(metrics.psnr(unit(before)[lesion], unit(after)[lesion], 2.0))
  assert got["psnr_outside_mask"] == pytest.approx(metrics.psnr(unit(before)[~lesion], unit(after)[~lesion], 2.0))
  want = controlled.lesion_dice(after, before, lesion, 20.0)
  assert 0.0 < want < 1.0 and got["dice_threshold_segmentation"] == want


# ------------------------------------------------------------------------------------------------ grids, limits


def distinct_windows(model_fn):
  """(apply recording the distinct window position boxes it is called on, the set they go into)."""
  boxes = set()

  def apply(x, t, cond):
    jax.debug.callback(lambda b: boxes.update(tuple(np.round(np.asarray(v), 4).ravel()) for v in b), cond["pos_box"])
    return model_fn(x, t, cond)

  return apply, boxes


def test_anomaly_and_synthesis_run_on_the_training_grid(tmp_path, monkeypatch):
  """A 16^3 scan / label map at 6 mm and a model trained at 12 mm: both tasks sample on the 8^3 working grid (one
  window of the patch) and write their result on the input's 16^3 grid."""
  path = save_ct(tmp_path / "ct.nii.gz", gaussian_volume((16, 16, 16), seed=5)[0], "abdomen", (6.0, 6.0, 6.0))
  nifti.save(volumes.Volume(np.ones((16, 16, 16), np.int16), np.diag([6.0, 6.0, 6.0, 1.0])), tmp_path / "seg.nii.gz")
  for run in ("anomaly", "synthesis"):
    apply, boxes = distinct_windows(lambda x, t, c: gaussian_oracle(SCHED, MU, S)(x, t))
    use(monkeypatch, exact_pretrained(apply, spacing=(12.0, 12.0, 12.0)))
    out = str(tmp_path / f"{run}.nii.gz")
    if run == "anomaly":
      anomaly.run(
        task_spec(anomaly_config, anomaly.AnomalySpec, checkpoint="exact", input=path, output=out, num_steps=3)
      )
    else:
      spec = task_spec(
        synthesis_config, synthesis.SynthesisSpec, checkpoint="exact", labels=str(tmp_path / "seg.nii.gz"), output=out
      )
      synthesis.run(spec)
    jax.effects_barrier()
    assert len(boxes) == 1 and volume_io.load(out).shape == (16, 16, 16), (run, len(boxes))


def test_timesteps_past_the_schedule_are_refused_before_anything_runs(tmp_path):
  from meddiff_jax import checks

  path = save_ct(tmp_path / "ct.nii.gz", gaussian_volume((8, 8, 8))[0], "abdomen", (6.0, 6.0, 6.0))
  config = anomaly_config.get_config()
  config.update(input=path, output=str(tmp_path / "o.nii.gz"), noise_t=1000)  # tiny_phantom: T = 1000
  with pytest.raises(checks.ConfigError, match="--config.noise_t=1000; 'tiny_phantom' has 1000 timesteps"):
    checks.task(config)


def test_a_cpu_devices_free_memory_is_its_share_of_the_hosts(monkeypatch):
  """The tests' 8 fake CPU devices share the host's memory: each is offered an eighth of it, not all of it."""
  assert jax.local_device_count() == 8 and jax.local_devices()[0].platform == "cpu"
  monkeypatch.setattr(common.workers, "available_memory", lambda: 8 << 30)
  assert common.device_free_bytes() == 1 << 30


def test_a_sampler_that_needs_more_memory_than_the_device_has_is_refused_before_it_runs(tmp_path, monkeypatch):
  """XLA's memory analysis of the compiled sampler (outputs + temporaries) against the device's free memory: with
  one byte less than that free, refused in one line naming the coarser grid, before any model call, nothing
  written; with exactly that free, it runs."""
  path = save_ct(tmp_path / "ct.nii.gz", gaussian_volume((8, 8, 8))[0], "abdomen", (6.0, 6.0, 6.0))
  calls, needs = [], []
  oracle = gaussian_oracle(SCHED, MU, S, "epsilon")

  def model(x, t, c):  # counts the calls that run (not the trace)
    jax.debug.callback(lambda: calls.append(1))
    return oracle(x, t)

  check_fits = common.check_fits

  def recording_check_fits(compiled, what, task):
    stats = compiled.memory_analysis()
    needs.append((int(stats.output_size_in_bytes), int(stats.temp_size_in_bytes)))
    return check_fits(compiled, what, task)

  use(monkeypatch, exact_pretrained(model))
  monkeypatch.setattr(common, "check_fits", recording_check_fits)
  spec = lambda name: task_spec(
    denoise_config,
    denoise.DenoiseSpec,
    checkpoint="exact",
    input=path,
    output=str(tmp_path / name),
    noise_sigma_hu=matched_sigma_hu("abdomen"),
  )
  monkeypatch.setattr(common, "device_free_bytes", lambda: 1 << 40)
  denoise.run(spec("first.nii.gz"))
  (output, temp), calls[:] = needs[-1], []
  assert output > 0 and temp > 0  # the sampler's state and its working copies both count
  monkeypatch.setattr(common, "device_free_bytes", lambda: output + temp - 1)
  with pytest.raises(common.scans.Refusal, match=r"ct.nii.gz: the denoise sampling on the .* working grid needs .* GB"):
    denoise.run(spec("o.nii.gz"))
  assert not calls and not (tmp_path / "o.nii.gz").exists()
  monkeypatch.setattr(common, "device_free_bytes", lambda: output + temp)
  denoise.run(spec("o.nii.gz"))
  assert calls and (tmp_path / "o.nii.gz").exists()
