"""The evaluate command: miniatures of each published layout built from phantoms (read, scored, and refused
with one-line errors when a file is missing or malformed), the generic CSV, the pluggable extractor and
segmenter, and one slow end-to-end denoising run with the builtin tiny_phantom prior."""

import json
import os
import sys

import numpy as np
import pytest
from conftest import override, run_main

from meddiff_jax import checks
from meddiff_jax.configs import evaluate as evaluate_config
from meddiff_jax.data import nifti, phantom, preprocess, volume_io, volumes
from meddiff_jax.evaluation import extractors, frechet, segmenters
from meddiff_jax.protocols import adapters, datasets, evaluate

SHAPE, SPACING = (24, 24, 20), (12.0, 12.0, 12.0)


def _config(**kw):
  return override(evaluate_config.get_config(), **kw)


def _phantom(seed, region="abdomen", lesions=0, shape=SHAPE, spacing=SPACING):
  return phantom.make_phantom(shape, spacing, region, seed=seed, num_lesions=lesions, noise_hu=2.0)


def _write_dicom_series(directory, hu, spacing, origin=(0.0, 0.0, 0.0)):
  """Axial slices in DICOM LPS: row direction +x (L), column direction +y (P), slices along +z."""
  pydicom = pytest.importorskip("pydicom")  # the `evaluate` extra
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid

  os.makedirs(directory, exist_ok=True)
  series = generate_uid()
  # RAS array (x: right, y: anterior) -> LPS image rows/cols: column index c runs along L = -x, row r along P = -y
  for k in range(hu.shape[2]):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid(), series
    ds.Modality = "CT"
    pixels = np.clip(np.round(hu[::-1, ::-1, k].T + 1024), 0, 4095).astype(np.uint16)  # (rows = -y, cols = -x)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [spacing[1], spacing[0]]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
    ds.InstanceNumber = hu.shape[2] - k  # runs against z: the reader must sort by position
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    pydicom.dcmwrite(os.path.join(directory, f"slice{k:03d}.IMA"), ds, enforce_file_format=True)


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


# -------------------------------------------------------------------------------------------- generic CSV


