"""Exact resampling and outputs on the input's own grid (RAS, LPS, LAS, oblique), against closed forms."""

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from meddiff_jax.data import volume_io, volumes

GRADIENT = np.array([0.5, -0.25, 0.125])


def ramp(shape, affine):
  """A volume whose value is a linear function of world position (trilinear interpolation reproduces it)."""
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
  world = idx @ affine[:3, :3].T + affine[:3, 3]
  return (world @ GRADIENT + 3.0).astype(np.float64)


def affine_for(codes, zooms=(3.0, 2.0, 4.0), origin=(-40.0, 25.0, 100.0), rotate_deg=0.0):
  from meddiff_jax.data import geometry

  a = geometry.affine_from_codes(codes, zooms)
  if rotate_deg:
    r = np.eye(4)
    r[:3, :3] = Rotation.from_euler("xyz", [rotate_deg, -rotate_deg / 2, rotate_deg / 3], degrees=True).as_matrix()
    a = r @ a
  a[:3, 3] = origin
  return a


ORIENTATIONS = [("RAS", 0.0), ("LPS", 0.0), ("LAS", 0.0), ("RAS", 17.0)]


@pytest.mark.parametrize("codes,rot", ORIENTATIONS)
@pytest.mark.parametrize("new_spacing", [(1.5, 1.0, 2.0), (1.1, 0.7, 2.9), (6.0, 5.0, 9.0), (3.0, 2.0, 4.0)])
def test_linear_ramp_resampled_exactly_on_every_face(codes, rot, new_spacing):
  affine = affine_for(codes, rotate_deg=rot)
  vol = volumes.Volume(ramp((20, 24, 16), affine).astype(np.float32), affine)
  vol = volumes.Volume(vol.data, vol.affine)
  # in RAS order as every loader returns it
  from meddiff_jax.data import geometry

  data, ras_affine, _ = geometry.to_ras(vol.data, vol.affine)
  vol = volumes.Volume(data, ras_affine)
  out = volumes.resample(vol, new_spacing, order=1)
  assert out.spacing == pytest.approx(new_spacing, abs=1e-9)
  # affine exact: same axes, same first voxel centre, columns scaled by new/old spacing
  np.testing.assert_allclose(out.affine[:3, 3], vol.affine[:3, 3], atol=1e-9)
  np.testing.assert_allclose(
    out.affine[:3, :3], vol.affine[:3, :3] @ np.diag(np.array(new_spacing) / vol.spacing), atol=1e-9
  )
  expected = ramp(out.shape, out.affine)
  # every voxel, faces included: no invented border values
  np.testing.assert_allclose(out.data, expected, atol=2e-4 * np.abs(expected).max())
  # the new grid covers the old one to within one new voxel on every side
  old_extent = (np.array(vol.shape) - 1) * np.array(vol.spacing)
  new_extent = (np.array(out.shape) - 1) * np.array(new_spacing)
  assert np.all(new_extent <= old_extent + 1e-6) and np.all(old_extent - new_extent < np.array(new_spacing))


def test_up_then_down_returns_the_input_exactly():
  affine = affine_for("LPS", zooms=(3.0, 3.0, 3.0))
  from meddiff_jax.data import geometry

  data, ras_affine, _ = geometry.to_ras(ramp((21, 17, 13), affine).astype(np.float32), affine)
  vol = volumes.Volume(data, ras_affine)
  up = volumes.resample(vol, (1.5, 1.0, 0.75))
  back = volumes.resample_like(up, vol.shape, vol.affine)
  np.testing.assert_allclose(back.data, vol.data, atol=1e-3)
  down = volumes.resample(vol, (6.0, 6.0, 6.0))
  np.testing.assert_allclose(down.data, ramp(down.shape, down.affine), atol=1e-3)


def test_labels_resample_by_nearest_neighbour_without_new_labels():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, (12, 10, 8)).astype(np.int16)
  vol = volumes.Volume(labels, np.diag([2.0, 2.0, 2.0, 1.0]))
  up = volumes.resample(vol, (1.0, 1.0, 1.0), order=0)
  assert up.data.dtype == np.int16 and set(np.unique(up.data)) <= set(np.unique(labels))
  # every even voxel of the 1 mm grid sits exactly on an old voxel centre
  np.testing.assert_array_equal(up.data[::2, ::2, ::2], labels)


