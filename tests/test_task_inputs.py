"""Tasks fail like prepare: a bad input is one line naming the file and the problem, non-zero exit."""

import nibabel as nib
import numpy as np
import pytest
from conftest import run_main


@pytest.mark.slow
def test_bad_inputs_give_one_line_and_no_traceback(tmp_path, real_data_dir):
  flat = tmp_path / "slice2d.nii.gz"
  nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), flat)
  empty_dir = tmp_path / "dicom_folder"
  empty_dir.mkdir()
  (empty_dir / "readme.txt").write_text("no series")
  cases = [
    (real_data_dir / "example_mr_sm.nii.gz", "example_mr_sm.nii.gz: intensities in [-47, 833]", "denoise"),
    (flat, "slice2d.nii.gz: expected a 3D volume", "anomaly"),
    (empty_dir, "dicom_folder: no CT DICOM series in this folder", "denoise"),
  ]
  for path, message, task in cases:
    proc = run_main(
      f"--config=configs/{task}.py",
      f"--config.input={path}",
      f"--config.output={tmp_path / 'o.nii.gz'}",
      "--config.num_steps=1",
    )
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "flags:" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}") and message in last  # the whole error on its last line
    assert not (tmp_path / "o.nii.gz").exists()
  # the override named in the CT message lets it through the check (then runs)
  proc = run_main(
    "--config=configs/denoise.py",
    f"--config.input={real_data_dir / 'example_mr_sm.nii.gz'}",
    f"--config.output={tmp_path / 'mr.nii.gz'}",
    "--config.assume_hu=true",
    "--config.num_steps=1",
    "--config.noise_sigma_hu=10",
    "--config.overlap=0.0",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert nib.load(tmp_path / "mr.nii.gz").shape == nib.load(real_data_dir / "example_mr_sm.nii.gz").shape


# ------------------------------------------------------------------------------------------ real scans, end to end


def _crop(real_data_dir, tmp_path, name, index):
  """A crop of example_ct (its affine moved with it) written as a NIfTI: a real scan small enough to sample."""
  from meddiff_jax.data import nifti, regions, volume_io, volumes

  ct = volume_io.load(real_data_dir / "example_ct.nii.gz")
  affine = ct.affine.copy()
  affine[:3, 3] = ct.affine[:3, :3] @ np.array([s.start for s in index], float) + ct.affine[:3, 3]
  path = tmp_path / name
  nifti.save(volumes.Volume(np.ascontiguousarray(ct.data[index]).astype(np.int16), affine), path, np.int16)
  assert regions.superior_axis(affine) == 2
  return path


@pytest.mark.slow
@pytest.mark.parametrize("task", ["denoise", "anomaly"])
def test_default_run_on_real_ct_keeps_air_lung_and_bone_and_says_what_it_did(tmp_path, real_data_dir, task):
  """Defaults only (tiny_phantom, region and spacing decided): a real crop with air, lung bases and bone. Denoise:
  what the abdomen window cannot hold comes back within a few HU (the old default wrote air as -262 HU), what it
  holds is processed. Both: the closing lines and the JSON name output, checkpoint, region, spacing, window, the
  noise level in HU / the volume score, and the time."""
  import json

  from scipy import ndimage

  from meddiff_jax.data import volume_io

  src = _crop(real_data_dir, tmp_path, "crop.nii.gz", (slice(10, 112), slice(5, 96), slice(86, 112)))
  out = tmp_path / "out.nii.gz"
  proc = run_main(f"--config={task}", f"--config.input={src}", f"--config.output={out}", "--config.num_steps=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  summary = "\n".join(lines[[i for i, l in enumerate(lines) if l == f"{task} done"][-1] :])
  for label in ("output", "checkpoint", "region", "spacing", "window", "time"):
    assert f"\n  {label} " in summary, summary
  assert "region     abdomen, estimated from the scan" in summary and "tiny_phantom" in summary
  sidecar = json.loads((tmp_path / "out.json").read_text())
  assert sidecar["region"] == "abdomen" and sidecar["output"] == str(out) and sidecar["seconds"] > 0
  assert "3 mm" in sidecar["spacing"] and sidecar["window"].startswith("-120..240 HU (abdomen)")
  if task == "anomaly":
    assert "\n  score " in summary and sidecar["volume_score"] > 0 and len(sidecar["slice_scores"]) == 26
    return
  assert "\n  noise " in summary and " HU (std), estimated from the scan" in summary
  assert 5.0 < sidecar["noise_sigma_hu"] < 200.0
  ct, res = volume_io.load(src).data, volume_io.load(out).data
  local = ndimage.gaussian_filter(ct, 1.0)
  body = ndimage.binary_fill_holes(ct > -500)
  for name, where in {
    "air": (ct < -900) & ~body,
    "lung": body & (local < -600) & (local > -950) & (ct < -600),
    # ribs and vertebral cortex: beyond the window by more than scans.NOISE_GUARD_HU, always the scan's own
    "bone": ct > 400,
  }.items():
    assert where.sum() > 20, name  # (the crop holds only the lung bases: ~30 lung voxels)
    assert np.abs(res[where] - ct[where]).max() <= 3.0, name
  inside = (local > -100) & (local < 220) & (ct > -250) & (ct < 380)
  assert np.mean(np.abs(res[inside] - ct[inside])) > 2.0  # the window's contents were processed


@pytest.mark.slow
def test_a_scan_that_spans_regions_is_denoised_region_by_region(tmp_path, real_data_dir):
  """Abdomen below, chest above (conftest.chest_over_abdomen): two parts, each with its own window and condition,
  blended where they overlap. The chest's lungs are inside the chest window and are processed; below, the
  abdomen's air is outside its window and kept; a whole-scan abdomen run would have kept the lungs as well."""
  import json

  from conftest import chest_over_abdomen

  from meddiff_jax.data import nifti, volume_io, volumes

  scan = chest_over_abdomen(real_data_dir)
  src = tmp_path / "both.nii.gz"
  nifti.save(volumes.Volume(np.round(scan.data).astype(np.int16), scan.affine), src, np.int16)
  out = tmp_path / "out.nii.gz"
  proc = run_main(
    "--config=denoise",
    f"--config.input={src}",
    f"--config.output={out}",
    "--config.num_steps=1",
    "--config.noise_sigma_hu=30",
    "--config.spacing=(6.0,6.0,6.0)",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "region   abdomen + chest, estimated from the scan" in proc.stdout
  parts = json.loads((tmp_path / "out.json").read_text())["parts"]
  assert [p["region"] for p in parts] == ["abdomen", "chest"]
  (a0, a1), (c0, c1) = parts[0]["slices"], parts[1]["slices"]
  assert a0 == 0 and c1 == scan.shape[2] and c0 < a1
  ct, res = volume_io.load(src).data, volume_io.load(out).data
  assert res.shape == ct.shape
  lungs = (ct < -600) & (ct > -950)
  lungs[..., : a1 + 1] = False  # chest-only slices
  lungs &= np.abs(np.arange(ct.shape[0]) - ct.shape[0] / 2)[:, None, None] < 25  # inside the CTA crop
  assert lungs.sum() > 1000
  assert np.mean(np.abs(res[lungs] - ct[lungs])) > 5.0  # processed with the chest window
  air = ct < -900
  air[..., c0:] = False  # abdomen-only slices
  assert air.sum() > 1000 and np.abs(res[air] - ct[air]).max() <= 3.0


@pytest.mark.slow
def test_every_refusal_is_one_line_within_seconds_before_the_model_loads(tmp_path, real_data_dir):
  """Output kind, output folder state, an output that is an input, an existing output, a label map on another
  grid, an undecidable region, a misspelt key, prepare's output_dir a file: one line, exit 1, under 15 s each on
  the 2-core box (python and JAX start-up included), nothing sampled (no progress bar) and nothing written."""
  import time

  ct = real_data_dir / "example_ct.nii.gz"
  series = real_data_dir / "example_ct_dicom"
  existing = tmp_path / "existing.nii.gz"
  existing.write_bytes(b"a user's file")
  full = tmp_path / "full"
  full.mkdir()
  (full / "notes.txt").write_text("the user's")
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  small = _crop(real_data_dir, tmp_path, "small.nii.gz", (slice(50, 70), slice(40, 60), slice(20, 80)))
  new = tmp_path / "new.nii.gz"
  cases = [
    (["--config=denoise", f"--config.input={ct}", f"--config.output={existing}"], "exists; give a new path"),
    (["--config=denoise", f"--config.input={ct}", f"--config.output={ct}", "--config.overwrite=True"], "never writes"),
    (["--config=anomaly", f"--config.input={series}", f"--config.output={series}/"], "never writes over or into"),
    (["--config=denoise", f"--config.input={ct}", f"--config.output={tmp_path}/series/"], "the input is not DICOM"),
    (["--config=denoise", f"--config.input={series}", f"--config.output={full}/"], "is a folder that is not empty"),
    (
      [
        "--config=denoise",
        f"--config.input={ct}",
        f"--config.output={new}",
        f"--config.labels={real_data_dir}/example_seg_dicom.nii.gz",
      ],
      "is on another grid than the input CT",
    ),
    (["--config=denoise", f"--config.input={small}", f"--config.output={new}"], "cannot tell its body region"),
    (
      ["--config=denoise", f"--config.input={ct}", f"--config.output={new}", "--config.num_step=5"],
      "did you mean --config.num_steps?",
    ),
    (
      ["--config=prepare", f"--config.input_dir={real_data_dir}", f"--config.output_dir={a_file}"],
      "is a file, not a folder",
    ),
  ]
  for args, message in cases:
    start = time.perf_counter()
    proc = run_main(*args)
    seconds = time.perf_counter() - start
    assert proc.returncode == 1, (args, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, proc.stderr[-2000:])
    assert "s/step" not in proc.stderr + proc.stdout and not new.exists()  # (no sampling step timed)
    assert seconds < 15.0, (args, seconds)
  assert existing.read_bytes() == b"a user's file" and (full / "notes.txt").read_text() == "the user's"


@pytest.mark.slow
def test_ctrl_c_stops_within_a_step_writes_nothing_and_exits_130(tmp_path, real_data_dir):
  """SIGINT once the first step is done: the remaining steps skip the network, one line says where it stopped and
  that the output was not written, exit status 130, no traceback (before: all 20 steps, then a traceback)."""
  import os
  import signal
  import subprocess
  import sys
  import threading
  import time

  from conftest import REPO

  src = _crop(real_data_dir, tmp_path, "crop.nii.gz", (slice(10, 112), slice(5, 96), slice(70, 112)))
  out = tmp_path / "out.nii.gz"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  args = ["--config=anomaly", f"--config.input={src}", f"--config.output={out}", "--config.num_steps=50"]
  proc = subprocess.Popen(
    [sys.executable, "-m", "meddiff_jax.main", *args],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  err: list[str] = []
  threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True).start()
  deadline = time.monotonic() + 600
  while "| 1/50" not in "".join(err) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.2)
  first_step = time.monotonic()
  proc.send_signal(signal.SIGINT)
  rc = proc.wait(timeout=300)
  seconds = time.monotonic() - first_step
  stderr = "".join(err)
  assert rc == 130, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("interrupted: Ctrl-C: stopped after step ") and last.endswith(f"{out} was not written")
  assert int(last.split("after step ")[1].split(" of ")[0]) < 10 and "Traceback" not in stderr
  assert not out.exists() and not (tmp_path / "out.json").exists() and not list(tmp_path.glob(".out*"))
  assert seconds < 60.0, seconds  # the 48 steps left would take minutes