def _denoising_csv(tmp_path, n=2):
  rows = ["id,low,high"]
  for i in range(n):
    p = _phantom(i)
    noisy = p.hu + np.random.default_rng(i).normal(0, 40, p.hu.shape).astype(np.float32)
    nifti.save(volumes.Volume(p.hu, p.affine), tmp_path / f"high{i}.nii.gz")
    nifti.save(volumes.Volume(noisy, p.affine), tmp_path / f"low{i}.nii.gz")
    rows.append(f"case{i},low{i}.nii.gz,{tmp_path}/high{i}.nii.gz")  # relative and absolute paths
  (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
  return str(tmp_path / "pairs.csv")


def test_csv_is_read_and_denoising_baselines_scored(tmp_path):
  csv = _denoising_csv(tmp_path)
  cases = datasets.read_cases(_config(pairs=csv))
  assert [c.id for c in cases] == ["case0", "case1"]
  assert cases[0].paths["low"] == str(tmp_path / "low0.nii.gz")
  out = evaluate.run(_config(pairs=csv, skip_model=True), str(tmp_path / "w"))
  res = _results(tmp_path / "w")
  assert res["aggregate"]["window_hu"] == [-120.0, 240.0] and res["aggregate"]["data_range"] == 360.0
  low = res["cases"][0]["metrics"]["low-dose input"]
  assert low["ssim_2d_gain"] == 0.0
  # the stored number is the metric of the stored inputs, recomputed here independently
  from skimage.metrics import peak_signal_noise_ratio

  ref = np.clip(volume_io.load(tmp_path / "high0.nii.gz").data, -120, 240)
  img = np.clip(volume_io.load(tmp_path / "low0.nii.gz").data, -120, 240)
  assert low["psnr"] == pytest.approx(peak_signal_noise_ratio(ref, img, data_range=360.0), rel=1e-9)
  assert "non-local means" in out["table"] and res["config"]["protocol"] == "denoising"


@pytest.mark.parametrize(
  "content,match",
  [
    ("low,high\nmissing.nii.gz,x.nii.gz\n", "line 2: column 'low'.*does not exist"),
    ("noisy,clean\na,b\n", "header must have columns"),
    ("low,high\n", "no rows"),
  ],
)
def test_csv_errors_are_one_line(tmp_path, content, match):
  (tmp_path / "p.csv").write_text(content)
  with pytest.raises(datasets.DatasetError, match=match) as e:
    datasets.read_cases(_config(pairs=str(tmp_path / "p.csv")))
  assert "\n" not in str(e.value)


def test_anomaly_csv_labels_and_malformed_flag(tmp_path):
  p = _phantom(0)
  nifti.save(volumes.Volume(p.hu, p.affine), tmp_path / "a.nii.gz")
  (tmp_path / "ok.csv").write_text("image,label,is_abnormal\na.nii.gz,,0\na.nii.gz,,true\n")
  cases = datasets.read_cases(_config(protocol="anomaly", pairs=str(tmp_path / "ok.csv")))
  assert [c.is_abnormal for c in cases] == [0, 1] and "label" not in cases[0].paths
  (tmp_path / "bad.csv").write_text("image,label,is_abnormal\na.nii.gz,,maybe\n")
  with pytest.raises(datasets.DatasetError, match="line 2: is_abnormal must be 0/1"):
    datasets.read_cases(_config(protocol="anomaly", pairs=str(tmp_path / "bad.csv")))
  with pytest.raises(datasets.DatasetError, match="exactly one"):
    datasets.read_cases(_config())


# ------------------------------------------------------------------------------------------------- Mayo 2016


def test_mayo2016_layout_dicom_round_trip_and_errors(tmp_path):
  root = tmp_path / "mayo"
  truth = {}
  sp = (10.0, 12.0, 14.0)  # anisotropic: a row/column spacing swap would show
  for i, pid in enumerate(("L067", "L096")):
    p = _phantom(i, shape=(20, 18, 6))
    truth[pid] = p.hu
    noisy = p.hu + np.random.default_rng(i).normal(0, 40, p.hu.shape)
    _write_dicom_series(root / pid / "full_3mm", p.hu, sp)
    _write_dicom_series(root / pid / "quarter_3mm", noisy, sp)
  cases = datasets.read_cases(_config(dataset="mayo2016", data_root=str(root)))
  assert [c.id for c in cases] == ["L067", "L096"]
  vol = datasets.load_volume(cases[0].paths["high"])
  # RAS orientation and HU survive DICOM (LPS, rescale, reversed InstanceNumber): voxels equal the phantom's
  np.testing.assert_allclose(vol.data, np.clip(np.round(truth["L067"]), -1024, 3071), atol=0.5)
  assert vol.spacing == pytest.approx(sp)
  evaluate.run(_config(dataset="mayo2016", data_root=str(root), skip_model=True), str(tmp_path / "w"))
  assert len(_results(tmp_path / "w")["cases"]) == 2
  # missing: a patient without full-dose scans
  os.makedirs(root / "L109" / "quarter_3mm")
  with pytest.raises(datasets.DatasetError, match="L109/full_3mm: missing"):
    datasets.read_cases(_config(dataset="mayo2016", data_root=str(root)))
  # malformed: a series with one readable slice
  (root / "L109" / "full_3mm").mkdir()
  (root / "L109" / "quarter_3mm" / "x.IMA").write_bytes(b"not dicom")
  with pytest.raises(volumes.VolumeError, match="quarter_3mm: no CT DICOM series"):
    datasets.load_volume(str(root / "L109" / "quarter_3mm"))


def test_dicom_reader_puts_voxels_where_dcm2niix_does(real_data_dir):
  """Independent reference: TotalSegmentator labels of the real DICOM series on dcm2niix's grid (LAS)."""
  pytest.importorskip("pydicom")
  try:
    vol = volume_io.load(str(real_data_dir / "example_ct_dicom"))  # JPEG 2000: needs pylibjpeg
  except volumes.VolumeError as e:
    pytest.skip(f"no JPEG 2000 decoder: {e}")
  seg = volume_io.load(real_data_dir / "example_seg_dicom.nii.gz", is_mask=True)
  assert vol.shape == seg.shape
  np.testing.assert_allclose(vol.affine, seg.affine, atol=1e-3)
  liver = seg.data == phantom.LABELS["liver"]
  assert liver.sum() > 1000 and 40 < vol.data[liver].mean() < 160  # contrast-enhanced liver in HU
  assert vol.data[seg.data == 0].mean() < -300  # background mostly air


# ------------------------------------------------------------------------------------------------ BMAD liver


def _png(path, arr):
  from PIL import Image

  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr.astype(np.uint8)).save(path)


