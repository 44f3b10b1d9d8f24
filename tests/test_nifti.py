"""NIfTI I/O: RAS canonicalisation, resampling round trips in world coordinates, and bad input."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from meddiff_jax.data import nifti, phantom, volume_io, volumes


def landmark_world(volume, mask):
  """World coordinates (mm) of a mask's centroid: a landmark that survives resampling."""
  idx = np.argwhere(mask)
  return volume.world(idx.mean(axis=0))


def test_real_ct_round_trip_keeps_world_coordinates(real_data_dir, tmp_path):
  ct = volume_io.load(real_data_dir / "example_ct.nii.gz")
  seg = volume_io.load(real_data_dir / "example_seg_fast_force_split.nii.gz", is_mask=True)
  volumes.check_ct(ct)
  volumes.check_same_grid(ct, seg)
  assert nib.aff2axcodes(ct.affine) == ("R", "A", "S") and ct.spacing == pytest.approx((3.0, 3.0, 3.0))
  liver = seg.data == 5
  before = landmark_world(seg, liver)
  ct2 = volumes.resample(ct, (2.0, 2.0, 2.0), order=1)
  seg2 = volumes.resample(seg, (2.0, 2.0, 2.0), order=0)
  assert ct2.shape == volumes.target_shape(ct.shape, ct.spacing, (2.0, 2.0, 2.0))
  nifti.save(seg2, tmp_path / "seg2.nii.gz", np.uint8)
  nifti.save(ct2, tmp_path / "ct2.nii.gz", np.int16)
  seg3 = volume_io.load(tmp_path / "seg2.nii.gz", is_mask=True)
  after = landmark_world(seg3, seg3.data == 5)
  # nearest-neighbour resampling moves an organ's boundary by up to half a source voxel
  np.testing.assert_allclose(after, before, atol=1.5)
  # the image voxel nearest a world point holds the same tissue before and after
  p = before
  i_old = np.round(np.linalg.solve(ct.affine[:3, :3], p - ct.affine[:3, 3])).astype(int)
  ct3 = volume_io.load(tmp_path / "ct2.nii.gz")
  i_new = np.round(np.linalg.solve(ct3.affine[:3, :3], p - ct3.affine[:3, 3])).astype(int)
  assert abs(ct.data[tuple(i_old)] - ct3.data[tuple(i_new)]) < 60  # liver HU in both


def test_reorientation_to_ras_preserves_world_positions(tmp_path):
  ph = phantom.make_phantom((24, 20, 16), (4.0, 4.0, 5.0), "abdomen", seed=0)
  ras = volumes.Volume(ph.hu, ph.affine)
  # the same image stored LPS-flipped with a matching affine
  flip = np.diag([-1.0, -1.0, 1.0, 1.0])
  flip[:3, 3] = [ph.hu.shape[0] - 1, ph.hu.shape[1] - 1, 0]
  lps = volumes.Volume(ph.hu[::-1, ::-1].copy(), ph.affine @ flip)
  nifti.save(lps, tmp_path / "lps.nii.gz")
  back = volume_io.load(tmp_path / "lps.nii.gz")
  assert nib.aff2axcodes(nib.load(tmp_path / "lps.nii.gz").affine) == ("L", "P", "S")
  np.testing.assert_allclose(back.affine, ras.affine, atol=1e-4)
  np.testing.assert_allclose(back.data, ras.data, atol=1e-3)


@pytest.mark.parametrize("new_spacing", [(1.5, 1.5, 1.5), (2.0, 5.0, 1.0), (6.0, 6.0, 6.0)])
def test_resampled_data_agrees_with_its_affine_exactly(tmp_path, new_spacing):
  """A volume whose value is a linear function of world position: trilinear resampling reproduces linear
  functions, so every interior voxel of the result must equal that function at *its* affine's position."""
  ph = phantom.make_phantom((20, 24, 16), (3.0, 2.0, 4.0), "abdomen", seed=2)
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in ph.hu.shape], indexing="ij"), -1)
  vol = volumes.Volume(np.zeros(ph.hu.shape, np.float32), ph.affine)
  field = lambda world: world @ np.array([0.5, -0.25, 0.125]) + 3.0
  vol.data = field(vol.world(idx)).astype(np.float32)
  nifti.save(volumes.resample(vol, new_spacing, order=1), tmp_path / "r.nii.gz")
  out = volume_io.load(tmp_path / "r.nii.gz")
  assert out.spacing == pytest.approx(new_spacing)
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1)
  expected = field(out.world(idx))
  inner = tuple(slice(2, n - 2) for n in out.shape)  # away from the constant-filled border
  np.testing.assert_allclose(out.data[inner], expected[inner], atol=1e-3)


