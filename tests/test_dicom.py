"""DICOM series in and out, against dcm2niix (the field's independent converter) and the anatomy."""

import json
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

from meddiff_jax.data import dicom, volume_io, volumes

pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory):
  from conftest import data_dir

  path = data_dir() / "example_ct_dicom"
  if not path.is_dir():
    pytest.skip("example_ct_dicom not found")
  return path


@pytest.fixture(scope="module")
def ct(series_dir):
  return volume_io.load(series_dir)


def test_geometry_matches_dcm2niix_voxel_for_voxel(ct, series_dir, tmp_path):
  exe = shutil.which("dcm2niix") or os.path.join(os.path.dirname(os.sys.executable), "dcm2niix")
  proc = subprocess.run(
    [exe, "-o", str(tmp_path), "-f", "ref", "-z", "y", str(series_dir)], capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  ref = nib.load(tmp_path / "ref.nii.gz")
  ref_data = np.asarray(ref.dataobj, np.float32)
  # spacing from the positions (2 mm), not SliceThickness (3 mm)
  assert ct.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
  # the same set of voxel-centre world coordinates: our affine and dcm2niix's differ only by axis flips
  corners = lambda shape, aff: {
    tuple(np.round(aff[:3, :3] @ [i, j, k] + aff[:3, 3], 3))
    for i in (0, shape[0] - 1)
    for j in (0, shape[1] - 1)
    for k in (0, shape[2] - 1)
  }
  assert corners(ct.shape, ct.affine) == corners(ref.shape, ref.affine)
  # every dcm2niix voxel holds the HU we hold at the same world position (nearest = exact grid match)
  on_ref_grid = volumes.resample_like(ct, ref.shape, ref.affine, order=0).data
  np.testing.assert_array_equal(on_ref_grid, ref_data)
  # InstanceNumber runs against z: sorting by it would flip the volume; positions increase with our k
  files = ct.source.dicom_files
  z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in (files[0], files[-1])]
  n = [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in (files[0], files[-1])]
  assert z[0] < z[-1] and n[0] > n[-1]


def test_totalsegmentator_labels_land_on_the_right_anatomy(ct, real_data_dir):
  seg = volume_io.load(real_data_dir / "example_seg_dicom.nii.gz", is_mask=True)
  labels = volumes.resample_like(seg, ct.shape, ct.affine, order=0).data  # by world coordinates
  names = {v: int(k) for k, v in json.loads((real_data_dir / "class_map_total.json").read_text())["total"].items()}
  hu = lambda name, lab=labels: float(np.median(ct.data[lab == names[name]]))
  centre = lambda name: ct.world(np.argwhere(labels == names[name]).mean(0))
  # contrast-enhanced abdomen: liver/spleen parenchyma, enhanced aorta, bone
  assert 70 < hu("liver") < 200 and 50 < hu("spleen") < 200
  assert hu("aorta") > 120 and hu("vertebrae_T12") > 150
  # RAS world: liver on the patient's right (+x) of the spleen; aorta in front of (+y) the vertebra
  assert centre("liver")[0] > centre("spleen")[0] + 50
  assert centre("aorta")[1] > centre("vertebrae_T12")[1]
  # a left-right flipped label map would fail the HU checks (the test can tell)
  flipped = labels[::-1]
  assert hu("aorta", flipped) < 120


def test_single_file_loads_its_whole_series(ct, series_dir):
  one = sorted(series_dir.iterdir())[5]
  vol = volume_io.load(one)
  np.testing.assert_array_equal(vol.affine, ct.affine)
  assert vol.shape == ct.shape


def test_derived_series_reads_back_on_the_same_geometry(ct, tmp_path):
  from meddiff_jax.tasks import common

  out = tmp_path / "out"
  result = np.clip(ct.data, -1024, 3071) + 7.0
  common.save_like_input(result, ct, str(out) + "/", np.int16, "meddiff denoise diffpir (tiny_phantom)")
  back = volume_io.load(out)
  np.testing.assert_allclose(back.affine, ct.affine, atol=1e-6)
  np.testing.assert_array_equal(back.data, result)
  old = pydicom.dcmread(ct.source.dicom_files[0], stop_before_pixels=True)
  new_files = sorted(out.iterdir())
  new = [pydicom.dcmread(f, stop_before_pixels=True) for f in new_files]
  assert len(new) == len(ct.source.dicom_files)
  for key in (
    "PatientID",
    "PatientName",
    "StudyInstanceUID",
    "StudyDate",
    "FrameOfReferenceUID",
    "ImageOrientationPatient",
    "PixelSpacing",
  ):
    assert str(new[0].get(key)) == str(old.get(key)), key
  assert len({d.SeriesInstanceUID for d in new}) == 1 and new[0].SeriesInstanceUID not in ("", old.SeriesInstanceUID)
  assert len({d.SOPInstanceUID for d in new}) == len(new)
  assert list(new[0].ImageType)[:2] == ["DERIVED", "SECONDARY"]
  assert "denoise" in new[0].SeriesDescription and "tiny_phantom" in new[0].SeriesDescription
  # a float result (anomaly map) survives through RescaleSlope
  out2 = tmp_path / "amap"
  amap = (np.abs(np.sin(ct.data / 100.0)) * 0.3).astype(np.float32)
  common.save_like_input(amap, ct, str(out2) + "/", np.float32)
  np.testing.assert_allclose(volume_io.load(out2, options=volumes.ReadOptions(min_side_voxels=2)).data, amap, atol=2e-5)
  with pytest.raises(volumes.VolumeError, match="not empty"):
    common.save_like_input(result, ct, str(out) + "/", np.int16)


