"""The paper's evaluations: meddiff --config=evaluate --workdir=W
--config.protocol=denoising|anomaly|synthesis|super_resolution|lesion|inpainting
(--config.pairs=FILE.csv | --config.dataset=NAME --config.data_root=DIR) [--config.checkpoint=CK] ...
Writes W/results.json and prints the paper-style table; docs/evaluation.md describes every protocol."""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "evaluate"
  c.protocol = "denoising"
  # cases: exactly one of a CSV of paths (columns per protocol, docs/evaluation.md) or a published dataset
  c.pairs = ""
  c.dataset = ""  # mayo2016 | bmad_liver | rplhr_ct | msd_task03_liver | msd_task06_lung | tcia_lymph_nodes
  c.data_root = ""
  c.split = "test"  # BMAD: valid|test; RPLHR-CT: train|val|test; MSD / TCIA: train|test|all (seeded 80/20)
  c.test_fraction = 0.2
  c.split_seed = 0
  c.max_cases = 0  # 0: all
  c.mayo_thickness = "3mm"  # Mayo 2016: quarter_3mm/full_3mm or quarter_1mm/full_1mm
  c.ln_subset = "MED"  # TCIA CT Lymph Nodes: MED (MED-LN), ABD (ABD-LN) or '' (both)
  c.png_depth = 16  # BMAD PNG slices are repeated into a volume this deep for the 3D prior
  c.png_spacing = 1.0
  # the model and the task options shared with the task commands ('' / 0: the task config's default)
  c.checkpoint = "tiny_phantom"  # denoising / anomaly / synthesis
  c.controlnet = ""  # super_resolution / lesion / inpainting: a configs/controlnet.py workdir
  # '' / -1 / 0 steps: keep the task config's default
  c.region = ""  # the task default: abdomen; chest for super_resolution
  c.method = ""  # denoising: diffpir | partial
  c.sampler = ""
  c.num_steps = 0
  c.overlap = -1.0
  c.window_batch = 0
  c.inference_dtype = ""  # auto | float32 | bfloat16
  c.seed = -1
  c.task = ""  # any other task key, 'KEY=VALUE;...', e.g. --config.task='lam=10;zeta=0.3' or 'noise_t=950'
  c.skip_model = False  # only the protocol's reference rows (baselines), e.g. to check a dataset layout
  # metrics
  c.metric_window = ()  # (lo, hi) HU for PSNR/SSIM; () : the region's window (data range = hi - lo)
  c.gaussian_sigma = 1.0  # denoising baseline, voxels
  c.nlm_h_factor = 0.8  # non-local means h = factor * estimated noise sigma (scikit-image's recipe)
  c.top_fraction = 0.01  # anomaly: volume / slice score = mean of the top fraction of the map in the body
  c.smooth_sigma = 1.0  # anomaly: smoothing of the no-prior reference map (the model's is the task's own)
  c.slice_axis = 2  # axial slices in RAS order
  c.pixel_subsample = 1  # anomaly pixel level: every k-th voxel inside the body (memory on whole CTs)
  c.extractor = ""  # synthesis FID: DIR (exported 3D network) | features:DIR | none
  c.segmenter = "threshold"  # totalsegmentator | predictions:DIR | command:'TOOL {input} {output}' | threshold | none
  c.dice_labels = ()  # synthesis: label ids to score (): every label in the conditioning map
  c.dice_threshold_hu = 20.0  # threshold segmenter
  c.sr_spacing = ()  # super_resolution target grid; (): the thin scan's spacing
  return c
