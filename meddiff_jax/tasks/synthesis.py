"""Synthesis of whole volumes larger than the training patch: one global noise state, overlapping windows
each with its own whole-volume position box, blended noise estimates every step (no seams), region and
structure conditions with classifier-free guidance; output in HU via the inverse window."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from meddiff_jax import pretrained, sections
from meddiff_jax.data import preprocess, regions, volume_io, volumes
from meddiff_jax.diffusion import samplers
from meddiff_jax.tasks import common, scans


@dataclasses.dataclass(frozen=True)
class SynthesisSpec(common.TaskSpec):
  """configs/synthesis.py, typed."""

  MODE = "synthesis"
  checkpoint: str
  shape: tuple[int, int, int]
  spacing: tuple[float, float, float] | str  # mm, or 'checkpoint' (common.task_spacing)
  guidance_scale: float
  eta: float

  def __post_init__(self):
    super().__post_init__()
    sections.sizes("config.shape", self.shape, integer=True)
    sections.keyword_or("config.spacing", self.spacing, (common.CHECKPOINT,), sections.sizes)
    sections.at_least("config.guidance_scale", self.guidance_scale, 0.0)
    sections.at_least("config.eta", self.eta, 0.0)


def synthesize(pre: pretrained.Pretrained, canvas: common.Canvas, task: SynthesisSpec) -> np.ndarray:
  """[-1, 1] volume of canvas.shape (each side >= the patch size), conditioned on the canvas."""
  scale = jnp.float32(task.guidance_scale) if task.guidance_scale != 1.0 else None
  timesteps = samplers.make_timesteps(pre.schedule.num_timesteps, task.num_steps, "trailing")

  def sample(fn, rng):
    init_rng, sample_rng = jax.random.split(rng)  # x_T and the sampler's own noise: independent keys
    x_t = jax.random.normal(init_rng, (1, *canvas.shape, 1))
    return samplers.sample(
      fn, pre.schedule, timesteps, sample_rng, x_t, method=task.sampler, eta=task.eta, progress=bar
    )

  bar = common.ProgressBar(len(timesteps), "synthesis")
  return common.run_windowed(
    pre, sample, (), canvas, task, apply_fn=common.model_fn(pre, scale), params=pre.params, progress=bar
  )


def body_hu_proxy(labels: np.ndarray, lut: np.ndarray | None, group_names: tuple[str, ...]) -> np.ndarray:
  """A stand-in HU volume for the body channel of a synthesis without a CT: 0 HU inside the body, -1000 outside.

  Training's body channel is HU > -500: skin, fat and unlabelled tissue are in, air-filled lungs and
  airways are out. From a label map that is approximated by the filled, closed hull of all labelled
  structures, less the lung and airway groups; `preprocess.structure_channels` then thresholds it with
  the one training definition.
  """
  inside = ndimage.binary_fill_holes(ndimage.binary_closing(labels > 0, iterations=2))
  if lut is not None:
    safe = np.where((labels >= 0) & (labels < lut.shape[0]), labels, 0).astype(np.intp)
    air = [g + 1 for g, name in enumerate(group_names) if name in ("lung", "airway")]
    inside &= ~np.isin(lut[safe], air)
  return np.where(inside, 0.0, -1000.0).astype(np.float32)


def run(task: SynthesisSpec, memory: common.InMemory | None = None) -> dict[str, Any]:
  """The `synthesis` command: shape (or a TotalSegmentator label NIfTI giving extent, affine and anatomy)
  -> synthetic CT NIfTI in HU. Sampling runs on the `task.spacing` grid (the model's training spacing);
  a label map is resampled there (nearest) and the result back onto the label map's grid. `memory`: the model
  and the label map given in memory, the CT kept there (meddiff_jax/api.py)."""
  data = common.model_data(task, memory)
  labels_volume = memory.labels if memory is not None else None
  if labels_volume is None and task.labels:
    labels_volume = volume_io.load(task.labels, is_mask=True)
  region_name, region_note = synthesis_region(task, labels_volume, data)
  region = preprocess.region_id(region_name)
  trained = data.training_spacing()
  spacing = (trained if task.spacing == common.CHECKPOINT else tuple(float(s) for s in task.spacing)) or (1.0,) * 3
  if labels_volume is not None:
    mask = labels_volume
    work = volumes.resample(mask, spacing, order=0, fill=0.0) if not np.allclose(mask.spacing, spacing) else mask
    shape = work.shape
  else:
    shape = task.shape
    mask = work = volumes.Volume(np.zeros(shape, np.float32), np.diag([*spacing, 1.0]))
  if any(s < data.patch_size for s in shape):
    raise scans.Refusal(
      f"synthesis grid {tuple(shape)} at {scans._mm(spacing)}: every side must be at least the model's patch "
      f"({data.patch_size}); give a larger --config.shape (or label map)"
    )
  summary = scans.Summary(
    task.mode,
    task.output,
    common.describe_checkpoint(task.checkpoint),
    region_name,
    region_note,
    f"{scans._mm(spacing)} (the sampling grid)",
    scans.window_text([region_name], None),
  )
  pre = common.load_model(task, memory)
  if labels_volume is not None:
    labels = work.data.astype(np.int32)
    lut, _ = pre.data.structure_lut()
    proxy = body_hu_proxy(labels, lut, tuple(preprocess.DEFAULT_STRUCTURE_GROUPS))
    structures = common.structure_volume(pre, labels, proxy, packed=True)
  else:
    # no anatomy given: all structure channels zero with the real region, trained by structure dropout
    # (diffusion.structure_drop_prob x body_drop_prob); zeros packed or as label ids alike: one channel
    structures = None if not pre.spec.structure_channels else np.zeros(tuple(shape) + (1,), np.uint8)
  canvas = common.Canvas(tuple(shape), region, structures, None, None)
  hu = preprocess.unit_to_hu(synthesize(pre, canvas, task), region)
  # on the label map's own grid, voxel order and header (a shape alone: a plain RAS NIfTI)
  summary.add(
    "shape", f"{'x'.join(map(str, mask.shape))} voxels; guidance {task.guidance_scale:g}, {task.num_steps} steps"
  )
  return common.finish(
    hu,
    task.output,
    mask,
    work=work,
    dtype=np.int16,
    summary=summary,
    sidecar={"shape": list(mask.shape)},
    memory=memory,
  )


def synthesis_region(task: SynthesisSpec, labels: volumes.Volume | None, data: Any) -> tuple[str, str]:
  """(region, how it was decided): given, or ('auto') from the label map's landmarks: one region only; without a
  label map there is nothing to read it from."""
  if task.region != scans.AUTO:
    return task.region, "given (--config.region)"
  if labels is None:
    raise scans.Refusal(
      f"synthesis without --config.labels has no anatomy to read the region from; give --config.region="
      f"{'|'.join(preprocess.REGIONS)}"
    )
  parts = regions.from_labels(labels, data.class_names())
  if len(parts) != 1:
    found = " + ".join(p.region for p in parts) if parts else "no region's landmark organs"
    raise scans.Refusal(
      f"--config.labels={task.labels!r} shows {found}; synthesis makes one region: give --config.region="
      f"{'|'.join(preprocess.REGIONS)}"
    )
  return parts[0].region, "from the label map's landmarks (lungs, liver / spleen, hips, skull)"