def test_real_lps_ct_resampled_keeps_its_border_tissue(real_data_dir):
  """The issue's case: a 1.5 mm LPS crop resampled to 1 mm must not gain fake air on its faces."""
  ct = volume_io.load(real_data_dir / "aorta_ct_cropped_lps.nii.gz")
  out = volumes.resample(ct, (1.0, 1.0, 1.0))
  for axis in range(3):
    for face in (0, -1):
      old_face = np.take(ct.data, face, axis=axis)
      new_face = np.take(out.data, face, axis=axis)
      # the first face sits exactly on the old one; the last within one voxel: same tissue mix, no -1024 plane
      assert abs(float(new_face.mean()) - float(old_face.mean())) < 60.0, (axis, face)
  np.testing.assert_allclose(out.data[0, 0, :][::3], ct.data[0, 0, :][::2], atol=1e-3)


@pytest.mark.parametrize("codes,rot", ORIENTATIONS)
@pytest.mark.parametrize("qcode,scode", [(1, 1), (0, 2), (1, 0)])
def test_save_like_writes_the_input_grid_index_by_index(tmp_path, codes, rot, qcode, scode):
  affine = affine_for(codes, rotate_deg=rot)
  data = np.round(ramp((18, 14, 12), affine) * 10).astype(np.int16) - 500
  img = nib.Nifti1Image(data, None)
  img.set_qform(affine if qcode else None, code=qcode)
  img.set_sform(affine if scode else None, code=scode)
  src = tmp_path / "in.nii.gz"
  nib.save(img, src)
  vol = volume_io.load(src)
  assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
  out = tmp_path / "out.nii.gz"
  volume_io.save_like(vol.data + 1.0, vol, out, np.int16)
  a, b = nib.load(src), nib.load(out)
  np.testing.assert_array_equal(np.asarray(b.dataobj), data + 1)  # same voxel order: index by index
  assert (int(b.header["qform_code"]), int(b.header["sform_code"])) == (qcode, scode)
  np.testing.assert_allclose(b.affine, a.affine, atol=1e-6)
  if qcode:
    np.testing.assert_allclose(b.header.get_qform(), a.header.get_qform(), atol=1e-6)


def test_save_like_after_resampling_goes_back_to_the_input_grid(real_data_dir, tmp_path):
  """A task with --config.spacing: work on 1 mm, write on the 1.5 mm LPS input grid."""
  from meddiff_jax.tasks import common

  src = real_data_dir / "aorta_ct_cropped_lps.nii.gz"
  original = volume_io.load(str(src))
  work = volumes.resample(original, (1.0, 1.0, 1.0), order=1)
  back = common.back_to_input_grid(work.data, work, original)
  out = tmp_path / "o.nii.gz"
  common.save_like_input(back, original, str(out), np.int16)
  a, b = nib.load(src), nib.load(out)
  assert b.shape == a.shape and nib.aff2axcodes(b.affine) == ("L", "P", "S")
  np.testing.assert_array_equal(b.affine, a.affine)
  x, y = np.asarray(a.dataobj, np.float32), np.asarray(b.dataobj, np.float32)
  assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.97  # same anatomy, same voxel order
  # interior voxels come back within interpolation error; the faces are real tissue, not fake air
  assert np.median(np.abs(x - y)) < 15.0
  for axis in range(3):
    assert abs(np.take(y, -1, axis).mean() - np.take(x, -1, axis).mean()) < 60.0


@pytest.mark.slow
def test_denoise_on_real_lps_ct_writes_the_input_grid(real_data_dir, tmp_path):
  """End to end: the denoise command on an LPS crop, compared index by index with the input."""
  from conftest import run_main

  src = real_data_dir / "aorta_ct_cropped_lps.nii.gz"
  out = tmp_path / "den.nii.gz"
  proc = run_main(
    "--config=configs/denoise.py",
    f"--config.input={src}",
    f"--config.output={out}",
    "--config.num_steps=2",
    "--config.window_batch=8",
    "--config.overlap=0.0",
    "--config.noise_sigma_hu=10",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  a, b = nib.load(src), nib.load(out)
  assert b.shape == a.shape
  np.testing.assert_array_equal(b.affine, a.affine)
  assert (int(b.header["qform_code"]), int(b.header["sform_code"])) == (
    int(a.header["qform_code"]),
    int(a.header["sform_code"]),
  )
  x, y = np.asarray(a.dataobj, np.float32), np.asarray(b.dataobj, np.float32)
  assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.9  # flipped arrays correlate at -0.16..-0.30
