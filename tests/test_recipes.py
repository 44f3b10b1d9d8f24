"""Dataset recipes on synthetic miniatures of each published layout (real names and folders, tiny phantoms),
each with a missing or malformed file; and the patient-hashed train / val / test split."""

import csv
import os
import pathlib

import nibabel as nib
import numpy as np
import pytest

from meddiff_jax.data import pipeline, prepare, recipes, store

# ------------------------------------------------------------------------------------------ helpers

SMALL_AFFINE = np.diag([8.0, 8.0, 8.0, 1.0])


def _ct(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """An 8^3 CT phantom in HU (air around a soft-tissue block), 8 mm voxels."""
  path.parent.mkdir(parents=True, exist_ok=True)
  hu = np.full((8, 8, 8), -1000, np.int16)
  hu[2:6, 2:6, 1:7] = 40 + seed
  nib.save(nib.Nifti1Image(hu, SMALL_AFFINE), str(path))
  return path


def _broken(path: pathlib.Path) -> pathlib.Path:
  _ct(path)
  path.write_bytes(path.read_bytes()[:60])  # truncated gzip
  return path


WB_ORGANS = (
  ("femur_left", 0, 25),
  ("hip_left", 20, 50),
  ("liver", 60, 100),
  ("spleen", 70, 95),
  ("lung_upper_lobe_right", 90, 140),
  ("vertebrae_C5", 140, 160),
  ("skull", 160, 195),
  ("brain", 165, 190),
)
WB_AFFINE = np.diag([10.0, 10.0, 5.0, 1.0])


def _whole_body_labels() -> np.ndarray:
  from meddiff_jax.data import class_map

  ids = {v: k for k, v in class_map.TOTAL.items()}
  labels = np.zeros((24, 10, 200), np.int16)
  for i, (name, k0, k1) in enumerate(WB_ORGANS):
    labels[3 * i : 3 * i + 3, 2:6, k0 : k1 + 1] = ids[name]
  return labels


def _whole_body_ct(path: pathlib.Path) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  hu = np.where(_whole_body_labels() > 0, 40, -1000).astype(np.int16)
  nib.save(nib.Nifti1Image(hu, WB_AFFINE), str(path))
  return path


def _ts_label_map(path: pathlib.Path) -> pathlib.Path:
  """TotalSegmentator --ml output: one label map."""
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(_whole_body_labels().astype(np.uint8), WB_AFFINE), str(path))
  return path


def _ts_folder(folder: pathlib.Path) -> pathlib.Path:
  """TotalSegmentator default output: one binary NAME.nii.gz per class (a few empty ones too)."""
  folder.mkdir(parents=True, exist_ok=True)
  labels = _whole_body_labels()
  from meddiff_jax.data import class_map

  for label, name in list(class_map.TOTAL.items())[:20] + [
    (k, v) for k, v in class_map.TOTAL.items() if v in dict((o[0], 0) for o in WB_ORGANS)
  ]:
    nib.save(nib.Nifti1Image((labels == label).astype(np.uint8), WB_AFFINE), str(folder / f"{name}.nii.gz"))
  return folder


def _run(tmp_path, dataset, root, **kw):
  from meddiff_jax.configs import prepare as prepare_config

  c = prepare_config.get_config()
  c.update(
    dict(input_dir=str(root), output_dir=str(tmp_path / "out"), dataset=dataset, workers=1, spacing=(8.0, 8.0, 8.0)),
    **kw,
  )
  return c, prepare.run(c)


def _manifest(tmp_path, dataset):
  with open(tmp_path / "out" / recipes.MANIFEST_NAME.format(dataset=dataset)) as f:
    return list(csv.DictReader(f))


# --------------------------------------------------------------------------- datasets with a region


def _layout_flat(root, names_good, names_broken, names_ignored):
  for i, n in enumerate(names_good):
    _ct(root / n, i)
  for n in names_broken:
    _broken(root / n)
  for n in names_ignored:
    _ct(root / n)


