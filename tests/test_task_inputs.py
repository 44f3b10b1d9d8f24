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