def copy_series(src, dst, n=None, edit=None):
  """Header-edited copies of (the first n files of) the series."""
  dst.mkdir()
  files = sorted(src.iterdir())[:n]
  for i, f in enumerate(files):
    ds = pydicom.dcmread(f)
    if edit:
      edit(i, ds)
    ds.save_as(dst / f.name)
  return dst


def test_missing_slice_is_refused(series_dir, tmp_path):
  d = copy_series(series_dir, tmp_path / "gap")
  os.remove(sorted(d.iterdir())[7])
  with pytest.raises(volumes.VolumeError, match="non-uniform slice spacing .*2 to 4 mm"):
    volume_io.load(d)


def test_gantry_tilt_is_refused(series_dir, tmp_path):
  def tilt(i, ds):
    p = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [p[0], p[1] + 0.35 * p[2], p[2]]  # y shifts with z: a tilted gantry

  d = copy_series(series_dir, tmp_path / "tilt", edit=tilt)
  with pytest.raises(volumes.VolumeError, match="gantry tilt .*dcm2niix"):
    volume_io.load(d)


def test_duplicate_positions_are_refused(series_dir, tmp_path):
  def dup(i, ds):
    if i == 3:
      ds.ImagePositionPatient = pydicom.dcmread(sorted(series_dir.iterdir())[4]).ImagePositionPatient

  with pytest.raises(volumes.VolumeError, match="share a position"):
    volume_io.load(copy_series(series_dir, tmp_path / "dup", edit=dup))


def test_localizer_and_other_modalities_are_skipped_with_reasons(series_dir, tmp_path):
  def edit(i, ds):
    if i == 0:
      ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    elif i == 1:
      ds.Modality = "MR"

  d = copy_series(series_dir, tmp_path / "mixed", n=2, edit=edit)
  (d / "notes.txt").write_text("not dicom")
  series, skipped = dicom.scan(dicom.list_files(str(d)))
  assert not series
  assert sorted(s["reason"] for s in skipped) == [
    "CT localizer (scout) image, not part of a volume",
    "DICOM modality MR, not CT",
  ]
  with pytest.raises(volumes.VolumeError, match="no CT DICOM series in this folder"):
    volume_io.load(d)


def test_unscaled_dicom_is_refused_unless_assume_hu(series_dir, tmp_path):
  def raw(i, ds):
    ds.RescaleIntercept = "0"  # a converter that dropped the intercept: air at 0, water near 1024

  d = copy_series(series_dir, tmp_path / "raw", n=8, edit=raw)
  vol = volume_io.load(d)
  with pytest.raises(volumes.VolumeError, match="assume_hu"):
    volumes.check_ct(vol)
  volumes.check_ct(vol, assume_hu=True)


def test_padding_value_becomes_air_and_bad_private_tags_are_tolerated(series_dir, tmp_path):
  def edit(i, ds):
    ds.RescaleIntercept = "-1000"  # raw 0 would be -1000 HU ...
    ds.add_new(0x00280120, "US", 0)  # PixelPaddingValue: raw 0 marks "outside the scan", i.e. air
    ds.add_new(0x00091010, "UN", b"\x01\x02\x03")  # a private element of odd length

  d = copy_series(series_dir, tmp_path / "pad", n=8, edit=edit)
  vol = volume_io.load(d)
  assert vol.data.min() == volumes.AIR_HU and not np.any(vol.data == -1000.0)
  raw = pydicom.dcmread(vol.source.dicom_files[0]).pixel_array.T
  from meddiff_jax.data import geometry

  in_file_order = geometry.from_ras(vol.data, vol.source.ornt)[..., 0]
  assert (raw == 0).any() and np.all(in_file_order[raw == 0] == volumes.AIR_HU)
  assert np.all(in_file_order[raw != 0] == raw[raw != 0] - 1000.0)


def small_series(src, dst, n=10, box=(176, 112, 64, 64)):
  """A real 64x64xn sub-series (pixels cropped, positions shifted to match), uncompressed."""
  r0, c0, h, w = box
  dst.mkdir()
  for f in sorted(src.iterdir())[:n]:
    ds = pydicom.dcmread(f)
    px = ds.pixel_array[r0 : r0 + h, c0 : c0 + w].copy()
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient]) + c0 * dc * iop[:3] + r0 * dr * iop[3:]
    ds.set_pixel_data(px, "MONOCHROME2", 16)
    ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    ds.save_as(dst / f.name)
  return dst


@pytest.mark.slow
def test_denoise_command_dicom_in_dicom_out(series_dir, tmp_path):
  from conftest import run_main

  src = small_series(series_dir, tmp_path / "in")
  full = volume_io.load(series_dir)
  small = volume_io.load(src)
  # the crop sits where the full series says those pixels are (world coordinates agree)
  np.testing.assert_array_equal(volumes.resample_like(full, small.shape, small.affine, order=0).data, small.data)
  out = tmp_path / "den"
  proc = run_main(
    "--config=configs/denoise.py",
    f"--config.input={src}",
    f"--config.output={out}/",
    "--config.num_steps=2",
    "--config.noise_sigma_hu=10",
    "--config.overlap=0.0",
    # a 64x64 crop of an upper abdomen shows too little body to estimate its region; the series is abdomen
    "--config.region=abdomen",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  back = volume_io.load(out)
  np.testing.assert_allclose(back.affine, small.affine, atol=1e-5)
  assert back.shape == small.shape
  assert np.corrcoef(back.data.ravel(), small.data.ravel())[0, 1] > 0.9
  new = pydicom.dcmread(sorted(out.iterdir())[0], stop_before_pixels=True)
  assert list(new.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "denoise" in new.SeriesDescription
  assert "tiny_phantom" in new.SeriesDescription