# dataset: (region, good image paths, malformed image paths, files in the layout that are not images,
#           the patient ids of the good images, in order)
FLAT = {
  "abdomenct1k": (
    "abdomen",
    ["AbdomenCT-1K-ImagePart1/Case_00001_0000.nii.gz", "AbdomenCT-1K-ImagePart2/Case_00362_0000.nii.gz"],
    ["AbdomenCT-1K-ImagePart1/Case_00002_0000.nii.gz"],
    ["Mask/Case_00001.nii.gz"],
    ["Case_00001", "Case_00362"],
  ),
  "amos22": (
    "abdomen",
    ["amos22/imagesTr/amos_0001.nii.gz", "amos22/imagesVa/amos_0008.nii.gz"],
    ["amos22/imagesTs/amos_0002.nii.gz"],
    ["amos22/labelsTr/amos_0001.nii.gz", "amos22/imagesTr/amos_0507.nii.gz"],  # >= 500: MRI
    ["amos_0001", "amos_0008"],
  ),
  "btcv": (
    "abdomen",
    ["RawData/Training/img/img0001.nii.gz", "RawData/Testing/img/img0061.nii.gz"],
    ["RawData/Training/img/img0002.nii.gz"],
    ["RawData/Training/label/label0001.nii.gz"],
    ["img0001", "img0061"],
  ),
  "word": (
    "abdomen",
    ["WORD-V0.1.0/imagesTr/word_0001.nii.gz", "WORD-V0.1.0/imagesVal/word_0101.nii.gz"],
    ["WORD-V0.1.0/imagesTs/word_0121.nii.gz"],
    ["WORD-V0.1.0/labelsTr/word_0001.nii.gz"],
    ["word_0001", "word_0101"],
  ),
  "segthor": (
    "chest",
    ["train/Patient_01/Patient_01.nii.gz", "test/Patient_41.nii.gz"],
    ["train/Patient_02/Patient_02.nii.gz"],
    ["train/Patient_01/GT.nii.gz"],
    ["Patient_01", "Patient_41"],
  ),
  "ct_rate": (
    "chest",
    ["dataset/train/train_1/train_1_a/train_1_a_1.nii.gz", "dataset/valid/valid_7/valid_7_a/valid_7_a_1.nii.gz"],
    ["dataset/train/train_2/train_2_a/train_2_a_1.nii.gz"],
    [
      "dataset/train/train_1/train_1_a/train_1_a_2.nii.gz",  # second reconstruction
      "dataset/train/train_1/train_1_b/train_1_b_1.nii.gz",
    ],  # second scan, same patient
    ["train_1", "valid_7"],
  ),
  "structseg": (
    "head_neck",
    ["HaN_OAR/1/data.nii.gz", "Naso_GTV/12/data.nii.gz"],
    ["HaN_OAR/2/data.nii.gz"],
    ["HaN_OAR/1/label.nii.gz", "Thoracic_OAR/1/data.nii.gz"],
    ["HaN_OAR_1", "Naso_GTV_12"],
  ),
  "instance2022": (
    "head_neck",
    ["train_2/data/001.nii.gz", "train_2/data/100.nii.gz"],
    ["train_2/data/002.nii.gz"],
    ["train_2/label/001.nii.gz"],
    ["001", "100"],
  ),
  "segrap2023": (
    "head_neck",
    [
      "SegRap2023_Training_Set_120cases/segrap_0000/image.nii.gz",
      "SegRap2023_Training_Set_120cases/segrap_0119/image.nii.gz",
    ],
    ["SegRap2023_Training_Set_120cases/segrap_0001/image.nii.gz"],
    [
      "SegRap2023_Training_Set_120cases/segrap_0000/image_contrast.nii.gz",
      "SegRap2023_Training_Set_120cases/segrap_0002/image_contrast.nii.gz",
    ],  # 0002: image missing
    ["segrap_0000", "segrap_0119"],
  ),
}