def _bmad(root):
  for i in range(3):
    p = _phantom(10 + i, lesions=2 if i else 0, shape=(24, 24, 12))
    assert p.lesions.any() or not i
    k = int(np.argmax(p.lesions.sum(axis=(0, 1)))) if p.lesions.any() else 6
    grey = (preprocess.hu_to_unit(p.hu[:, :, k], "abdomen") + 1) * 127.5
    _png(f"{root}/test/good/img/{i:03d}.png", grey.T)
    les = p.lesions[:, :, k]
    if les.any():
      _png(f"{root}/test/Ungood/img/{i:03d}.png", grey.T)
      _png(f"{root}/test/Ungood/label/{i:03d}.png", les.T * 255)


def test_bmad_liver_layout_anomaly_protocol_and_errors(tmp_path):
  root = str(tmp_path / "Liver")
  _bmad(root)
  cfg = _config(protocol="anomaly", dataset="bmad_liver", data_root=root, skip_model=True, png_depth=8)
  cases = datasets.read_cases(cfg)
  assert {c.is_abnormal for c in cases} == {0, 1} and all("label" in c.paths for c in cases if c.is_abnormal)
  vol = datasets.load_volume(cases[0].paths["image"], png_depth=8)
  assert vol.shape == (24, 24, 8) and vol.data.min() == -1024.0 and vol.data.max() <= 240.0 + 1e-3
  evaluate.run(cfg, str(tmp_path / "w"))
  agg = _results(tmp_path / "w")["aggregate"]["no-prior residual"]
  assert set(agg) == {"volume", "slice", "pixel"} and agg["pixel"]["n_positive"] > 0
  # missing label of an abnormal slice
  first = sorted(os.listdir(f"{root}/test/Ungood/label"))[0]
  os.remove(f"{root}/test/Ungood/label/{first}")
  with pytest.raises(datasets.DatasetError, match="label missing for abnormal slice"):
    datasets.read_cases(cfg)
  # malformed PNG
  with open(f"{root}/test/good/img/000.png", "wb") as f:
    f.write(b"\x89PNG garbage")
  with pytest.raises(volumes.VolumeError, match="000.png: not a readable PNG"):
    datasets.load_volume(f"{root}/test/good/img/000.png")


# ------------------------------------------------------------------------------------------------- RPLHR-CT


