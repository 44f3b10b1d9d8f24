"""A task's scan around the model (tasks/scans.py): the scan's own HU outside the window, region and spacing decided
(never assumed), region parts stitched, the user's files safe. Unit level, on the real CT where it matters."""

import os

import numpy as np
import pytest
from conftest import chest_over_abdomen
from scipy import ndimage

from meddiff_jax.data import class_map, preprocess, regions, volume_io, volumes
from meddiff_jax.tasks import scans

ABDOMEN = preprocess.window_bounds("abdomen")


# ------------------------------------------------------------------------------------------ outside the window


def fake_model(hu: np.ndarray, region: str, shift: float = 30.0) -> np.ndarray:
  """What the network can return: values inside the region's window only (it saturates at the edges), here the
  input moved by `shift` HU (so a voxel the output takes from the model is told apart from one it keeps)."""
  lo, hi = preprocess.window_bounds(region)
  return np.clip(np.asarray(hu, np.float32) + shift, lo, hi)


def test_air_lung_and_bone_keep_their_hu_on_real_ct_while_the_window_is_processed(real_data_dir):
  """example_ct (pelvis to lung bases) under the abdomen window: what the window cannot hold is the input's own HU
  within a few HU, what it holds is the model's. The old default (the model's value everywhere) put air at -120."""
  ct = volume_io.load(real_data_dir / "example_ct.nii.gz").data
  result = fake_model(ct, "abdomen")
  out = scans.keep_outside_window(result, ct, "abdomen", blend_hu=20.0)
  local = ndimage.gaussian_filter(ct, 1.0)
  lo, hi = ABDOMEN
  body = ndimage.binary_fill_holes(ct > -500)
  tissue_air = {
    "air": (ct < -900) & ~body,
    "lung": body & (local < -600) & (local > -950),  # the lung bases at the top of the scan
    "bone": local > 400,
    # partial-volume cortex just above the window among soft tissue (its local mean inside the window): the
    # model saturates there, so the scan's own value (the rule before took the model's 240 HU, a median 87 HU off)
    "thin bone": (ct > hi + 10) & (ct < hi + scans.NOISE_GUARD_HU) & (local < hi - 10),
  }
  for name, where in tissue_air.items():
    assert where.sum() > 500, name
    assert np.abs(out[where] - ct[where]).max() <= 3.0, name
  guard = scans.NOISE_GUARD_HU  # (a voxel far beyond the window stays the input's even among tissue)
  inside = (local > lo + 10) & (local < hi - 10) & (ct > lo - guard + 10) & (ct < hi - 10)
  assert inside.mean() > 0.3
  np.testing.assert_allclose(out[inside], result[inside], atol=1e-3)  # processed: the model's values
  assert np.mean(np.abs(out[inside] - ct[inside])) > 20.0  # (and those differ from the input)


def test_above_the_window_the_model_is_kept_unless_it_saturates():
  """Soft tissue (50 HU) crossed by a one-voxel plate of 340 HU (a rib at 3 mm: its local mean is tissue) and
  sprinkled with noisy voxels above the window. Where the model saturates at the ceiling (the plate), the output is
  the scan's; where the model says a voxel above the window is tissue (the noise), the model's; below the window the
  local mean alone decides (noisy fat at the floor is denoised even where the model touches the floor)."""
  lo, hi = ABDOMEN
  ct = np.full((9, 9, 9), 50.0, np.float32)
  ct[4] = 340.0
  noisy = np.zeros(ct.shape, bool)
  noisy[1, 2:7:2, 2:7:2] = True
  ct[noisy] = hi + 40.0
  fat_floor = np.zeros(ct.shape, bool)
  fat_floor[7, 2:7:2, 2:7:2] = True
  ct[fat_floor] = lo - 40.0
  result = np.clip(ct, lo, hi)  # the plate saturates; the tissue's noise and the fat are the model's ...
  result[noisy], result[fat_floor] = 60.0, lo  # ... which says the noisy voxels are tissue, the fat at its floor
  out = scans.keep_outside_window(result, ct, "abdomen", blend_hu=20.0)
  np.testing.assert_allclose(out[4], 340.0, atol=0.5)
  np.testing.assert_allclose(out[noisy], 60.0, atol=0.5)
  np.testing.assert_allclose(out[fat_floor], lo, atol=0.5)
  tissue = np.zeros(ct.shape, bool)
  tissue[[0, 8]] = True
  np.testing.assert_allclose(out[tissue], 50.0, atol=0.5)