@pytest.mark.parametrize("dataset", sorted(FLAT))
def test_recipe_on_a_miniature_of_the_published_layout(tmp_path, dataset):
  region, good, broken, ignored, patients = FLAT[dataset]
  root = tmp_path / "root"
  _layout_flat(root, good, broken, ignored)
  # a TotalSegmentator output on the wrong grid for the first case: refused with the mask's name
  key = patients[0]
  (tmp_path / "ts").mkdir()
  nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), SMALL_AFFINE), str(tmp_path / "ts" / f"{key}.nii.gz"))
  _, report = _run(tmp_path, dataset, root, mask_dir=str(tmp_path / "ts"))
  reasons = {os.path.relpath(r["image"], root): r["reason"] for r in report["failed"]}
  expect_failed = set(broken) | (
    {"SegRap2023_Training_Set_120cases/segrap_0002/image.nii.gz"} if dataset == "segrap2023" else set()
  )
  good_with_bad_mask = good[:1]
  assert set(reasons) == expect_failed | set(good_with_bad_mask), reasons
  for b in broken:
    assert "truncated or corrupt" in reasons[b] or "not a readable NIfTI" in reasons[b], reasons[b]
  for g in good_with_bad_mask:
    assert f"{key}.nii.gz: mask shape (5, 5, 5) does not match image" in reasons[g]
  if dataset == "segrap2023":
    assert "does not exist" in reasons["SegRap2023_Training_Set_120cases/segrap_0002/image.nii.gz"]
  records = store.read_records(str(tmp_path / "out"))
  assert len(records) == len(good) - len(good_with_bad_mask)
  assert {r["region"] for r in records} == {region}
  assert all(r["id"].startswith(dataset + "-") and r["dataset"] == dataset for r in records)  # one store, many sets
  assert {r["patient"] for r in records} <= {f"{dataset}/{p}" for p in patients}
  rows = _manifest(tmp_path, dataset)
  assert {os.path.relpath(r["image"], root) for r in rows} == set(good) | expect_failed
  assert {r["patient"] for r in rows} >= {f"{dataset}/{p}" for p in patients}
  assert all(r["split"] in ("train", "val", "test") and r["dataset"] == dataset for r in rows)


def test_empty_root_is_one_clear_error(tmp_path):
  (tmp_path / "root").mkdir()
  with pytest.raises(FileNotFoundError, match="no amos22 cases found in the published layout"):
    _run(tmp_path, "amos22", tmp_path / "root")
  with pytest.raises(ValueError, match="choose one of"):
    _run(tmp_path, "lits", tmp_path / "root")


def test_ct_rate_subset_is_stable_and_one_volume_per_patient(tmp_path):
  root = tmp_path / "root"
  for i in range(1, 13):
    for scan in ("a", "b"):
      _ct(root / f"dataset/train/train_{i}/train_{i}_{scan}/train_{i}_{scan}_1.nii.gz")
  from meddiff_jax.configs import prepare as prepare_config

  c = prepare_config.get_config()
  c.update(input_dir=str(root), dataset="ct_rate", max_volumes=5)
  first = recipes.ct_rate(str(root), c)
  assert len(first) == 5 and len({x.patient for x in first}) == 5
  assert all(x.image.endswith("_a_1.nii.gz") for x in first)
  for i in range(13, 20):  # more patients arrive: the chosen ones are either kept or displaced, never reshuffled
    _ct(root / f"dataset/train/train_{i}/train_{i}_a/train_{i}_a_1.nii.gz")
  later = {x.patient for x in recipes.ct_rate(str(root), c)}
  full_order = sorted(
    (f"train_{i}" for i in range(1, 20)), key=lambda p: __import__("hashlib").sha256(p.encode()).hexdigest()
  )
  assert later == set(full_order[:5])


# ------------------------------------------------------------------- whole-body datasets: split by landmarks