def test_rplhr_ct_layout_super_resolution_reference_rows_and_errors(tmp_path):
  root = tmp_path / "RPLHR"
  for i in range(2):
    p = _phantom(20 + i, region="chest", shape=(20, 20, 25), spacing=(12.0, 12.0, 3.0))
    thin = volumes.Volume(p.hu, p.affine)
    thick = volumes.resample(thin, (12.0, 12.0, 15.0), order=1)
    nifti.save(thin, root / "test" / "1mm" / f"case{i}.nii.gz")
    nifti.save(thick, root / "test" / "5mm" / f"case{i}.nii.gz")
  cfg = _config(protocol="super_resolution", dataset="rplhr_ct", data_root=str(root), skip_model=True)
  assert [c.id for c in datasets.read_cases(cfg)] == ["case0", "case1"]
  evaluate.run(cfg, str(tmp_path / "w"))
  agg = _results(tmp_path / "w")["aggregate"]
  assert agg["window_hu"] == [-1400.0, 400.0]  # chest window by default
  assert agg["cubic"]["psnr"]["mean"] > 10 and agg["trilinear"]["psnr"]["n"] == 2
  (root / "test" / "1mm" / "case1.nii.gz").write_bytes(b"\x1f\x8b truncated")
  with pytest.raises(volumes.VolumeError, match="case1.nii.gz: not a readable NIfTI"):
    evaluate.run(cfg, str(tmp_path / "w2"))
  os.remove(root / "test" / "1mm" / "case1.nii.gz")
  with pytest.raises(datasets.DatasetError, match="thin-slice partner"):
    datasets.read_cases(cfg)


# ------------------------------------------------------------------------------------------------------- MSD


def _msd(root, task, n=5):
  entries = []
  prefix = "liver" if "Liver" in task else "lung"
  for i in range(n):
    p = _phantom(30 + i, region="abdomen" if "Liver" in task else "chest", lesions=1)
    lab = np.zeros(p.hu.shape, np.uint8)
    if "Liver" in task:
      lab[p.labels == phantom.LABELS["liver"]] = 1
      lab[p.lesions > 0] = 2
    else:
      lab[p.lesions > 0] = 1
    nifti.save(volumes.Volume(p.hu, p.affine), f"{root}/{task}/imagesTr/{prefix}_{i}.nii.gz")
    nifti.save(volumes.Volume(lab, p.affine), f"{root}/{task}/labelsTr/{prefix}_{i}.nii.gz")
    entries.append({"image": f"./imagesTr/{prefix}_{i}.nii.gz", "label": f"./labelsTr/{prefix}_{i}.nii.gz"})
  with open(f"{root}/{task}/dataset.json", "w") as f:
    json.dump({"name": task, "training": entries, "test": []}, f)


@pytest.mark.parametrize("task,dataset", [("Task03_Liver", "msd_task03_liver"), ("Task06_Lung", "msd_task06_lung")])
def test_msd_layout_split_lesion_protocol_and_errors(tmp_path, task, dataset):
  root = str(tmp_path / "msd")
  _msd(root, task)
  cfg = _config(protocol="lesion", dataset=dataset, data_root=root, skip_model=True)
  test = datasets.read_cases(cfg)
  train = datasets.read_cases(_config(protocol="lesion", dataset=dataset, data_root=root, split="train"))
  assert len(test) == 1 and len(train) == 4 and not {c.id for c in test} & {c.id for c in train}
  assert test[0].mask_labels == ((2,) if "Liver" in task else (1,))
  evaluate.run(cfg, str(tmp_path / "w"))
  res = _results(tmp_path / "w")
  # nothing generated: the threshold segmentation of the unchanged scan finds no lesion
  assert res["cases"][0]["metrics"]["input scan (no change)"]["dice"] == 0.0
  # malformed dataset.json, then a listed label missing
  with open(f"{root}/{task}/dataset.json", "w") as f:
    f.write("{not json")
  with pytest.raises(datasets.DatasetError, match="dataset.json: not an MSD dataset.json"):
    datasets.read_cases(cfg)
  os.remove(f"{root}/{task}/dataset.json")
  os.remove(sorted(__import__("glob").glob(f"{root}/{task}/labelsTr/*.nii.gz"))[0])
  with pytest.raises(datasets.DatasetError, match="missing"):
    datasets.read_cases(cfg)


# ------------------------------------------------------------------------------------------ TCIA lymph nodes


