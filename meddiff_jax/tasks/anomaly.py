"""Zero-shot anomaly detection: noise the scan to t (paper: 950 of 1000), reconstruct a "healthy" version
with the prior, and score the residual.

voxel map (pixel level): |x - recon| smoothed (Gaussian) and zeroed outside the body; volume score: mean of the top
`top_fraction` of the map inside the body; slice scores: the same per 2D slice (BMAD's levels,
evaluation/metrics.anomaly_aurocs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from meddiff_jax import pretrained, sections
from meddiff_jax.data import preprocess
from meddiff_jax.evaluation import metrics
from meddiff_jax.tasks import common, denoise, scans


@dataclasses.dataclass(frozen=True)
class AnomalySpec(common.TaskSpec):
  """configs/anomaly.py, typed (noise_t against the checkpoint's timesteps: checks.task, and `reconstruct`)."""

  MODE = "anomaly"
  checkpoint: str
  input: str
  spacing: tuple[float, float, float] | str  # mm, 'checkpoint' or 'input' (tasks/scans.decide_spacing)
  noise_t: int
  smooth_sigma: float
  top_fraction: float

  def __post_init__(self):
    super().__post_init__()
    sections.keyword_or("config.spacing", self.spacing, (common.CHECKPOINT, common.INPUT), sections.sizes)
    sections.count("config.noise_t", self.noise_t)
    sections.at_least("config.smooth_sigma", self.smooth_sigma, 0.0)
    sections.positive("config.top_fraction", self.top_fraction)
    sections.fraction("config.top_fraction", self.top_fraction)


def anomaly_map(
  image: np.ndarray, reconstruction: np.ndarray, body: np.ndarray | None = None, smooth_sigma: float = 1.0
) -> np.ndarray:
  residual = np.abs(np.asarray(image, np.float32) - np.asarray(reconstruction, np.float32))
  if smooth_sigma:
    residual = ndimage.gaussian_filter(residual, smooth_sigma)
  return residual if body is None else np.where(body, residual, 0.0).astype(np.float32)


def volume_score(amap: np.ndarray, body: np.ndarray | None = None, top_fraction: float = 0.01) -> float:
  values = amap[body] if body is not None else amap.ravel()
  if values.size == 0:
    return 0.0
  k = max(1, int(round(top_fraction * values.size)))
  return float(np.mean(np.partition(values, values.size - k)[-k:]))


def reconstruct(pre: pretrained.Pretrained, y_unit: np.ndarray, canvas: common.Canvas, task: AnomalySpec) -> np.ndarray:
  """Partial diffusion from task.noise_t with windowed blending over `canvas`; y_unit is the (padded) [-1,1]
  volume (the result is cropped to canvas.frame)."""
  steps = pre.schedule.num_timesteps
  if not 0 < task.noise_t < steps:  # a table lookup past the end would clamp silently to T - 1
    raise sections.ConfigError(
      f"config.noise_t={task.noise_t}; the checkpoint has {steps} timesteps: choose 1..{steps - 1}"
    )
  # the grid starts at noise_t itself (paper: 950), every step is spent below it
  sample = lambda fn, y, r: denoise.partial_diffusion(
    fn, pre.schedule, y, task.noise_t, task.num_steps, r, progress=bar, method=task.sampler
  )
  bar = common.ProgressBar(task.num_steps, "anomaly reconstruction")
  return common.run_windowed(pre, sample, (jnp.asarray(y_unit)[None, ..., None],), canvas, task, progress=bar)


def anomaly_part(pre: pretrained.Pretrained, inp: common.TaskInput, task: AnomalySpec) -> scans.PartResult:
  """One region part: its anomaly map on the working grid and its volume score."""
  recon = reconstruct(pre, inp.unit, inp.canvas(), task)
  body = preprocess.body_mask(inp.work.data)
  amap = anomaly_map(inp.unit[inp.crop], recon, body, task.smooth_sigma)
  return scans.PartResult(inp.part, inp.work, amap, {"volume_score": volume_score(amap, body, task.top_fraction)})


def slice_scores_by_slab(amap: np.ndarray, body_bits: np.ndarray, top_fraction: float) -> np.ndarray:
  """`metrics.slice_scores` along axis 2, a few slices at a time (it works in float64: never on the whole map);
  `body_bits`: the body mask packed along axis 0 (np.packbits)."""
  step = max(1, scans.SLAB_VOXELS // max(amap.shape[0] * amap.shape[1], 1))
  out = []
  for k0 in range(0, amap.shape[2], step):
    body = np.unpackbits(body_bits[..., k0 : k0 + step], axis=0, count=amap.shape[0]).astype(bool)
    out.append(metrics.slice_scores(amap[..., k0 : k0 + step], body, axis=2, top_fraction=top_fraction))
  return np.concatenate(out) if out else np.zeros(0)


def run(task: AnomalySpec, memory: common.InMemory | None = None) -> dict[str, Any]:
  """The `anomaly` command: a CT in; its anomaly map (input grid) and a JSON of the scores out. A scan that spans
  regions is scored part by part: the volume score is the highest part's. `memory`: the model and the CT given in
  memory, the map kept there (meddiff_jax/api.py)."""
  scan = common.open_scan(task, common.model_data(task, memory), memory=memory)
  summary = common.summary(task, scan, task.checkpoint)
  pre = common.load_model(task, memory)
  results = [anomaly_part(pre, inp, task) for inp in common.prepare_inputs(pre, scan)]
  score = max(r.info["volume_score"] for r in results)
  # per-slice scores (axis 2 of the RAS input grid: BMAD and the field score 2D slices) beside the volume score; the
  # body as bits, so the scan's memory is free for the float32 map
  body = np.packbits(preprocess.body_mask(scan.original.data), axis=0)
  scan = scan.without_voxels()
  amap_input = scans.onto_scan(scan, results, window_blend_hu=None)
  slices = slice_scores_by_slab(amap_input, body, task.top_fraction)
  top = max(range(len(slices)), key=lambda k: slices[k]) if len(slices) else 0
  summary.add(
    "score",
    f"{score:.4g} (volume: mean of the top {task.top_fraction:.0%} of the map in the body; noise_t {task.noise_t}, "
    f"{task.num_steps} steps); highest slice {top} of axis 2 ({slices[top]:.4g})"
    if len(slices)
    else f"{score:.4g}",
  )
  sidecar = {"volume_score": score, "noise_t": task.noise_t, "slice_scores": [float(v) for v in slices]}
  return common.finish_scan(
    scan,
    results,
    task,
    summary,
    window_blend_hu=None,
    dtype=np.float32,
    description=f"meddiff anomaly map ({task.checkpoint})",
    sidecar=sidecar,
    values=amap_input,
    memory=memory,
  )