def test_totalsegmentator_recipe_splits_whole_body_scans_by_their_shipped_masks(tmp_path):
  root = tmp_path / "root" / "Totalsegmentator_dataset_v201"
  for sid in ("s0001", "s0002"):
    _whole_body_ct(root / sid / "ct.nii.gz")
    _ts_folder(root / sid / "segmentations")
  _ts_folder(root / "s0003" / "segmentations")  # ct.nii.gz missing
  _broken(root / "s0004" / "ct.nii.gz")
  _ts_folder(root / "s0004" / "segmentations")
  (root / "meta.csv").write_text("image_id;age;gender;institute;study_type;split\ns0001;60;m;A;ct;train\n")
  _, report = _run(tmp_path, "totalsegmentator", tmp_path / "root", spacing=(10.0, 10.0, 10.0))
  reasons = {os.path.basename(os.path.dirname(r["image"])): r["reason"] for r in report["failed"]}
  assert set(reasons) == {"s0003", "s0004"}
  assert "does not exist" in reasons["s0003"] and "not a readable NIfTI" in reasons["s0004"]
  records = store.read_records(str(tmp_path / "out"))
  by_case = {}
  for r in records:
    by_case.setdefault(r["patient"], set()).add(r["region"])
  assert by_case == {
    "totalsegmentator/s0001": {"head_neck", "chest", "abdomen"},
    "totalsegmentator/s0002": {"head_neck", "chest", "abdomen"},
  }
  for r in records:  # the combined per-class masks reach the store: lung voxels are in the chest crop
    if r["region"] == "chest":
      labels = np.load(tmp_path / "out" / r["labels"])
      assert (labels == 12).any()


def test_autopet_recipe_both_layouts_with_totalsegmentator_outputs(tmp_path):
  root = tmp_path / "root" / "FDG-PET-CT-Lesions"
  study = "08-12-2005-NA-PET-CT Ganzkoerper  primaer mit KM-10445"
  _whole_body_ct(root / "PETCT_0af7ffe12a" / study / "CT.nii.gz")
  _ct(root / "PETCT_0af7ffe12a" / study / "PET.nii.gz")
  (root / "PETCT_1285b86bea" / "02-24-2006-NA-PET-CT Ganzkoerper  primaer mit KM-12345").mkdir(parents=True)  # no CT
  nn = tmp_path / "root" / "autoPET-III" / "imagesTr"
  _whole_body_ct(nn / "fdg_3b2f0e8e9c_05-02-2002_0000.nii.gz")
  _ct(nn / "fdg_3b2f0e8e9c_05-02-2002_0001.nii.gz")  # PET channel: not an image for us
  _whole_body_ct(nn / "fdg_77aa55bb00_01-01-2001_0000.nii.gz")  # no TotalSegmentator output: refused
  ts = tmp_path / "ts"
  _ts_label_map(ts / "PETCT_0af7ffe12a_0.nii.gz")
  _ts_folder(ts / "fdg_3b2f0e8e9c_05-02-2002")
  _, report = _run(tmp_path, "autopet", tmp_path / "root", mask_dir=str(ts), spacing=(10.0, 10.0, 10.0))
  reasons = {os.path.basename(r["image"]): r["reason"] for r in report["failed"]}
  assert set(reasons) == {"CT.nii.gz", "fdg_77aa55bb00_01-01-2001_0000.nii.gz"}
  assert "does not exist" in reasons["CT.nii.gz"]
  assert "no region given and no TotalSegmentator mask" in reasons["fdg_77aa55bb00_01-01-2001_0000.nii.gz"]
  patients = {r["patient"] for r in store.read_records(str(tmp_path / "out"))}
  assert patients == {"autopet/PETCT_0af7ffe12a", "autopet/fdg_3b2f0e8e9c"}
  assert len(store.read_records(str(tmp_path / "out"))) == 6


def test_folder_recipe_own_scans_with_a_totalsegmentator_output_folder(tmp_path):
  scans, ts = tmp_path / "root", tmp_path / "ts"
  _whole_body_ct(scans / "a.nii.gz")
  _whole_body_ct(scans / "b.nii.gz")
  _ct(scans / "c.nii.gz")
  _broken(scans / "d.nii.gz")
  _ts_label_map(ts / "a.nii.gz")
  _ts_folder(ts / "b")
  _, report = _run(tmp_path, "folder", scans, mask_dir=str(ts), spacing=(10.0, 10.0, 10.0))
  reasons = {os.path.basename(r["image"]): r["reason"] for r in report["failed"]}
  assert set(reasons) == {"c.nii.gz", "d.nii.gz"}
  assert "c.nii.gz: no region given and no TotalSegmentator mask" in reasons["c.nii.gz"]
  records = store.read_records(str(tmp_path / "out"))
  assert sorted((r["patient"], r["region"]) for r in records) == sorted(
    (f"folder/{p}.nii.gz", g) for p in "ab" for g in ("head_neck", "chest", "abdomen")
  )
  # own scans with a region: no masks needed
  _, report = _run(tmp_path, "folder", scans, default_region="chest", overwrite=True)
  assert {os.path.basename(r["image"]) for r in report["prepared"]} == {"a.nii.gz", "b.nii.gz", "c.nii.gz"}