# ------------------------------------------------------------------------------------------------
# bad input: each gets a VolumeError naming the file and the problem


def write(tmp_path, name, data, affine=None, dtype=None):
  img = nib.Nifti1Image(data if dtype is None else data.astype(dtype), np.eye(4) if affine is None else affine)
  path = tmp_path / name
  nib.save(img, path)
  return path


def ct_like(shape=(16, 16, 16)):
  rng = np.random.default_rng(0)
  return np.where(rng.uniform(size=shape) > 0.5, -1000.0, 40.0).astype(np.float32)


def test_truncated_gzip(tmp_path):
  path = write(tmp_path, "ok.nii.gz", ct_like((32, 32, 32)))
  raw = open(path, "rb").read()
  bad = tmp_path / "truncated.nii.gz"
  bad.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(volumes.VolumeError, match="truncated.nii.gz: (truncated|not a readable)"):
    volume_io.load(bad)


@pytest.mark.parametrize(
  "shape,match",
  [((16, 16), "expected a 3D volume"), ((16, 16, 16, 3), "expected a 3D volume"), ((16, 16, 1), "degenerate shape")],
)
def test_wrong_dimensionality(tmp_path, shape, match):
  path = write(tmp_path, "dims.nii.gz", np.zeros(shape, np.float32))
  with pytest.raises(volumes.VolumeError, match=f"dims.nii.gz: {match}"):
    volume_io.load(path)


def test_4d_singleton_is_squeezed(tmp_path):
  path = write(tmp_path, "single.nii.gz", ct_like()[..., None])
  assert volume_io.load(path).shape == (16, 16, 16)


def test_rgb(tmp_path):
  rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
  path = write(tmp_path, "rgb.nii.gz", rgb)
  with pytest.raises(volumes.VolumeError, match="rgb.nii.gz: RGB"):
    volume_io.load(path)


def test_nan_voxels(tmp_path):
  data = ct_like()
  data[3, 4, 5] = np.nan
  path = write(tmp_path, "nan.nii.gz", data)
  with pytest.raises(volumes.VolumeError, match="nan.nii.gz: 1 NaN/inf voxels"):
    volume_io.load(path)


def test_constant_volume(tmp_path):
  vol = volume_io.load(write(tmp_path, "const.nii.gz", np.full((8, 8, 8), -1000.0, np.float32)))
  with pytest.raises(volumes.VolumeError, match="const.nii.gz: constant volume"):
    volumes.check_ct(vol)


def test_singular_affine(tmp_path):
  img = nib.Nifti1Image(ct_like(), np.eye(4))
  img.header["srow_z"] = [0.0, 0.0, 0.0, 0.0]  # sform with a zero row; nibabel refuses to build one directly
  img.header["sform_code"], img.header["qform_code"] = 1, 0
  path = tmp_path / "singular.nii.gz"
  nib.save(nib.Nifti1Image(ct_like(), None, img.header), path)
  with pytest.raises(volumes.VolumeError, match="singular.nii.gz: singular affine"):
    volume_io.load(path)


def test_non_hu_data(tmp_path):
  mr = np.random.default_rng(0).integers(0, 256, (16, 16, 16)).astype(np.uint8)
  vol = volume_io.load(write(tmp_path, "mr.nii.gz", mr))
  with pytest.raises(volumes.VolumeError, match="mr.nii.gz: .*not CT in Hounsfield units"):
    volumes.check_ct(vol)


def test_mask_shape_mismatch(tmp_path):
  image = volume_io.load(write(tmp_path, "img.nii.gz", ct_like()))
  mask = volume_io.load(write(tmp_path, "img_seg.nii.gz", np.zeros((16, 16, 12), np.uint8)), is_mask=True)
  with pytest.raises(volumes.VolumeError, match=r"img_seg.nii.gz: mask shape \(16, 16, 12\) does not match"):
    volumes.check_same_grid(image, mask)


def test_crop_whose_affine_was_not_updated(real_data_dir, tmp_path):
  parent = volume_io.load(real_data_dir / "example_ct.nii.gz")
  stale = volume_io.load(real_data_dir / "example_ct_sm.nii.gz")
  with pytest.raises(
    volumes.VolumeError,
    match=r"example_ct_sm.nii.gz: affine places this crop at voxel offset "
    r"\(0, 0, 0\).*match the parent at voxel offset \(0, 0, 82\)",
  ):
    volumes.check_crop_position(stale, parent)
  # the same crop with its origin shifted by the crop offset passes
  fixed_affine = stale.affine.copy()
  fixed_affine[:3, 3] = parent.world(np.array([0, 0, 82]))
  nifti.save(volumes.Volume(stale.data, fixed_affine), tmp_path / "fixed.nii.gz", np.int16)
  volumes.check_crop_position(volume_io.load(tmp_path / "fixed.nii.gz"), parent)