def test_tcia_lymph_nodes_layout_nifti_and_dicom_and_errors(tmp_path):
  root = tmp_path / "ln"
  for i, pid in enumerate(("MED_LYMPH_001", "MED_LYMPH_002", "ABD_LYMPH_001")):
    p = _phantom(40 + i, region="chest", lesions=1, shape=(20, 18, 6))
    if i == 1:  # as downloaded from TCIA: DICOM nested in study / series folders
      _write_dicom_series(root / "CT Lymph Nodes" / pid / "study" / "series", p.hu, SPACING)
      vol = volume_io.load(str(root / "CT Lymph Nodes" / pid / "study" / "series"))
      affine = vol.affine
    else:
      nifti.save(volumes.Volume(p.hu, p.affine), root / "images" / f"{pid}.nii.gz")
      affine = p.affine
    nifti.save(volumes.Volume(p.lesions, affine), root / "MED_ABD_LYMPH_MASKS" / pid / f"{pid}_mask.nii.gz")
  cfg = _config(protocol="inpainting", dataset="tcia_lymph_nodes", data_root=str(root), split="all", skip_model=True)
  cases = datasets.read_cases(cfg)
  assert [c.id for c in cases] == ["MED_LYMPH_001", "MED_LYMPH_002"]  # the MED subset by default
  assert os.path.isdir(cases[1].paths["image"])
  evaluate.run(cfg, str(tmp_path / "w"))
  assert len(_results(tmp_path / "w")["cases"]) + len(_results(tmp_path / "w")["aggregate"]["skipped"]) == 2
  os.remove(root / "images" / "MED_LYMPH_001.nii.gz")
  with pytest.raises(datasets.DatasetError, match="MED_LYMPH_001: CT missing"):
    datasets.read_cases(cfg)


# ------------------------------------------------------------------------------- synthesis plug-ins (FID, Dice)


def _synthesis_csv(tmp_path, n=3):
  rows = ["id,image,labels"]
  for i in range(n):
    p = _phantom(50 + i)
    nifti.save(volumes.Volume(p.hu, p.affine), tmp_path / f"ct{i}.nii.gz")
    nifti.save(volumes.Volume(p.labels, p.affine), tmp_path / f"lab{i}.nii.gz")
    rows.append(f"s{i},ct{i}.nii.gz,lab{i}.nii.gz")
  (tmp_path / "syn.csv").write_text("\n".join(rows) + "\n")
  return str(tmp_path / "syn.csv")


def test_synthesis_with_a_random_flax_extractor_and_a_predictions_folder(tmp_path):
  csv = _synthesis_csv(tmp_path)
  ext_dir = extractors.init_random_extractor(str(tmp_path / "ext"), widths=(4, 8))
  preds = tmp_path / "preds"
  preds.mkdir()
  for i in range(3):  # the "segmenter" returns the conditioning labels of real images, so Dice must be 1
    lab = volume_io.load(tmp_path / f"lab{i}.nii.gz", is_mask=True)
    nifti.save(lab, preds / f"s{i}_real.nii.gz")
  cfg = _config(protocol="synthesis", pairs=csv, skip_model=True, extractor=ext_dir, segmenter=f"predictions:{preds}")
  evaluate.run(cfg, str(tmp_path / "w"))
  agg = _results(tmp_path / "w")["aggregate"]["real images (reference)"]
  assert agg["dice"]["mean"] == pytest.approx(1.0)
  assert agg["frechet_distance"] == pytest.approx(0.0, abs=1e-6)  # real vs itself
  # the network really runs: features differ across cases and depend on the image
  ext = extractors.Extractor(ext_dir)
  f0 = ext("a", volume_io.load(tmp_path / "ct0.nii.gz").data)
  f1 = ext("b", volume_io.load(tmp_path / "ct1.nii.gz").data)
  assert f0.shape == (8,) and not np.allclose(f0, f1)


def test_user_features_give_the_frechet_distance_of_those_features(tmp_path):
  rng = np.random.default_rng(0)
  feats = tmp_path / "feats"
  feats.mkdir()
  real, gen = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)) + 1
  for i in range(4):
    np.save(feats / f"c{i}.npy", real[i])
    np.save(feats / f"c{i}_generated.npy", gen[i])
  ext = extractors.Extractor(f"features:{feats}")
  got = np.stack([ext(f"c{i}", None) for i in range(4)])
  got_gen = np.stack([ext(f"c{i}", None, generated=True) for i in range(4)])
  assert frechet.frechet_distance_from_features(got, got_gen) == pytest.approx(
    frechet.frechet_distance_from_features(real, gen)
  )
  with pytest.raises(FileNotFoundError, match="c9.npy: feature file missing"):
    ext("c9", None)