def _marked_ct(shape=(10, 12, 8)) -> np.ndarray:
  """HU (x, y, z): air, a soft-tissue block, and one 1000 HU marker voxel off every symmetry axis."""
  hu = np.full(shape, -1000, np.int16)
  hu[2:8, 2:10, 1:7] = 40
  hu[6, 3, 2] = 1000
  return hu


MARKER = (6, 3, 2)


def _dicom_series(folder: pathlib.Path, hu: np.ndarray, spacing=(8.0, 8.0, 8.0), origin=(-40.0, -30.0, 100.0)):
  """A CT series as a scanner writes it (pydicom): axial slices, LPS, IPP = centre of the first voxel of each
  slice, stored value = HU + 1024 (RescaleIntercept -1024), InstanceNumber running against z."""
  from pydicom.dataset import FileDataset, FileMetaDataset
  from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

  folder.mkdir(parents=True, exist_ok=True)
  study, series = generate_uid(), generate_uid()
  nx, ny, nz = hu.shape
  for k in range(nz):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"i{k:04d},0000b.dcm"  # CHAOS file names
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", "anon", study, series
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
    ds.PixelSpacing = [spacing[1], spacing[0]]  # (between rows: y, between columns: x)
    ds.SliceThickness, ds.InstanceNumber = spacing[2], nz - k
    ds.Rows, ds.Columns = ny, nx
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = (hu[:, :, k].T.astype(np.int32) + 1024).astype(np.uint16).tobytes()  # rows = y, columns = x
    ds.save_as(str(path), enforce_file_format=True)


def _nrrd(path: pathlib.Path, hu: np.ndarray, spacing=(8.0, 8.0, 8.0), origin=(-40.0, -30.0, 100.0), compress=True):
  """An NRRD as SimpleITK writes it: LPS world, identity direction."""
  import SimpleITK as sitk

  path.parent.mkdir(parents=True, exist_ok=True)
  img = sitk.GetImageFromArray(hu.transpose(2, 1, 0))  # ITK arrays are (z, y, x)
  img.SetSpacing(spacing)
  img.SetOrigin(origin)
  sitk.WriteImage(img, str(path), useCompression=compress)


def _stored(out: pathlib.Path, record: dict) -> np.ndarray:
  prepared = store.PreparedStore(str(out))
  return np.asarray(prepared.load([r["id"] for r in prepared.records].index(record["id"]))[0])


def _stored_marker_world(out: pathlib.Path, record: dict) -> np.ndarray:
  """RAS world position of the stored volume's bright marker (from the stored array and affine)."""
  (ijk,) = np.argwhere(_stored(out, record) > 500)
  affine = np.asarray(record["affine"])
  return affine[:3, :3] @ ijk + affine[:3, 3]