def test_missing_file(tmp_path):
  with pytest.raises(volumes.VolumeError, match="nope.nii.gz: file does not exist"):
    volume_io.load(tmp_path / "nope.nii.gz")


# ------------------------------------------------------------------------------------------------
# geometry checks, limits, the CT check, other formats (#13)


def nifti_with(tmp_path, name, data=None, qform=None, qcode=0, sform=None, scode=0, pixdim=None):
  data = ct_like() if data is None else data
  img = nib.Nifti1Image(data, None)
  if pixdim is not None:
    img.header["pixdim"][1:4] = pixdim
  img.header["qform_code"], img.header["sform_code"] = qcode, scode
  if qform is not None:
    img.set_qform(qform, code=qcode)
  if sform is not None:
    img.set_sform(sform, code=scode)
  path = tmp_path / name
  nib.save(img, path)
  return path


def test_unknown_orientation_is_refused_unless_assumed(tmp_path):
  path = nifti_with(tmp_path, "nocodes.nii.gz", pixdim=(2.0, 2.0, 3.0))
  with pytest.raises(
    volumes.VolumeError, match="nocodes.nii.gz: orientation unknown .*--config.assume_orientation=RAS"
  ):
    volume_io.load(path)
  vol = volume_io.load(path, options=volumes.ReadOptions(assume_orientation="LPS"))
  assert nib.aff2axcodes(vol.affine) == ("R", "A", "S") and vol.spacing == pytest.approx((2.0, 2.0, 3.0))
  raw = np.asarray(nib.load(path).dataobj)
  np.testing.assert_array_equal(vol.data, raw[::-1, ::-1, :])  # L->R and P->A flips


@pytest.mark.parametrize("pixdim", [(1.0, 1.0, 0.0), (1.0, -2.0, 1.0), (1.0, np.nan, 1.0)])
def test_bad_pixdim_is_refused(tmp_path, pixdim):
  path = nifti_with(tmp_path, "pixdim.nii", qform=np.eye(4), qcode=1)
  raw = bytearray(path.read_bytes())
  raw[80:92] = np.array(pixdim, "<f4").tobytes()  # pixdim[1:4] as a broken writer left them
  path.write_bytes(bytes(raw))
  with pytest.raises(volumes.VolumeError, match="pixdim.nii: pixdim .*zero, negative or NaN"):
    volume_io.load(path)


def test_qform_sform_disagreement_and_shear(tmp_path):
  q = np.diag([1.0, 1.0, 2.5, 1.0])
  s = q.copy()
  s[1, 2] = 0.4  # a tilt-corrected sform: slices step sideways (GE gantry tilt)
  path = nifti_with(tmp_path, "tilt.nii.gz", qform=q, qcode=1, sform=s, scode=1)
  with pytest.raises(volumes.VolumeError, match="tilt.nii.gz: qform and sform disagree by up to .*trust_affine"):
    volume_io.load(path)
  assert volume_io.load(path, options=volumes.ReadOptions(trust_affine="qform")).spacing == pytest.approx((1, 1, 2.5))
  with pytest.raises(volumes.VolumeError, match="sheared voxel grid .*gantry tilt"):
    volume_io.load(path, options=volumes.ReadOptions(trust_affine="sform"))


def test_slice_gap_and_thin_slab_are_refused(tmp_path):
  gap = nifti_with(tmp_path, "gap.nii.gz", sform=np.diag([1.0, 1.0, 202.0, 1.0]), scode=1)
  with pytest.raises(volumes.VolumeError, match="gap.nii.gz: voxel spacing 202 mm along axis 2 .*max_spacing_mm"):
    volume_io.load(gap)
  slab = nifti_with(tmp_path, "slab.nii.gz", data=ct_like((16, 16, 3)), sform=np.eye(4), scode=1)
  with pytest.raises(volumes.VolumeError, match="slab.nii.gz: shape \\(16, 16, 3\\) is thinner than .*padded"):
    volume_io.load(slab)


