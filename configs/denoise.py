"""Zero-shot denoising: meddiff --config=denoise --config.input=IN.nii.gz
--config.output=OUT.nii.gz [--config.checkpoint=WORKDIR_OR_EXPORT] [--config.method=diffpir|partial]."""

import ml_collections

from meddiff_jax.configs import input_options, task_options


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "denoise"
  c.checkpoint = "tiny_phantom"  # a training workdir, an exported dir, or a builtin name
  c.input = ""
  c.output = ""
  c.region = "abdomen"
  c.labels = ""  # TotalSegmentator label map on the input grid: organ conditions (none: body from HU only)
  c.spacing = ()  # () = the checkpoint's training spacing (resampled there and back); else mm, e.g. (1., 1., 1.)
  c.method = "diffpir"  # diffpir | partial
  c.noise_sigma_hu = 0.0  # 0: estimate from the image
  c.lam = 10.0  # DiffPIR lambda on DiffPIR's own scale (its sigma in [0, 1] image units; paper: ~10)
  c.zeta = (
    0.0  # DiffPIR zeta (MedDiff-FM: unknown); > 0 draws posterior samples, 0 the estimate nearest the posterior mean
  )
  c.window_margin = 0.02  # estimate within this of a window edge and input beyond it: keep the input HU
  c.output_int16 = True
  # 10 steps below t* (DiffPIR and partial diffusion): the cheapest budget within 0.1 dB PSNR / 0.005 SSIM of
  # every timestep at 30 and 60 HU noise on the real CT (5 misses at 60 HU); RESULTS.md #15.
  return input_options.add_input_options(task_options.add_window_options(c, num_steps=10))