def test_chaos_recipe_prepares_dicom_series(tmp_path):
  """CHAOS as published: one DICOM series folder per CT case, MR beside it; one truncated slice, one empty case."""
  pytest.importorskip("pydicom")
  root = tmp_path / "root"
  hu = _marked_ct()
  _dicom_series(root / "CHAOS_Train_Sets/Train_Sets/CT/1/DICOM_anon", hu)
  _dicom_series(root / "CHAOS_Test_Sets/Test_Sets/CT/3/DICOM_anon", hu, origin=(0.0, 0.0, -50.0))
  broken = root / "CHAOS_Train_Sets/Train_Sets/CT/2/DICOM_anon"
  _dicom_series(broken, hu)
  (broken / "i0003,0000b.dcm").write_bytes((broken / "i0003,0000b.dcm").read_bytes()[:-100])  # pixel data cut
  (root / "CHAOS_Train_Sets/Train_Sets/CT/4/DICOM_anon").mkdir(parents=True)  # a case folder without its files
  mr = root / "CHAOS_Train_Sets/Train_Sets/MR/1/T1DUAL/DICOM_anon/InPhase"
  _dicom_series(mr, hu)  # (CT-tagged, but under MR/: the layout says MRI, the recipe never reads it)
  _, report = _run(tmp_path, "chaos", root)
  reasons = {os.path.relpath(r["image"], root): r["reason"] for r in report["failed"]}
  assert set(reasons) == {"CHAOS_Train_Sets/Train_Sets/CT/2/DICOM_anon", "CHAOS_Train_Sets/Train_Sets/CT/4/DICOM_anon"}
  assert "cannot decode pixels of i0003,0000b.dcm" in reasons["CHAOS_Train_Sets/Train_Sets/CT/2/DICOM_anon"]
  assert "no CT DICOM series in this folder" in reasons["CHAOS_Train_Sets/Train_Sets/CT/4/DICOM_anon"]
  records = {r["patient"]: r for r in store.read_records(str(tmp_path / "out"))}
  assert set(records) == {"chaos/train_1", "chaos/test_3"}
  assert {r["region"] for r in records.values()} == {"abdomen"}
  # geometry by hand (DICOM PS3.3 C.7.6.2.1.1): the marker at column 6, row 3 of the slice k=2 sits at LPS
  # IPP_k + 6 * 8 * (1,0,0) + 3 * 8 * (0,1,0); RAS negates x and y. File names run with z but InstanceNumber
  # against it: slices placed in InstanceNumber order would put the marker 24 mm off.
  for patient, origin in (("chaos/train_1", (-40.0, -30.0, 100.0)), ("chaos/test_3", (0.0, 0.0, -50.0))):
    lps = np.array(origin) + np.array(MARKER) * 8.0
    np.testing.assert_allclose(
      _stored_marker_world(tmp_path / "out", records[patient]), [-lps[0], -lps[1], lps[2]], atol=1e-3
    )
  stored = _stored(tmp_path / "out", records["chaos/train_1"])
  assert stored.shape == hu.shape and sorted(np.unique(stored)) == [-1000, 40, 1000]  # rescale intercept applied
  np.testing.assert_array_equal(stored, hu[::-1, ::-1, :])  # RAS voxel order: x and y reversed from LPS
  rows = _manifest(tmp_path, "chaos")
  assert {r["patient"] for r in rows} == {"chaos/train_1", "chaos/train_2", "chaos/test_3", "chaos/train_4"}


def test_hanseg_recipe_prepares_nrrd(tmp_path):
  """HaN-Seg as published: case_XX_IMG_CT.nrrd beside the MR and the OAR .seg.nrrd; one truncated CT, one missing."""
  pytest.importorskip("SimpleITK")
  root = tmp_path / "root" / "HaN-Seg"
  hu = _marked_ct()
  _nrrd(root / "set_1/case_01/case_01_IMG_CT.nrrd", hu)
  _nrrd(root / "set_1/case_01/case_01_IMG_MR_T1.nrrd", np.zeros((4, 4, 4), np.int16))
  _nrrd(root / "set_1/case_01/case_01_OAR_Brainstem.seg.nrrd", (hu > 0).astype(np.uint8))
  _nrrd(root / "set_1/case_02/case_02_IMG_CT.nrrd", hu, origin=(10.0, -20.0, 5.0))
  broken = root / "set_1/case_03/case_03_IMG_CT.nrrd"
  _nrrd(broken, hu, compress=False)
  broken.write_bytes(broken.read_bytes()[:-300])  # raw data shorter than the header says
  _nrrd(root / "set_1/case_04/case_04_IMG_MR_T1.nrrd", np.zeros((4, 4, 4), np.int16))  # the CT is missing
  _, report = _run(tmp_path, "hanseg", tmp_path / "root")
  reasons = {os.path.basename(r["image"]): r["reason"] for r in report["failed"]}
  assert set(reasons) == {"case_03_IMG_CT.nrrd", "case_04_IMG_CT.nrrd"}, reasons
  assert "truncated or corrupt data" in reasons["case_03_IMG_CT.nrrd"]
  assert "does not exist" in reasons["case_04_IMG_CT.nrrd"]
  records = {r["patient"]: r for r in store.read_records(str(tmp_path / "out"))}
  assert set(records) == {"hanseg/case_01", "hanseg/case_02"}
  assert {r["region"] for r in records.values()} == {"head_neck"}
  for patient, origin in (("hanseg/case_01", (-40.0, -30.0, 100.0)), ("hanseg/case_02", (10.0, -20.0, 5.0))):
    lps = np.array(origin) + np.array(MARKER) * 8.0  # ITK: origin + spacing * index (identity direction), LPS
    np.testing.assert_allclose(
      _stored_marker_world(tmp_path / "out", records[patient]), [-lps[0], -lps[1], lps[2]], atol=1e-3
    )
  stored = _stored(tmp_path / "out", records["hanseg/case_01"])
  np.testing.assert_array_equal(stored, hu[::-1, ::-1, :])


