"""Synthesis: meddiff --config=synthesis --config.output=OUT.nii.gz
[--config.shape=(64,64,64)] [--config.labels=LABELS.nii.gz] [--config.guidance_scale=2.0]."""

import ml_collections

from meddiff_jax import sections
from meddiff_jax.configs import input_options, task_options


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "synthesis"
  c.checkpoint = "tiny_phantom"
  c.output = ""
  c.overwrite = False  # replace an existing output (an output that is an input is always refused)
  c.region = (
    "auto"  # auto: from the label map (TotalSegmentator landmarks; needed then); or head_neck | chest | abdomen
  )
  c.shape = (48, 48, 48)
  # the sampling grid (the output grid without labels): checkpoint (its training spacing), or mm: (1.,1.,1.)
  c.spacing = sections.keyword("checkpoint")
  c.labels = ""  # TotalSegmentator label NIfTI: extent, affine and anatomy (resampled to `spacing`, result back)
  c.guidance_scale = 1.0  # classifier-free guidance; 1.0 = plain conditional
  c.eta = 0.0
  return input_options.add_input_options(task_options.add_window_options(c, num_steps=50))
