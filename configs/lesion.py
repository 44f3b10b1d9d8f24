"""ControlNet lesion generation / inpainting: meddiff --config=lesion
--config.controlnet=FINETUNE_WORKDIR --config.input=CT.nii.gz --config.mask=LESION_MASK.nii.gz
--config.output=OUT.nii.gz [--config.method=inpaint|generate]."""

import ml_collections

from meddiff_jax import sections
from meddiff_jax.configs import input_options, task_options


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "lesion"
  c.controlnet = ""  # a configs/controlnet.py:lesion workdir
  c.input = ""
  c.mask = ""
  c.output = ""
  c.overwrite = False  # replace an existing output (an output that is an input is always refused)
  # auto: from the label map (TotalSegmentator landmarks), else estimated from the scan and printed; or
  # head_neck | chest | abdomen
  c.region = "auto"
  c.labels = ""  # TotalSegmentator label map on the input grid: organ conditions (none: body from HU only)
  # the working grid: checkpoint (the ControlNet run's training spacing; mask resampled there, result back), or mm
  c.spacing = sections.keyword("checkpoint")
  c.method = "inpaint"  # inpaint (RePaint, scan kept outside the mask) | generate
  # RePaint's jumps in timesteps of the model's schedule (paper: 10 steps of a 250-step grid over T = 1000 = 40),
  # rounded to whole steps of the sampling grid; jump_n_sample: passes through each jump point (paper: r = 10;
  # 1 = no resampling)
  c.jump_timesteps = 40
  c.jump_n_sample = 10
  c.conditioning_scale = 1.0
  c.window_blend_hu = 20.0  # outside the region's window the scan's own HU, blended over this around its edges
  c.dice_threshold_hu = 20.0
  return input_options.add_input_options(task_options.add_window_options(c, num_steps=50))