def test_the_blend_at_the_window_edges_leaves_no_seam():
  """A smooth ramp of HU across the abdomen window's lower edge: the output changes at most a few HU per voxel
  where a hard switch between the model (saturated at -120) and the input jumps by the model's whole offset."""
  lo, _ = ABDOMEN
  ramp = np.linspace(lo - 150, lo + 150, 301, dtype=np.float32)[:, None, None] * np.ones((1, 4, 4), np.float32)
  result = fake_model(ramp, "abdomen")
  out = scans.keep_outside_window(result, ramp, "abdomen", blend_hu=20.0, smooth_voxels=0)
  steps = np.abs(np.diff(out[:, 0, 0]))
  hard = np.where(ramp >= lo, result, ramp)
  assert np.abs(np.diff(hard[:, 0, 0])).max() > 25.0  # what a switch does here
  assert steps.max() < 4.0  # 1 HU per voxel of input slope + at most 30 HU x 1.5 / 20 HU of blend slope
  np.testing.assert_allclose(out[ramp[:, 0, 0] < lo - 10, 0, 0], ramp[ramp[:, 0, 0] < lo - 10, 0, 0])
  np.testing.assert_allclose(out[ramp[:, 0, 0] > lo + 10, 0, 0], result[ramp[:, 0, 0] > lo + 10, 0, 0])