def test_absent_plugins_are_one_line_errors_naming_what_to_provide(tmp_path):
  with pytest.raises(FileNotFoundError, match="--config.extractor=DIR"):
    extractors.Extractor("")
  with pytest.raises(FileNotFoundError, match="extractor.json not found"):
    extractors.Extractor(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="pip install TotalSegmentator") as e:
    if __import__("shutil").which("TotalSegmentator"):
      pytest.skip("TotalSegmentator is installed here")
    segmenters.Segmenter("totalsegmentator")
  assert "\n" not in str(e.value)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    segmenters.Segmenter(f"predictions:{tmp_path}/nope")
  with pytest.raises(FileNotFoundError, match="not found on PATH"):
    segmenters.Segmenter("command:no_such_tool_xyz {input} {output}")
  with pytest.raises(ValueError, match="not understood"):
    segmenters.Segmenter("nnunet")
  csv = _synthesis_csv(tmp_path)
  with pytest.raises(FileNotFoundError, match="no feature extractor configured"):
    evaluate.run(_config(protocol="synthesis", pairs=csv, skip_model=True, segmenter="none"), str(tmp_path / "w"))
  with pytest.raises(ValueError, match="anatomy segmenter"):
    evaluate.run(_config(protocol="synthesis", pairs=csv, skip_model=True, extractor="none"), str(tmp_path / "w"))


def test_command_segmenter_runs_a_tool_on_the_image(tmp_path):
  p = _phantom(60)
  nifti.save(volumes.Volume(p.hu, p.affine), tmp_path / "ct.nii.gz")
  script = tmp_path / "seg.py"
  script.write_text(
    "import sys, nibabel as nib, numpy as np\n"
    "img = nib.load(sys.argv[1]); d = np.asarray(img.dataobj)\n"
    "nib.save(nib.Nifti1Image((d > 0).astype(np.int16), img.affine), sys.argv[2])\n"
  )
  seg = segmenters.Segmenter(f"command:{sys.executable} {script} {{input}} {{output}}")(
    "x", str(tmp_path / "ct.nii.gz")
  )
  np.testing.assert_array_equal(seg, (volume_io.load(tmp_path / "ct.nii.gz").data > 0).astype(np.int16))
  bad = segmenters.Segmenter(f"command:{sys.executable} -c 'raise SystemExit(3)' {{input}} {{output}}")
  with pytest.raises(segmenters.SegmenterError, match="exit 3"):
    bad("x", str(tmp_path / "ct.nii.gz"))


# ----------------------------------------------------------------------------------------------- adapters


def test_adapter_builds_the_task_config_from_shared_options():
  cfg = _config(protocol="denoising", method="partial", num_steps=3, task="lam=5.0;zeta=0.1", overlap=0.0, seed=0)
  t = adapters.task_config("denoising", cfg, input="in.nii.gz", output="out.nii.gz")
  assert t.overlap == 0.0 and t.seed == 0  # zero is a value, not 'unset'
  default = adapters.task_config("denoising", _config())
  assert default.overlap == 0.5 and default.num_steps == 10  # configs/denoise.py's own defaults
  assert (t.method, t.num_steps, t.lam, t.zeta, t.input, t.checkpoint) == (
    "partial",
    3,
    5.0,
    0.1,
    "in.nii.gz",
    "tiny_phantom",
  )
  assert adapters.task_config("inpainting", _config(protocol="inpainting"), input="a").method == "inpaint"
  with pytest.raises(ValueError, match="has no key 'nope'"):
    adapters.task_config("denoising", _config(task="nope=1"))
  with pytest.raises(ValueError, match="KEY=VALUE"):
    adapters.parse_task_options("lam")
  with pytest.raises(FileNotFoundError, match="not a ControlNet fine-tuning workdir"):
    checks.evaluate(_config(protocol="lesion"))


