"""Zero-shot anomaly detection: meddiff --config=anomaly --config.input=IN.nii.gz
--config.output=MAP.nii.gz (a MAP.json with the volume score is written beside it)."""

import ml_collections

from meddiff_jax.configs import input_options, task_options


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "anomaly"
  c.checkpoint = "tiny_phantom"
  c.input = ""
  c.output = ""
  c.region = "abdomen"
  c.labels = ""  # TotalSegmentator label map on the input grid: organ conditions (none: body from HU only)
  c.spacing = ()  # () = the checkpoint's training spacing (resampled there and back); else mm, e.g. (1., 1., 1.)
  c.noise_t = 950  # paper: 950 of 1000
  c.smooth_sigma = 1.0
  c.top_fraction = 0.01
  # 20 DPM-Solver++ steps from noise_t: reconstructions within RMSE 0.013 of 100 steps (10: 0.033) and the
  # voxel / slice / pixel AUROCs within 0.01 of it on the real CT (10 misses); RESULTS.md #15.
  return input_options.add_input_options(task_options.add_window_options(c, num_steps=20))