def test_size_limits_are_checked_from_the_header_before_reading(tmp_path):
  import time

  hdr = nib.Nifti1Header()
  hdr.set_data_dtype(np.int16)
  hdr.set_data_shape((30000, 30000, 30000))
  hdr["sform_code"] = 1
  hdr.set_sform(np.eye(4))
  path = tmp_path / "huge.nii.gz"
  with gzip.open(path, "wb") as f:  # a header and a few bytes: a decompression bomb's header
    f.write(hdr.binaryblock + b"\0" * 4 + b"\0" * 1000)
  t0 = time.perf_counter()
  with pytest.raises(volumes.VolumeError, match=r"huge.nii.gz: header claims 30000x30000x30000 = 2.7e\+13 voxels"):
    volume_io.load(path)
  hdr.set_data_shape((2000, 2000, 400))  # 3.2 GB of int16: under the voxel limit, over a 1 GB cap
  with gzip.open(path, "wb") as f:
    f.write(hdr.binaryblock + b"\0" * 1004)
  with pytest.raises(volumes.VolumeError, match="3.2 GB of voxel data .*limits.max_gb=1"):
    volume_io.load(path, options=volumes.ReadOptions(max_gb=1.0))
  assert time.perf_counter() - t0 < 5.0  # nothing was decompressed or allocated


def test_ct_check_accepts_crops_without_air_and_rejects_mr(real_data_dir):
  mr = volume_io.load(real_data_dir / "example_mr_sm.nii.gz")
  with pytest.raises(volumes.VolumeError, match="example_mr_sm.nii.gz: .*not CT in Hounsfield units.*assume_hu"):
    volumes.check_ct(mr)
  volumes.check_ct(mr, assume_hu=True)  # the override
  # a liver ROI crop without air (48 mm box at the liver centroid: -127..95 HU, fat at the edges)
  ct = volume_io.load(real_data_dir / "example_ct.nii.gz")
  seg = volume_io.load(real_data_dir / "example_seg_fast_force_split.nii.gz", is_mask=True)
  c = np.argwhere(seg.data == 5).mean(0).astype(int)
  crop = ct.data[c[0] - 8 : c[0] + 8, c[1] - 8 : c[1] + 8, c[2] - 8 : c[2] + 8]
  assert crop.min() > -200
  volumes.check_ct(volumes.Volume(crop, ct.affine, "liver_crop"))
  rng = np.random.default_rng(0)
  with pytest.raises(volumes.VolumeError, match="neither air"):  # a 0-255 image
    volumes.check_ct(volumes.Volume(rng.integers(0, 256, (16, 16, 16)).astype(np.float32), np.eye(4), "png"))
  with pytest.raises(volumes.VolumeError, match="assume_hu"):  # unscaled: raw = HU + 1024, air at 0
    volumes.check_ct(volumes.Volume(ct.data + 1024.0, ct.affine, "raw"))
  with pytest.raises(volumes.VolumeError, match="assume_hu"):  # the liver crop unscaled
    volumes.check_ct(volumes.Volume(crop + 1024.0, ct.affine, "raw_crop"))


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_nrrd_and_metaimage_match_the_nifti(real_data_dir, tmp_path, ext):
  sitk = pytest.importorskip("SimpleITK")
  src = real_data_dir / "aorta_ct_cropped_lps.nii.gz"
  out = tmp_path / f"ct{ext}"
  sitk.WriteImage(sitk.ReadImage(str(src)), str(out))  # ITK's own conversion: an independent path
  a, b = volume_io.load(src), volume_io.load(out)
  np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
  np.testing.assert_array_equal(b.data, a.data)
  saved = tmp_path / "back.nii.gz"
  volume_io.save_like(b.data, b, saved, np.int16)
  back = nib.load(saved)
  assert back.shape == sitk.ReadImage(str(out)).GetSize()  # the file's own voxel order


def test_masks_read_as_bits_are_the_labels_above_zero(real_data_dir, tmp_path):
  """volume_io.load(is_mask=True, binary=True): bool, label > 0 of the int16 labels, the same grid; for a NIfTI in
  another orientation (converted slab by slab while reoriented) and for another format (after the labels)."""
  seg = volume_io.load(real_data_dir / "example_seg_fast_force_split.nii.gz", is_mask=True)
  flipped = np.diag([-1.0, 1.0, -1.0, 1.0]) @ seg.affine  # stored L?I: read back into RAS
  nifti.save(volumes.Volume(seg.data[::-1, :, ::-1].copy(), flipped), tmp_path / "m.nii.gz", np.int16)
  import SimpleITK as sitk

  nrrd = tmp_path / "m.nrrd"
  sitk.WriteImage(sitk.GetImageFromArray(seg.data.transpose(2, 1, 0)), str(nrrd))  # ITK arrays are (z, y, x)
  for path in (tmp_path / "m.nii.gz", nrrd):
    labels, bits = volume_io.load(path, is_mask=True), volume_io.load(path, is_mask=True, binary=True)
    assert bits.data.dtype == np.bool_ and labels.data.dtype == np.int16
    np.testing.assert_array_equal(bits.data, labels.data > 0)
    np.testing.assert_allclose(bits.affine, labels.affine)
    assert 0 < bits.data.sum() < bits.data.size