# ------------------------------------------------------------------------------------------ the command line


def _main(*args):
  return run_main("--config=configs/evaluate.py", *args)


@pytest.mark.slow
def test_command_line_errors_are_one_line(tmp_path):
  proc = _main(f"--workdir={tmp_path}/w", "--config.protocol=denoising", f"--config.pairs={tmp_path}/none.csv")
  assert proc.returncode != 0
  assert "none.csv: pairs CSV does not exist" in proc.stderr and "Traceback" not in proc.stderr
  proc = _main(f"--workdir={tmp_path}/w", "--config.protocol=segmentation", f"--config.pairs={tmp_path}/none.csv")
  assert proc.returncode != 0 and "choose from" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_denoising_protocol_end_to_end_with_the_tiny_prior(tmp_path):
  csv = _denoising_csv(tmp_path, n=1)
  proc = _main(f"--workdir={tmp_path}/w", f"--config.pairs={csv}", "--config.num_steps=4")
  assert proc.returncode == 0, proc.stderr[-2000:]
  res = _results(tmp_path / "w")
  m = res["cases"][0]["metrics"]
  model = m["MedDiff-FM (diffpir)"]
  assert "MedDiff-FM (diffpir)" in proc.stdout and "ΔSSIM vs input" in proc.stdout
  # the prior removes noise: better than the noisy input (an identity 'denoiser' would tie)
  assert model["psnr"] > m["low-dose input"]["psnr"] + 1.0
  assert os.path.isfile(tmp_path / "w" / "cases" / "case0" / "denoised.nii.gz")
  assert res["config"]["num_steps"] == 4


@pytest.mark.parametrize(
  "protocol,keys",
  [
    ("denoising", dict(input="a.nii.gz", output="o.nii.gz", output_int16=False)),
    ("anomaly", dict(input="a.nii.gz", output="o.nii.gz")),
    ("synthesis", dict(output="o.nii.gz", labels="l.nii.gz")),
    ("super_resolution", dict(input="a.nii.gz", output="o.nii.gz", spacing=(1.0, 1.0, 1.0))),
    ("lesion", dict(input="a.nii.gz", mask="m.nii.gz", output="o.nii.gz")),
    ("inpainting", dict(input="a.nii.gz", mask="m.nii.gz", output="o.nii.gz")),
  ],
)
def test_every_protocol_sets_only_keys_its_task_config_has(protocol, keys):
  """The adapter's contract with each task (its config keys): a task rewrite that drops one fails here."""
  cfg = adapters.task_config(protocol, _config(protocol=protocol, region="chest", num_steps=2), **keys)
  assert all(cfg[k] == v for k, v in keys.items()) and cfg.region == "chest" and cfg.num_steps == 2


@pytest.mark.slow
def test_anomaly_protocol_runs_the_anomaly_task_on_bmad_slices(tmp_path):
  """Plumbing of the anomaly adapter with the tiny prior (scores are not meaningful with 2 steps)."""
  root = str(tmp_path / "Liver")
  _bmad(root)
  cfg = _config(
    protocol="anomaly", dataset="bmad_liver", data_root=root, png_depth=16, num_steps=2, overlap=0.0, max_cases=2
  )
  evaluate.run(cfg, str(tmp_path / "w"))
  res = _results(tmp_path / "w")
  case = res["cases"][0]
  amap = volume_io.load(tmp_path / "w" / "cases" / case["id"] / "anomaly_map.nii.gz").data
  assert amap.shape == (24, 24, 16) and amap.max() > 0
  assert case["metrics"]["MedDiff-FM"]["volume_score"] != case["metrics"]["no-prior residual"]["volume_score"]
  assert set(res["aggregate"]["MedDiff-FM"]) == {"volume", "slice", "pixel"}
