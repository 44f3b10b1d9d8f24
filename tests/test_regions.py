"""Region curation: landmark cuts land where the labels say, in world coordinates, with exact affines."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import prepare_config

from meddiff_jax.data import class_map, nifti, prepare, preprocess, regions, store, volume_io, volumes

LUNG_IDS = [10, 11, 12, 13, 14]


def _whole_body(flip_z: bool = False):
  """A 30x10x200 label map at 5 mm in z (z = -500 + 5 k) with organs on known slices, and an HU image."""
  labels = np.zeros((30, 10, 200), np.int16)
  for i, (label, k0, k1) in enumerate(
    (
      (75, 0, 25),
      (77, 20, 50),
      (78, 22, 48),
      (5, 60, 100),
      (1, 70, 95),
      (12, 90, 140),
      (46, 140, 160),
      (91, 160, 195),
      (90, 165, 190),
    )
  ):
    labels[3 * i : 3 * i + 3, 2:6, k0 : k1 + 1] = label  # side by side: every organ keeps its full z extent
  hu = np.where(labels > 0, 40.0, -1000.0).astype(np.float32) + np.arange(200)[None, None, :]  # slice-unique
  affine = np.diag([10.0, 10.0, 5.0, 1.0])
  affine[:3, 3] = (-50.0, -50.0, -500.0)
  if flip_z:  # same world content stored top-down (a non-canonical, e.g. DICOM-order, grid)
    labels, hu = labels[:, :, ::-1].copy(), hu[:, :, ::-1].copy()
    affine[:3, 2] *= -1
    affine[2, 3] = -500.0 + 5 * 199
  return volumes.Volume(hu, affine, "wb.nii.gz"), volumes.Volume(labels, affine, "wb_seg.nii.gz")


def _world_z(volume):
  axis = regions.superior_axis(volume.affine)
  return np.sort(regions.slice_z(volume.affine, volume.shape, axis))


def test_landmark_cuts_on_a_synthetic_whole_body_match_hand_computed_slices():
  image, labels = _whole_body()
  parts = {p.region: p for p in regions.split(image, labels, class_map.TOTAL)}
  # by hand: chest = lungs z [-50, 200] +- 20 -> slices 86..144; abdomen = hips bottom z -400 - 10 .. liver top z 0
  # + 20 -> slices 18..104; head_neck = lung apex z 200 - 30 .. skull top z 475 + 10 -> slices 134..197
  assert {r: p.index_range for r, p in parts.items()} == {
    "chest": (86, 145),
    "abdomen": (18, 105),
    "head_neck": (134, 198),
  }
  for p in parts.values():
    start = p.index_range[0]
    np.testing.assert_allclose(p.image.affine[:3, 3], image.affine[:3, :3] @ [0, 0, start] + image.affine[:3, 3])
    np.testing.assert_array_equal(p.image.data, image.data[:, :, slice(*p.index_range)])
    np.testing.assert_array_equal(p.labels.data, labels.data[:, :, slice(*p.index_range)])


def test_cuts_are_the_same_world_interval_on_a_top_down_grid():
  canon = {p.region: _world_z(p.image) for p in regions.split(*_whole_body(), class_map.TOTAL)}
  flipped = regions.split(*_whole_body(flip_z=True), class_map.TOTAL)
  assert {p.region for p in flipped} == set(canon)
  for p in flipped:
    np.testing.assert_allclose(_world_z(p.image), canon[p.region])
    # voxels keep their world position: the slice-unique HU ramp gives each slice's original index
    z = regions.slice_z(p.image.affine, p.image.shape, 2)
    np.testing.assert_allclose(p.image.data[0, 0, :] + 1000.0, (z + 500.0) / 5.0)


def test_truncated_and_missing_landmarks_fall_back_to_the_scan_edge():
  image, labels = _whole_body()
  upper = regions.crop(image, 2, 80, 200), regions.crop(labels, 2, 80, 200)  # liver cut at the bottom, no hips
  parts = {p.region: p.index_range for p in regions.split(*upper, class_map.TOTAL)}
  assert parts["abdomen"][0] == 0  # pelvis missing: abdomen runs to the scan's bottom edge
  assert "chest" in parts and "head_neck" in parts


def _seg_slices_nibabel(path, ids, min_voxels=5):
  """Independent of our loader: world z (RAS) of slices with >= min_voxels voxels of `ids`, via nibabel."""
  img = nib.as_closest_canonical(nib.load(path))
  data = np.asarray(img.dataobj)
  per_slice = np.isin(data, ids).sum(axis=(0, 1))
  k = np.where(per_slice >= min_voxels)[0]
  centre = (np.array(data.shape[:2]) - 1) / 2
  return np.array([(img.affine @ [centre[0], centre[1], kk, 1])[2] for kk in k]), img


def test_real_ct_pelvis_to_lung_bases_split_lands_where_the_labels_say(real_data_dir, tmp_path):
  ct_path, seg_path = real_data_dir / "example_ct.nii.gz", real_data_dir / "example_seg_fast_force_split.nii.gz"
  image, labels = volume_io.load(ct_path), volume_io.load(seg_path, is_mask=True)
  # default: only the lung bases (~3 cm) are in this scan: one abdomen sub-volume, the whole scan
  parts = regions.split(image, labels, class_map.TOTAL)
  assert [(p.region, p.index_range) for p in parts] == [("abdomen", (0, 112))]
  # with a small minimum extent, the chest sub-volume starts 20 mm below the lowest lung slice
  cfg = regions.SplitConfig(min_extent_mm={"head_neck": 10.0, "chest": 10.0, "abdomen": 10.0})
  chest = {p.region: p for p in regions.split(image, labels, class_map.TOTAL, cfg)}["chest"]
  lung_z, seg_img = _seg_slices_nibabel(str(seg_path), LUNG_IDS)
  spacing_z = 3.0
  nifti.save(chest.image, tmp_path / "chest.nii.gz", np.int16)
  saved = nib.load(tmp_path / "chest.nii.gz")
  z_saved = [(saved.affine @ [0, 0, k, 1])[2] for k in range(saved.shape[2])]
  assert min(z_saved) == pytest.approx(lung_z.min() - 20.0, abs=spacing_z)
  assert max(z_saved) == pytest.approx(max((seg_img.affine @ [0, 0, seg_img.shape[2] - 1, 1])[2], 0), abs=1e-3)
  # every lung voxel of the full scan is in the chest crop at the same world position
  seg_data = np.asarray(seg_img.dataobj)
  lung_idx = np.argwhere(np.isin(seg_data, LUNG_IDS))
  world = lung_idx @ seg_img.affine[:3, :3].T + seg_img.affine[:3, 3]
  crop_idx = np.round((world - saved.affine[:3, 3]) @ np.linalg.inv(saved.affine[:3, :3]).T).astype(int)
  assert crop_idx.min() >= 0 and np.all(crop_idx < np.array(saved.shape))
  ct = np.asarray(nib.as_closest_canonical(nib.load(ct_path)).dataobj)
  np.testing.assert_array_equal(np.asarray(saved.dataobj)[tuple(crop_idx.T)], ct[tuple(lung_idx.T)])


def test_region_given_keeps_the_scan_whole_and_missing_region_is_an_error(real_data_dir):
  image = volume_io.load(real_data_dir / "example_ct.nii.gz")
  (part,) = regions.resolve(image, None, "abdomen", class_map.TOTAL)
  assert part.image is image and part.region == "abdomen"
  with pytest.raises(ValueError, match="example_ct.nii.gz: no region given and no TotalSegmentator mask"):
    regions.resolve(image, None, "auto", class_map.TOTAL)
  empty = volumes.Volume(np.zeros(image.shape, np.int16), image.affine, "empty_seg.nii.gz")
  with pytest.raises(ValueError, match="shows no head_neck / chest / abdomen part"):
    regions.resolve(image, empty, "auto", class_map.TOTAL)


def test_unknown_region_never_reaches_training(tmp_path):
  with pytest.raises(ValueError, match="null class"):
    regions.training_region_id("unknown")
  assert regions.training_region_id("chest") == preprocess.REGIONS.index("chest")
  store.write_record(str(tmp_path), "v", np.zeros((4, 4, 4), np.int16), None, {"region": "unknown"})
  with pytest.raises(ValueError, match="v.json: region 'unknown'"):
    store.PreparedStore(str(tmp_path))


def test_prepare_writes_region_sub_volumes_with_exact_affines(tmp_path, real_data_dir):
  src, masks = tmp_path / "in", tmp_path / "masks"
  src.mkdir()
  masks.mkdir()
  os.symlink(real_data_dir / "example_ct.nii.gz", src / "case.nii.gz")
  os.symlink(real_data_dir / "example_seg_fast_force_split.nii.gz", masks / "case.nii.gz")
  os.symlink(real_data_dir / "aorta_ct_cropped_lps.nii.gz", src / "plain.nii.gz")
  c = prepare_config(src, tmp_path / "out", mask_dir=str(masks), spacing=(3.0, 3.0, 3.0))
  c.regions.min_extent_mm.chest = 10.0
  report = prepare.run(c)
  assert len(report["prepared"]) == 1 and len(report["failed"]) == 1
  assert "no region given and no TotalSegmentator mask" in report["failed"][0]["reason"]
  records = {r["region"]: r for r in store.read_records(str(tmp_path / "out"))}
  assert set(records) == {"chest", "abdomen"}
  parent = volume_io.load(real_data_dir / "example_ct.nii.gz")
  for r in records.values():
    start = r["source_index_range"][0]
    np.testing.assert_allclose(np.array(r["affine"])[:3, 3], parent.affine[:3, 3] + [0, 0, 3.0 * start], atol=1e-4)
    hu = np.load(tmp_path / "out" / r["image"])
    np.testing.assert_array_equal(hu, np.round(np.clip(parent.data[:, :, start : start + hu.shape[2]], -1024, 3071)))
    assert r["split"] in ("train", "val", "test") and r["job_id"] == records["chest"]["job_id"]
  assert records["chest"]["split"] == records["abdomen"]["split"]  # one patient, one split
  # resumable with sub-volumes: nothing prepared twice
  again = prepare.run(c)
  assert len(again["prepared"]) == 0 and len(again["skipped"]) == 1
  assert json.loads((tmp_path / "out" / "report.json").read_text())["total_in_store"] == 2