def test_window_weight_is_smoothstep_in_float64():
  """The weight against an independent float64 smoothstep: 0 beyond the window by half the band, 1 inside it by
  half the band, 3u^2 - 2u^3 between (both edges, chest window)."""
  lo, hi = preprocess.window_bounds("chest")
  hu = np.concatenate([np.linspace(lo - 30, lo + 30, 121), np.linspace(hi - 30, hi + 30, 121)])
  band = 40.0

  def reference(v):
    u = min(max((v - (lo - band / 2)) / band, 0.0), 1.0, max(((hi + band / 2) - v) / band, 0.0))
    return 3 * u * u - 2 * u * u * u

  expected = np.array([reference(float(v)) for v in hu])
  np.testing.assert_allclose(scans.window_weight(hu, "chest", band), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------ region


def test_region_from_the_label_map_and_estimated_from_the_scan_on_real_ct(real_data_dir):
  ct = volume_io.load(real_data_dir / "example_ct.nii.gz")
  seg = volume_io.load(real_data_dir / "example_seg_fast_force_split.nii.gz", is_mask=True)
  parts, note = scans.decide_region("auto", ct, seg, class_map.TOTAL)
  assert [(p.region, p.start, p.stop) for p in parts] == [("abdomen", 0, ct.shape[2])] and "label map" in note
  parts, note = scans.decide_region("auto", ct, None, class_map.TOTAL)
  assert [p.region for p in parts] == ["abdomen"] and note.startswith("estimated from the scan")
  chest = volume_io.load(real_data_dir / "aorta_ct_cropped_lps.nii.gz")  # CT angiography, heart to upper abdomen
  parts, note = scans.decide_region("auto", chest, None, class_map.TOTAL)
  assert [p.region for p in parts] == ["chest"] and "lungs" in note
  parts, note = scans.decide_region("head_neck", chest, None, class_map.TOTAL)  # given: taken as is
  assert [p.region for p in parts] == ["head_neck"] and note == "given (--config.region)"
  dicom = volume_io.load(real_data_dir / "example_ct_dicom")  # another patient's upper abdomen, 0.98 x 0.98 x 2 mm
  assert [p.region for p in scans.decide_region("auto", dicom, None, class_map.TOTAL)[0]] == ["abdomen"]


def test_stomach_gas_in_a_cropped_upper_abdomen_is_not_lung(real_data_dir):
  """example_ct's top 26 slices cropped in-plane (lung bases at the top, stomach gas below them): the gas is 11 % of
  the smaller section over 24 mm, which counted as lung made the crop chest-below-a-neck (head_neck); lung
  parenchyma (-900..-600 HU) and pure gas (below -950) are told apart."""
  ct = volume_io.load(real_data_dir / "example_ct.nii.gz")
  index = (slice(10, 112), slice(5, 96), slice(86, 112))
  affine = ct.affine.copy()
  affine[:3, 3] = ct.affine[:3, :3] @ np.array([s.start for s in index], float) + ct.affine[:3, 3]
  crop = volumes.Volume(np.ascontiguousarray(ct.data[index]), affine)
  parts, note = scans.decide_region("auto", crop, None, class_map.TOTAL)
  assert [p.region for p in parts] == ["abdomen"], note
  gas = regions.slice_features(crop.data, crop.affine).lung[:8]  # the stomach's slices: little lung-like air
  assert np.all(gas < 0.6 * regions.LUNG_FRACTION), gas  # (all air enclosed: 9-11 %)


def test_an_undecidable_region_is_a_one_line_refusal_naming_the_flag(real_data_dir):
  """A 60 x 60 mm crop of soft tissue: no lungs, and a body cut by the field of view says nothing of its size."""
  ct = volume_io.load(real_data_dir / "example_ct.nii.gz")
  crop = volumes.Volume(np.ascontiguousarray(ct.data[50:70, 40:60, 20:80]), ct.affine, "crop.nii.gz")
  with pytest.raises(scans.Refusal) as e:
    scans.decide_region("auto", crop, None, class_map.TOTAL)
  message = str(e.value)
  assert "\n" not in message and message.startswith("crop.nii.gz: cannot tell its body region")
  assert "--config.region=head_neck|chest|abdomen" in message


def test_a_scan_that_spans_regions_is_cut_into_overlapping_parts(real_data_dir):
  scan = chest_over_abdomen(real_data_dir)  # (conftest)
  parts, note = scans.decide_region("auto", scan, None, class_map.TOTAL)
  assert [p.region for p in parts] == ["abdomen", "chest"], note
  abdomen, chest = parts
  assert abdomen.start == 0 and chest.stop == scan.shape[2]
  assert chest.start < abdomen.stop  # they overlap (the outputs are blended there)
  assert abs(chest.start - 112) < 15  # near where the chest was put
  weights = scans._part_weights(parts, scan.shape[2])
  np.testing.assert_allclose(weights.sum(0), 1.0, atol=1e-6)
  overlap = slice(chest.start, abdomen.stop)
  assert np.all(np.diff(weights[1, overlap]) > 0) and weights[0, 0] == 1.0 and weights[1, -1] == 1.0


def test_parts_are_stitched_back_with_a_linear_cross_fade():
  """Two parts whose results are constants: the stitched volume is each constant outside the overlap and the
  linear mix across it; a map (no window) goes back as it is, each part onto its own slices."""
  affine = np.diag([2.0, 2.0, 2.0, 1.0])
  original = volumes.Volume(np.zeros((6, 5, 40), np.int16), affine, "x.nii.gz")
  parts = (regions.Part("abdomen", 2, 0, 25), regions.Part("chest", 2, 15, 40))
  scan = scans.Scan(original, None, parts, "given", None, "")
  results = []
  for part, value in zip(parts, (10.0, 50.0)):
    cut, _ = scan.part(part)
    results.append(scans.PartResult(part, cut, np.full(cut.shape, value, np.float32)))
  out = scans.onto_scan(scan, results, window_blend_hu=None)
  profile = out[3, 2]
  np.testing.assert_allclose(profile[:15], 10.0)
  np.testing.assert_allclose(profile[25:], 50.0)
  k = np.arange(15, 25) + 0.5
  np.testing.assert_allclose(profile[15:25], 10.0 + 40.0 * (k - 15) / 10, atol=1e-4)


def test_results_go_back_onto_the_scan_grid_slab_by_slab_as_in_one_piece(monkeypatch, real_data_dir):
  """The slab-wise epilogue (a few slices at a time, the blend's smoothing with a halo, in place) equals the
  whole-volume computation: resample, keep outside the window, round."""
  ct = volume_io.load(real_data_dir / "example_ct.nii.gz", integer_hu=True)
  assert ct.data.dtype == np.int16  # whole-number HU read as int16
  work = volumes.resample(ct, (4.5, 4.5, 4.5))
  part = regions.Part("abdomen", 2, 0, ct.shape[2])
  result = scans.PartResult(part, work, fake_model(work.data, "abdomen"))
  back = volumes.resample_like(volumes.Volume(result.values, work.affine), ct.shape, ct.affine).data
  expected = np.round(scans.keep_outside_window(back, ct.data.astype(np.float32), "abdomen", 20.0))
  monkeypatch.setattr(scans, "SLAB_VOXELS", ct.shape[0] * ct.shape[1] * 5)  # 5 slices a slab
  scan = scans.Scan(volumes.Volume(ct.data.copy(), ct.affine), None, (part,), "given", (4.5,) * 3, "")
  out = scans.onto_scan(scan, [result], window_blend_hu=20.0, dtype=np.int16, in_place=True)
  assert out is scan.original.data  # the scan's own array, overwritten
  np.testing.assert_array_equal(out, expected.astype(np.int16))


# ------------------------------------------------------------------------------------------ spacing


def test_spacing_is_decided_and_says_what_it_costs():
  spacing, note = scans.decide_spacing("checkpoint", (3.0, 3.0, 3.0), (1.0, 1.0, 1.0))
  assert spacing == (3.0, 3.0, 3.0)
  assert "details below 3 mm are not restored" in note and "--config.spacing=input" in note
  spacing, note = scans.decide_spacing("input", (3.0, 3.0, 3.0), (1.0, 1.0, 1.0))
  assert spacing is None and "3x larger than it learned" in note and "--config.spacing=checkpoint" in note
  spacing, note = scans.decide_spacing("checkpoint", (3.0, 3.0, 3.0), (3.0, 3.0, 3.0))
  assert spacing is None and "own 3 mm grid" in note  # the same grid: no resampling
  spacing, note = scans.decide_spacing((2.0, 2.0, 2.0), (3.0, 3.0, 3.0), (0.8, 0.8, 5.0))
  assert spacing == (2.0, 2.0, 2.0) and "--config.spacing" in note and "not restored" in note
  spacing, note = scans.decide_spacing("checkpoint", (1.0, 1.0, 1.0), (3.0, 3.0, 3.0))
  assert spacing == (1.0, 1.0, 1.0) and "coarser" in note
  assert scans.decide_spacing("checkpoint", None, (1.0, 1.0, 2.0))[0] is None


# ------------------------------------------------------------------------------------------ the user's files


def test_outputs_that_would_lose_a_users_file_are_refused(tmp_path, real_data_dir):
  ct = str(real_data_dir / "example_ct.nii.gz")
  series = str(real_data_dir / "example_ct_dicom")
  check = lambda out, overwrite=False, dicom=False, **inputs: scans.check_output(
    str(out), inputs or {"input": ct}, overwrite=overwrite, dicom_input=dicom
  )
  existing = tmp_path / "done.nii.gz"
  existing.write_bytes(b"a result")
  with pytest.raises(scans.Refusal, match="exists; give a new path, or --config.overwrite=True"):
    check(existing)
  check(existing, overwrite=True)
  (tmp_path / "other.json").write_text("{}")
  with pytest.raises(scans.Refusal, match="other.json .* exists"):
    check(tmp_path / "other.nii.gz")
  for overwrite in (False, True):  # never, whatever the flag says
    with pytest.raises(scans.Refusal, match="never writes over or into its inputs"):
      check(ct, overwrite=overwrite)
  link = tmp_path / "link.nii.gz"
  os.symlink(ct, link)
  with pytest.raises(scans.Refusal, match="never writes over"):
    check(ct, overwrite=True, input=str(link))  # the output is where the link points
  with pytest.raises(scans.Refusal, match="never writes over"):
    check(link, overwrite=True)  # the output is a link to the input
  with pytest.raises(scans.Refusal, match="never writes over"):
    check(series + "/", dicom=True, input=series)
  with pytest.raises(scans.Refusal, match="lies in --config.input"):
    check(series + "/denoised/", dicom=True, input=series)
  with pytest.raises(scans.Refusal, match="--config.labels=.* never writes over"):
    check(
      real_data_dir / "example_seg.nii.gz", overwrite=True, input=ct, labels=str(real_data_dir / "example_seg.nii.gz")
    )
  with pytest.raises(scans.Refusal, match="is a folder .* the input is not DICOM"):
    check(str(tmp_path / "series") + "/")
  full = tmp_path / "full"
  full.mkdir()
  (full / "x.dcm").write_bytes(b"")
  with pytest.raises(scans.Refusal, match="not empty"):
    check(str(full) + "/", overwrite=True, dicom=True, input=series)
  with pytest.raises(scans.Refusal, match="write .nii.gz or .nii"):
    check(tmp_path / "out.nrrd")
  with pytest.raises(scans.Refusal, match="cannot be created"):
    check(existing / "below_a_file.nii.gz")
  check(tmp_path / "new" / "deeper" / "out.nii.gz")  # a new folder is made
  assert (tmp_path / "new" / "deeper").is_dir()
