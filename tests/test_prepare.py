"""Preparation hygiene: what is found, what is refused, what is reported, and that nothing of the user's is
touched or left running."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import prepare_config, run_main

from meddiff_jax.data import nifti, phantom, prepare, store, volume_io, volumes


def config_for(input_dir, output_dir, **kw):
  # the phantoms carry no TotalSegmentator mask to cut regions from: a default region
  return prepare_config(input_dir, output_dir, **{"spacing": (6.0, 6.0, 6.0), "default_region": "abdomen", **kw})


def write_phantom(path, seed=0, shape=(24, 24, 24)):
  p = phantom.make_phantom(shape, (6.0, 6.0, 6.0), "abdomen", seed=seed)
  nifti.save(volumes.Volume(np.round(p.hu), p.affine), path, np.int16)


def test_dicom_series_and_nifti_found_and_every_other_file_reported(tmp_path, real_data_dir):
  pydicom = pytest.importorskip("pydicom")
  src = tmp_path / "in"
  (src / "patient1").mkdir(parents=True)
  os.symlink(real_data_dir / "example_ct_dicom", src / "patient1" / "ct")
  write_phantom(src / "ph.nii.gz")
  (src / "notes.txt").write_text("hello")
  scout = pydicom.dcmread(sorted((real_data_dir / "example_ct_dicom").iterdir())[0])
  scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
  scout.save_as(src / "scout.dcm")
  report = prepare.run(config_for(src, tmp_path / "out", spacing=(4.0, 4.0, 4.0)))
  assert len(report["prepared"]) == 2, report
  reasons = {os.path.basename(r["path"]): r["reason"] for r in report["not_prepared"]}
  assert reasons == {
    "notes.txt": "unsupported file type (not NIfTI, NRRD/MHA or DICOM)",
    "scout.dcm": "CT localizer (scout) image, not part of a volume",
  }
  records = {r["source"]: r for r in store.read_records(str(tmp_path / "out"))}
  dicom_rec = next(r for s, r in records.items() if "patient1" in s)
  ct = volume_io.load(real_data_dir / "example_ct_dicom")
  # the prepared DICOM volume: 4 mm grid from the same first voxel centre, HU intact
  np.testing.assert_allclose(np.array(dicom_rec["affine"])[:3, 3], ct.affine[:3, 3], atol=1e-6)
  hu = np.load(tmp_path / "out" / dicom_rec["image"])
  assert hu.shape == volumes.target_shape(ct.shape, ct.spacing, (4.0, 4.0, 4.0))
  assert hu.min() >= -1024 and hu.max() > 1000


def test_symlink_loops_visit_each_real_folder_once(tmp_path):
  src = tmp_path / "in"
  (src / "a").mkdir(parents=True)
  (src / "b").mkdir()
  write_phantom(src / "a" / "scan.nii.gz")
  os.symlink("..", src / "a" / "up")  # a loop
  os.symlink("../a", src / "b" / "to_a")  # a second loop through another folder
  os.symlink(src / "b", src / "a" / "to_b")
  t0 = time.perf_counter()
  report = prepare.run(config_for(src, tmp_path / "out"))
  assert time.perf_counter() - t0 < 60
  assert len(report["prepared"]) == 1
  assert len(store.read_records(str(tmp_path / "out"))) == 1


def test_output_dir_refusals_never_touch_user_files(tmp_path):
  src = tmp_path / "in"
  src.mkdir()
  write_phantom(src / "scan.nii.gz")
  (src / "report.json").write_text('{"mine": 1}')
  with pytest.raises(ValueError, match="is the input folder"):
    prepare.run(config_for(src, src))
  with pytest.raises(ValueError, match="contains the input folder"):
    prepare.run(config_for(src, tmp_path))
  with pytest.raises(ValueError, match="lies inside the input folder"):
    prepare.run(config_for(src, src / "out"))
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.json").write_text('{"x": 1}')
  with pytest.raises(ValueError, match="holds files that preparation did not write"):
    prepare.run(config_for(src, foreign))
  assert (src / "report.json").read_text() == '{"mine": 1}'
  assert not (src / "out").exists() and (foreign / "notes.json").read_text() == '{"x": 1}'
  # a folder this command made is fine to resume into
  out = tmp_path / "out"
  assert len(prepare.run(config_for(src, out))["prepared"]) == 1
  assert len(prepare.run(config_for(src, out))["skipped"]) == 1


@pytest.mark.parametrize(
  "name,content,match",
  [
    ("dup.csv", "image,region\nscan.nii.gz,chest\n./scan.nii.gz,abdomen\n", "listed twice \\(rows 2 and 3\\)"),
    ("empty.csv", "image,region\n", "lists no images"),
    ("obj.json", '{"image": "scan.nii.gz"}', "must be a list of objects"),
    ("noimage.csv", "region\nchest\n", "row 2 has no 'image'"),
    ("outside.csv", "image,region\n../elsewhere.nii.gz,chest\n", "outside input_dir .*allow_outside_paths"),
  ],
)
def test_manifest_errors_are_one_line(tmp_path, name, content, match):
  src = tmp_path / "in"
  src.mkdir()
  write_phantom(src / "scan.nii.gz")
  manifest = tmp_path / name
  manifest.write_text(content)
  with pytest.raises(ValueError, match=match) as info:
    prepare.run(config_for(src, tmp_path / "out", manifest=str(manifest)))
  assert "\n" not in str(info.value)


def test_outside_paths_allowed_with_the_override(tmp_path):
  src = tmp_path / "in"
  src.mkdir()
  write_phantom(tmp_path / "elsewhere.nii.gz")
  manifest = tmp_path / "m.csv"
  manifest.write_text("image,region\n../elsewhere.nii.gz,chest\n")
  report = prepare.run(config_for(src, tmp_path / "out", manifest=str(manifest), allow_outside_paths=True))
  assert len(report["prepared"]) == 1


def test_nothing_prepared_is_an_error_with_the_report_written(tmp_path):
  src = tmp_path / "in"
  src.mkdir()
  (src / "readme.txt").write_text("no scans here")
  nifti.save(volumes.Volume(np.full((16, 16, 16), 100.0, np.float32), np.eye(4)), src / "flat.nii.gz")
  with pytest.raises(ValueError, match="nothing prepared from .*1 volumes failed, 1 other files not used"):
    prepare.run(config_for(src, tmp_path / "out"))
  report = json.loads((tmp_path / "out" / "report.json").read_text())
  reasons = {os.path.basename(r["path"]): r["reason"] for r in report["not_prepared"]}
  assert "constant volume" in reasons["flat.nii.gz"] and "unsupported file type" in reasons["readme.txt"]


def _children(pid):
  out = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
          out.append(int(entry))
      except (OSError, IndexError):
        pass
  return out


@pytest.mark.slow
def test_workers_die_with_a_killed_parent(tmp_path):
  from conftest import REPO

  src = tmp_path / "in"
  src.mkdir()
  for i in range(8):
    write_phantom(src / f"ph{i}.nii.gz", seed=i, shape=(48, 48, 48))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "meddiff_jax.main",
      "--config=configs/prepare.py",
      f"--config.input_dir={src}",
      f"--config.output_dir={tmp_path / 'out'}",
      "--config.workers=2",
      "--config.spacing=(0.7,0.7,0.7)",
      "--config.default_region=abdomen",
    ],
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  workers = []
  deadline = time.time() + 120
  while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
    workers = _children(proc.pid)
    time.sleep(0.05)
  assert len(workers) >= 2, "preparation finished before its workers could be observed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  deadline = time.time() + 10
  alive = workers
  while time.time() < deadline and alive:
    alive = [w for w in workers if os.path.exists(f"/proc/{w}") and _state(w) != "Z"]
    time.sleep(0.2)
  assert not alive, f"workers {alive} outlived their killed parent"


def _state(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0]
  except OSError:
    return "Z"


@pytest.mark.slow
def test_prepare_command_exits_nonzero_with_one_line_when_nothing_prepared(tmp_path):
  src = tmp_path / "in"
  src.mkdir()
  (src / "readme.txt").write_text("no scans here")
  proc = run_main(
    "--config=configs/prepare.py", f"--config.input_dir={src}", f"--config.output_dir={tmp_path / 'out'}", timeout=300
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: nothing prepared from {src}")
  assert "Traceback" not in proc.stderr and "flags:" not in proc.stderr
  assert "readme.txt: unsupported file type" in proc.stdout


@pytest.mark.parametrize("codec", [None, "zstd"])
def test_store_codec_reaches_every_zarr_array_and_is_validated(tmp_path, codec):
  from meddiff_jax import checks

  src = tmp_path / "in"
  src.mkdir()
  write_phantom(src / "scan.nii.gz")
  kw = {"store_format": "zarr", "whole_sizes": (8,), **({"store_codec": codec} if codec else {})}
  config = config_for(src, tmp_path / "out", **kw)
  checks.prepare(config)
  assert len(prepare.run(config)["prepared"]) == 1
  arrays = sorted((tmp_path / "out").glob("*.zarr"))
  assert len(arrays) == 2  # the HU volume and its whole level (no mask given)
  want = store.CODECS[codec or config.store_codec]
  for a in arrays:  # the default (blosc_lz4hc) or the named codec, for the volume and the level alike
    written = json.loads((a / "zarr.json").read_text())["codecs"][1:]  # after `bytes`; TensorStore adds defaults
    assert [c["name"] for c in written] == [c["name"] for c in want], (a, written)
    for w, c in zip(written, want):
      assert c["configuration"].items() <= w["configuration"].items(), (a, written)
  with pytest.raises(checks.ConfigError, match="store_codec"):
    checks.prepare(config_for(src, tmp_path / "out2", store_codec="lz4"))


def test_preparing_into_a_bucket_writes_nothing_locally(gcs, tmp_path, monkeypatch):
  """output_dir=gs://...: the records, the marker, the report and the recipe's manifest all land in the bucket
  (on the GCS emulator); the working directory stays empty (no local ./gs:/ folder); a resumed run prepares
  nothing again; a bucket prefix holding someone else's objects is refused."""
  from meddiff_jax import storage

  (tmp_path / "cwd").mkdir()
  monkeypatch.chdir(tmp_path / "cwd")  # whatever lands on local disk by mistake would land here
  src = tmp_path / "in"
  src.mkdir()
  write_phantom(src / "scan.nii.gz")
  out = "gs://bucket/prepared"
  config = config_for(src, out, dataset="folder")
  report = prepare.run(config)
  assert len(report["prepared"]) == 1 and os.listdir(tmp_path / "cwd") == []
  names = set(storage.listdir(out))
  assert {prepare.MARKER, "report.json", "manifest_folder.csv"} <= names, names
  assert json.loads(gcs.cat("bucket/prepared/report.json"))["total_in_store"] == 1
  assert (
    gcs.cat("bucket/prepared/manifest_folder.csv").decode().splitlines()[0] == "image,region,mask,patient,split,dataset"
  )
  assert len(store.read_records(out)) == 1 and any(n.endswith(".zarr") for n in names)  # zarr: auto for a URL
  again = prepare.run(config)
  assert again["prepared"] == [] and len(again["skipped"]) == 1
  gcs.pipe("bucket/theirs/data.csv", b"x")
  with pytest.raises(ValueError, match="already holds files that preparation did not write"):
    prepare.run(config_for(src, "gs://bucket/theirs"))
  assert gcs.cat("bucket/theirs/data.csv") == b"x" and os.listdir(tmp_path / "cwd") == []
