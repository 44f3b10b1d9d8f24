"""Pluggable segmenters for the Dice metrics; nothing is downloaded at run time.

`config.segmenter` forms:
  totalsegmentator    the `TotalSegmentator` command (pip install TotalSegmentator; it fetches its weights
                      on first use, so run it once online or set TOTALSEG_HOME_DIR to a populated folder);
                      output: one multilabel map (--ml) with TotalSegmentator ids.
  predictions:DIR     the user's predictions, DIR/<case_id>.nii.gz (nnU-Net's output naming), e.g. from
                      `nnUNetv2_predict -i WORKDIR/generated -o DIR ...` run on the images this command wrote.
  command:TEMPLATE    any command, formatted with {input} (a NIfTI path) and {output} (where it must write
                      the label NIfTI).
  threshold           lesion protocols only: voxels near the mask whose HU changed by more than
                      `dice_threshold_hu` (a proxy needing no model; not the paper's segmenter).
Missing tools / folders are a one-line error naming what to install or provide.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile

import numpy as np

MISSING = (
  "no segmenter configured: set --config.segmenter=totalsegmentator (pip install TotalSegmentator), "
  "predictions:DIR (your nnU-Net predictions, DIR/<case_id>.nii.gz) or command:'TOOL {input} {output}'"
)


class SegmenterError(ValueError):
  """The configured segmenter ran and failed (a user-facing, one-line error)."""


class Segmenter:
  """(case_id, image NIfTI path) -> integer label map on the image's grid (RAS, as data.volume_io loads it)."""

  def __init__(self, spec: str):
    self.spec = spec
    if not spec:
      raise FileNotFoundError(MISSING)
    if spec == "threshold":
      self.kind = "threshold"
    elif spec == "totalsegmentator":
      if shutil.which("TotalSegmentator") is None:
        raise FileNotFoundError(
          "--config.segmenter=totalsegmentator: the TotalSegmentator command is not on PATH "
          "(pip install TotalSegmentator, and make its weights available offline)"
        )
      self.kind = "command"
      self.template = "TotalSegmentator -i {input} -o {output} --ml --quiet"
    elif spec.startswith("predictions:"):
      self.kind, self.directory = "predictions", spec[len("predictions:") :]
      if not os.path.isdir(self.directory):
        raise FileNotFoundError(
          f"--config.segmenter={spec!r}: {self.directory} is not a directory of <case_id>.nii.gz predictions"
        )
    elif spec.startswith("command:"):
      self.kind, self.template = "command", spec[len("command:") :]
      tool = shlex.split(self.template)[0] if self.template.strip() else ""
      if not tool or shutil.which(tool) is None:
        raise FileNotFoundError(f"--config.segmenter={spec!r}: command {tool!r} not found on PATH")
    else:
      raise ValueError(f"--config.segmenter={spec!r} not understood; {MISSING}")

  def __call__(self, case_id: str, image_path: str) -> np.ndarray:
    from meddiff_jax.data import volume_io

    if self.kind == "threshold":
      raise ValueError("the threshold segmenter needs the lesion-free scan; use lesion_threshold_segmentation")
    if self.kind == "predictions":
      path = os.path.join(self.directory, f"{case_id}.nii.gz")
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: prediction missing for case {case_id!r}")
      return volume_io.load(path, is_mask=True).data
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "seg.nii.gz")
      cmd = self.template.format(input=shlex.quote(image_path), output=shlex.quote(out))
      proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
      if proc.returncode != 0 or not os.path.isfile(out):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise SegmenterError(f"segmenter {cmd!r} failed (exit {proc.returncode}): {tail[0]}")
      return volume_io.load(out, is_mask=True).data


def lesion_threshold_segmentation(
  generated_hu: np.ndarray, background_hu: np.ndarray, mask: np.ndarray, threshold_hu: float = 20.0, dilation: int = 2
) -> np.ndarray:
  """Voxels within a dilated mask whose HU differs from the lesion-free scan by more than threshold_hu."""
  from scipy import ndimage

  region = ndimage.binary_dilation(np.asarray(mask) > 0, iterations=dilation)
  return ((np.abs(np.asarray(generated_hu) - np.asarray(background_hu)) > threshold_hu) & region).astype(np.uint8)
