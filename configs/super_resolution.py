"""ControlNet super-resolution: meddiff --config=super_resolution
--config.controlnet=FINETUNE_WORKDIR --config.input=LR.nii.gz --config.output=SR.nii.gz
[--config.reference=HR.nii.gz  (PSNR/SSIM vs trilinear and cubic written to SR.json)]."""

import ml_collections

from meddiff_jax.configs import input_options, task_options


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "super_resolution"
  c.controlnet = ""  # a configs/controlnet.py:sr workdir
  c.input = ""
  c.output = ""
  c.reference = ""
  c.region = "chest"
  c.labels = ""  # TotalSegmentator label map on the input grid: organ conditions (none: body from HU only)
  c.spacing = ()  # the thin output grid in mm; () = the checkpoint's training spacing (sampling always runs there)
  c.conditioning_scale = 1.0
  return input_options.add_input_options(task_options.add_window_options(c, num_steps=50))
