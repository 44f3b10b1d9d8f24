"""Synthesis: python -m meddiff_jax.main --config=configs/synthesis.py --config.output=OUT.nii.gz
[--config.shape=(64,64,64)] [--config.structure_mask=LABELS.nii.gz] [--config.guidance_scale=2.0]."""

import ml_collections

from configs import task_options


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "synthesis"
  c.checkpoint = "tiny_phantom"
  c.output = ""
  c.region = "abdomen"
  c.shape = (48, 48, 48)
  c.spacing = (3.0, 3.0, 3.0)  # for the output affine when no structure_mask is given
  c.structure_mask = ""  # TotalSegmentator label NIfTI: gives shape, affine and anatomy conditions
  c.guidance_scale = 1.0  # classifier-free guidance; 1.0 = plain conditional
  c.eta = 0.0
  return task_options.add_window_options(c, num_steps=50)
