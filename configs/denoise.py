"""Zero-shot denoising: meddiff --config=denoise --config.input=IN.nii.gz
--config.output=OUT.nii.gz [--config.checkpoint=WORKDIR_OR_EXPORT] [--config.method=diffpir|partial]."""

import ml_collections

from meddiff_jax import sections
from meddiff_jax.configs import input_options, task_options


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "denoise"
  c.checkpoint = "tiny_phantom"  # a training workdir, an exported dir, or a builtin name
  c.input = ""
  c.output = ""
  c.overwrite = False  # replace an existing output (an output that is an input is always refused)
  # auto: from the label map (TotalSegmentator landmarks), else estimated from the scan and printed; or
  # head_neck | chest | abdomen
  c.region = "auto"
  c.labels = ""  # TotalSegmentator label map on the input grid: organ conditions (none: body from HU only)
  # input: the scan's own grid | checkpoint: its training spacing (resampled there and back) | mm: (1.,1.,1.)
  # input by default: on held-out real CT finer than the checkpoint it denoised 4.8-10.6 dB better (RESULTS.md #25)
  c.spacing = sections.keyword("input")
  c.method = "diffpir"  # diffpir | partial
  c.noise_sigma_hu = sections.keyword("estimate")  # estimate: from the image; or the noise std in HU, e.g. 30
  c.lam = 10.0  # DiffPIR lambda on DiffPIR's own scale (its sigma in [0, 1] image units; paper: ~10)
  c.zeta = (
    0.0  # DiffPIR zeta (MedDiff-FM: unknown); > 0 draws posterior samples, 0 the estimate nearest the posterior mean
  )
  c.window_blend_hu = 20.0  # outside the region's window the scan's own HU, blended over this around its edges
  c.output_int16 = True
  # 10 steps below t* (DiffPIR and partial diffusion): the cheapest budget within 0.1 dB PSNR / 0.005 SSIM of
  # every timestep at 30 and 60 HU noise on the real CT (5 misses at 60 HU); RESULTS.md #15.
  return input_options.add_input_options(task_options.add_window_options(c, num_steps=10))
