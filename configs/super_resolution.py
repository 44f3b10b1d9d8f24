"""ControlNet super-resolution: meddiff --config=super_resolution
--config.controlnet=FINETUNE_WORKDIR --config.input=LR.nii.gz --config.output=SR.nii.gz
[--config.reference=HR.nii.gz  (PSNR/SSIM vs trilinear and cubic written to SR.json)]."""

import ml_collections

from meddiff_jax import sections
from meddiff_jax.configs import input_options, task_options


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "super_resolution"
  c.controlnet = ""  # a configs/controlnet.py:sr workdir
  c.input = ""
  c.output = ""
  c.overwrite = False  # replace an existing output (an output that is an input is always refused)
  # auto: from the label map (TotalSegmentator landmarks), else estimated from the scan and printed; or
  # head_neck | chest | abdomen
  c.region = "auto"
  c.reference = ""
  c.labels = ""  # TotalSegmentator label map on the input grid: organ conditions (none: body from HU only)
  # the thin output grid: checkpoint (its training spacing, where sampling always runs), or mm: (1.,1.,1.)
  c.spacing = sections.keyword("checkpoint")
  c.conditioning_scale = 1.0
  c.window_blend_hu = 20.0  # outside the region's window the scan's own HU, blended over this around its edges
  return input_options.add_input_options(task_options.add_window_options(c, num_steps=50))