# ----------------------------------------------------------------------------------------- splits


def test_patient_split_is_about_90_5_5_deterministic_and_seeded():
  ids = [f"ds/p{i}" for i in range(20000)]
  splits = [recipes.assign_split(p) for p in ids]
  counts = {s: splits.count(s) / len(ids) for s in ("train", "val", "test")}
  # binomial sd at n=20000: 0.2% (train) / 0.15% (val, test); 4 sd tolerance
  assert counts["train"] == pytest.approx(0.90, abs=0.009)
  assert counts["val"] == pytest.approx(0.05, abs=0.006) and counts["test"] == pytest.approx(0.05, abs=0.006)
  assert splits == [recipes.assign_split(p) for p in ids]
  other = [recipes.assign_split(p, seed=1) for p in ids]
  assert 0.1 < np.mean([a != b for a, b in zip(splits, other)]) < 0.3  # a new seed reshuffles
  with pytest.raises(ValueError, match="summing to 1"):
    recipes.assign_split("x", 0, (0.9, 0.2, 0.05))


def test_adding_a_dataset_never_moves_existing_patients(tmp_path):
  root = tmp_path / "root"
  for i in range(30):
    _ct(root / f"WORD-V0.1.0/imagesTr/word_{i:04d}.nii.gz")
  from meddiff_jax.configs import prepare as prepare_config

  c = prepare_config.get_config()
  c.update(input_dir=str(root), dataset="word")
  before = {k: recipes.job_extras(e, k, str(root), c)["split"] for k, e in recipes.build_manifest(c).items()}
  for i in range(30, 60):
    _ct(root / f"WORD-V0.1.0/imagesTr/word_{i:04d}.nii.gz")
  after = {k: recipes.job_extras(e, k, str(root), c)["split"] for k, e in recipes.build_manifest(c).items()}
  assert all(after[k] == v for k, v in before.items()) and len(after) == 60


def test_training_reads_train_validation_reads_val_and_test_is_never_read(tmp_path):
  for i, split in enumerate(["train", "val", "test", "train", "train", "val"]):
    store.write_record(
      str(tmp_path), f"v{i}", np.full((4, 4, 4), i, np.int16), None, {"region": "chest", "split": split}
    )
  import ml_collections

  cfg = ml_collections.ConfigDict(dict(val_fraction=0.5))
  train, val = pipeline.split_train_val(store.PreparedStore(str(tmp_path)), cfg)
  seen = lambda s: sorted(int(s.load(i)[0][0, 0, 0]) for i in range(len(s)))
  assert seen(train) == [0, 3, 4] and seen(val) == [1, 5]
  os.remove(tmp_path / "v1.json")
  os.remove(tmp_path / "v5.json")
  with pytest.raises(ValueError, match="0 val volumes"):
    pipeline.split_train_val(store.PreparedStore(str(tmp_path)), cfg)
