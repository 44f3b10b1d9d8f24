"""ControlNet-conditioned tasks on whole volumes: super-resolution, lesion generation, lesion inpainting.

All three sample with the frozen base + fine-tuned branch through overlapping windows (the condition
volume is windowed with the image), on the grid the branch was trained at (its run's data.spacing, which is its
base's: train/controlnet.derive_config). Inpainting is RePaint (Lugmayr et al. 2022): at every step the known
region (outside the lesion mask) is replaced by the forward-noised original, and RePaint's jump schedule
re-noises and re-denoises so the generated region harmonises with its surroundings. The paper's jumps are 10
steps of a 250-step grid over T = 1000, i.e. 40 timesteps, with r = 10 resamplings: here `jump_timesteps` (in
timesteps of the model's schedule, rounded to whole steps of the sampling grid) and `jump_n_sample`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from meddiff_jax import pretrained, sections
from meddiff_jax.data import geometry, preprocess, volume_io, volumes
from meddiff_jax.diffusion import samplers, schedules
from meddiff_jax.evaluation import metrics
from meddiff_jax.tasks import common, scans


@dataclasses.dataclass(frozen=True)
class SuperResolutionSpec(common.TaskSpec):
  """configs/super_resolution.py, typed."""

  MODE = "super_resolution"
  controlnet: str
  input: str
  reference: str
  spacing: tuple[float, float, float] | str  # the thin output grid in mm, or 'checkpoint' (its training spacing)
  conditioning_scale: float
  window_blend_hu: float  # the (interpolated) scan's own HU outside the window, blended over this at its edges

  def __post_init__(self):
    super().__post_init__()
    sections.text("config.reference", self.reference)
    sections.keyword_or("config.spacing", self.spacing, (common.CHECKPOINT,), sections.sizes)
    sections.at_least("config.conditioning_scale", self.conditioning_scale, 0.0)
    sections.at_least("config.window_blend_hu", self.window_blend_hu, 0.0)


LESION_METHODS = ("inpaint", "generate")  # config.method of configs/lesion.py
JUMP_TIMESTEPS = 40  # RePaint: jump length 10 on its 250-step grid over T = 1000
JUMP_N_SAMPLE = 10  # RePaint: r = 10 (each jump point is passed 10 times)


@dataclasses.dataclass(frozen=True)
class LesionSpec(common.TaskSpec):
  """configs/lesion.py, typed (jump_timesteps against the model's timesteps: checks.task, and `repaint`)."""

  MODE = "lesion"
  controlnet: str
  input: str
  mask: str
  spacing: tuple[float, float, float] | str  # mm, or 'checkpoint' (the branch run's training spacing)
  method: str
  jump_timesteps: int
  jump_n_sample: int
  conditioning_scale: float
  dice_threshold_hu: float
  window_blend_hu: float  # the scan's own HU outside the window, blended over this around its edges

  def __post_init__(self):
    super().__post_init__()
    sections.keyword_or("config.spacing", self.spacing, (common.CHECKPOINT,), sections.sizes)
    sections.choice("config.method", self.method, LESION_METHODS)
    sections.count("config.jump_timesteps", self.jump_timesteps)
    sections.count("config.jump_n_sample", self.jump_n_sample)
    sections.at_least("config.conditioning_scale", self.conditioning_scale, 0.0)
    sections.at_least("config.window_blend_hu", self.window_blend_hu, 0.0)


def jump_steps(num_train_timesteps: int, num_steps: int, jump_timesteps: int) -> int:
  """Steps of a `num_steps` grid over `num_train_timesteps` that span about `jump_timesteps` (at least one):
  RePaint's 40 timesteps are its 10 steps at 250 steps, 2 steps at 50."""
  if not 0 < jump_timesteps < num_train_timesteps:
    raise ValueError(f"jump_timesteps={jump_timesteps}; choose 1..{num_train_timesteps - 1}")
  return max(1, int(np.floor(jump_timesteps * num_steps / num_train_timesteps + 0.5)))


def repaint_schedule(num_steps: int, jump_length: int = 10, jump_n_sample: int = JUMP_N_SAMPLE) -> np.ndarray:
  """RePaint's jump schedule (Lugmayr et al. 2022, `get_schedule_jump` with n_sample = 1) over grid indices.

  Index u in [0, num_steps) is the u-th smallest timestep of the grid, -1 the clean image. Going down
  one index is a denoising step; at every multiple of `jump_length` (grid steps: `jump_steps`) below the top the
  walk jumps back up `jump_length` indices (re-noising), `jump_n_sample - 1` times. The walk ends at -1 exactly
  once, so a clean x0 is never denoised again.
  """
  if jump_length < 1 or jump_n_sample < 1:
    raise ValueError(f"jump_length={jump_length}, jump_n_sample={jump_n_sample}: both must be >= 1")
  jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
  u, walk = num_steps - 1, [num_steps - 1]
  while u >= 0:
    u -= 1
    walk.append(u)
    if u >= 0 and jumps.get(u, 0) > 0:
      jumps[u] -= 1
      for _ in range(jump_length):
        u += 1
        walk.append(u)
  return np.asarray(walk, np.int32)


def repaint(
  denoise_fn,
  schedule: schedules.Schedule,
  timesteps: np.ndarray,
  rng: jax.Array,
  known: jax.Array,
  keep: jax.Array,
  jump_timesteps: int = JUMP_TIMESTEPS,
  jump_n_sample: int = JUMP_N_SAMPLE,
  prediction_type: str = "epsilon",
) -> jax.Array:
  """RePaint with DDPM steps over `timesteps`: `keep` (1 = known voxel) takes the noised `known` image.

  Every denoising step t -> t' replaces the known region by q(x_t' | known) (the known image itself at
  t' = -1); every jump back up (`jump_timesteps` of the schedule, in whole grid steps: `jump_steps`) re-noises
  the whole state with q(x_t | x_t'), so the generated region harmonises with what is kept.
  """
  asc = np.sort(np.asarray(timesteps, np.int32))
  steps = jump_steps(schedule.num_timesteps, len(asc), jump_timesteps)
  walk = repaint_schedule(len(asc), steps, jump_n_sample)
  time = lambda u: np.where(u >= 0, asc[np.maximum(u, 0)], -1).astype(np.int32)
  t_from, t_to = jnp.asarray(time(walk[:-1])), jnp.asarray(time(walk[1:]))
  down = jnp.asarray(walk[1:] < walk[:-1])
  n = known.shape[0]
  rng, init = jax.random.split(rng)
  x = jax.random.normal(init, known.shape)

  def denoise(x, t, t_prev, rng):
    k1, k2 = jax.random.split(rng)
    noise = jax.random.normal(k1, x.shape)
    unknown = samplers.ddpm_step(schedule, denoise_fn(x, t), x, t, t_prev, noise, prediction_type=prediction_type)
    known_prev = schedules.q_sample(schedule, known, t_prev, jax.random.normal(k2, x.shape))
    known_prev = jnp.where(t_prev.reshape(-1, 1, 1, 1, 1) < 0, known, known_prev)
    return keep * known_prev + (1.0 - keep) * unknown

  def renoise(x, t, t_next, rng):
    # q(x_t_next | x_t) for t_next > t: abar ratio abar_next / abar_t
    ratio = schedules.alpha_bar(schedule, t_next, x.ndim) / schedules.alpha_bar(schedule, t, x.ndim)
    return jnp.sqrt(ratio) * x + jnp.sqrt(1.0 - ratio) * jax.random.normal(rng, x.shape)

  def body(k, carry):
    x, rng = carry
    rng, step_rng = jax.random.split(rng)
    t, t_next = jnp.full((n,), t_from[k]), jnp.full((n,), t_to[k])
    x = jax.lax.cond(down[k], denoise, renoise, x, t, t_next, step_rng)
    return x, rng

  x, _ = jax.lax.fori_loop(0, len(walk) - 1, body, (x, rng))
  return x


def lesion_dice(
  generated_hu: np.ndarray, background_hu: np.ndarray, mask: np.ndarray, threshold_hu: float = 20.0
) -> float:
  """Dice between the lesion mask and a simple threshold segmentation of what changed: voxels within a
  dilated mask whose HU differs from the lesion-free scan by more than threshold_hu."""
  region = ndimage.binary_dilation(mask, iterations=2)
  seg = (np.abs(generated_hu - background_hu) > threshold_hu) & region
  return metrics.dice(seg, mask)


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
  """The box of `mask`'s true voxels widened by `margin` (clipped to the array), or None when there are none."""
  found = [np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != k))) for k in range(mask.ndim)]
  if not all(len(f) for f in found):
    return None
  return tuple(slice(max(0, f[0] - margin), min(n, f[-1] + 1 + margin)) for f, n in zip(found, mask.shape))


def grid_box(selected: np.ndarray, affine: np.ndarray, volume: volumes.Volume) -> tuple[slice, ...] | None:
  """The box of `volume`'s voxels that a nearest resampling of `selected` (on `affine`) onto its grid can set: the
  selected voxels' box widened by a voxel and a half of their grid (the nearest voxel, and geometry.resample_to's
  edge tolerance) mapped into `volume`'s index space, widened by one more voxel there. None when nothing is selected."""
  box = bounding_box(selected)
  if box is None:
    return None
  corners = np.array(list(itertools.product(*[(sl.start - 1.5, sl.stop - 1 + 1.5) for sl in box])))
  to_volume = np.linalg.solve(np.asarray(volume.affine, np.float64), np.asarray(affine, np.float64))
  index = corners @ to_volume[:3, :3].T + to_volume[:3, 3]
  lo, hi = np.floor(index.min(axis=0)).astype(int) - 1, np.ceil(index.max(axis=0)).astype(int) + 2
  inside = tuple(slice(max(0, a), min(n, b)) for a, b, n in zip(lo, hi, volume.shape))
  return inside if all(sl.start < sl.stop for sl in inside) else None


def intersect(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...] | None:
  """The overlap of two boxes (start:stop slices), or None."""
  both = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
  return both if all(sl.start < sl.stop for sl in both) else None


def within(inner: tuple[slice, ...], outer: tuple[slice, ...]) -> tuple[slice, ...]:
  """`inner` (a box inside `outer`) as slices of outer's block."""
  return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


class PackedMask:
  """A boolean volume as bits (np.packbits along axis 0: an eighth of its bytes); `mask[index]` unpacks a box of
  start:stop slices."""

  def __init__(self, mask: np.ndarray):
    self.shape = mask.shape
    self.bits = np.packbits(mask, axis=0)

  def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
    rows = np.unpackbits(self.bits[(slice(None), *index[1:])], axis=0, count=self.shape[0])
    return rows[index[0]].view(np.bool_)


class ChangeScores:
  """What a lesion run changed, block by block (the scan as read, the block as written): PSNR inside and outside the
  mask on the region's [-1, 1] scale and the Dice of `lesion_dice`, equal to metrics.psnr and lesion_dice on the
  whole volumes (the mask's box, dilated as lesion_dice dilates it, is kept for the Dice). `lesion` (bool) is kept
  as bits (`self.lesion`, a PackedMask)."""

  def __init__(self, lesion: np.ndarray, region: int, threshold_hu: float):
    self.lesion, self.region, self.threshold_hu = PackedMask(lesion), region, threshold_hu
    self.squares = {True: 0.0, False: 0.0}
    self.count = {True: 0, False: 0}
    self.box = bounding_box(lesion, margin=2)  # binary_dilation(iterations=2) reaches no further
    if self.box is not None:
      shape = tuple(sl.stop - sl.start for sl in self.box)
      self.before, self.after = np.zeros(shape, np.float32), np.zeros(shape, np.float32)

  def add(self, index: tuple[slice, ...], before_hu: np.ndarray, after_hu: np.ndarray) -> None:
    a = preprocess.hu_to_unit(before_hu, self.region).astype(np.float64)
    a -= preprocess.hu_to_unit(after_hu, self.region)
    a *= a
    inside = self.lesion[index]
    for where, pick in ((True, inside), (False, ~inside)):
      self.squares[where] += float(a[pick].sum())
      self.count[where] += int(pick.sum())
    both = None if self.box is None else intersect(index, self.box)
    if both is not None:
      into, local = within(both, self.box), within(both, index)
      self.before[into], self.after[into] = before_hu[local], after_hu[local]

  def psnr(self, inside: bool) -> float | None:
    if not self.count[inside]:
      return None
    return metrics.psnr_of_mse(self.squares[inside] / self.count[inside], 2.0)

  def result(self) -> dict[str, Any]:
    dice = 1.0 if self.box is None else lesion_dice(self.after, self.before, self.lesion[self.box], self.threshold_hu)
    return {
      "psnr_inside_mask": self.psnr(True),
      "psnr_outside_mask": self.psnr(False),
      "dice_threshold_segmentation": dice,
    }


def sample_controlled(
  cm: pretrained.Controlled, inp: common.TaskInput, hint: np.ndarray, task: Any, sample: Any
) -> np.ndarray:
  """`sample(fn, rng)` over the whole volume with fn the base + branch denoiser (`task.conditioning_scale`), the
  (padded) condition volume `hint` (X, Y, Z) windowed with the image; the result in [-1, 1], cropped to the
  input. `task`: SuperResolutionSpec or LesionSpec."""
  canvas = inp.canvas(hint[..., None])
  return common.run_windowed(
    cm.pre, sample, (), canvas, task, apply_fn=cm.apply_fn(task.conditioning_scale), params=cm.params
  )


def from_noise(schedule, timesteps: np.ndarray, shape: tuple[int, ...], method: str):
  """`sample(fn, rng)` from pure noise x_T (its own key; the sampler gets another) over `timesteps`."""

  def sample(fn, rng):
    init_rng, sample_rng = jax.random.split(rng)
    return samplers.sample(fn, schedule, timesteps, sample_rng, jax.random.normal(init_rng, shape), method=method)

  return sample


def run_super_resolution(task: SuperResolutionSpec, memory: common.InMemory | None = None) -> dict[str, Any]:
  """LR NIfTI (thick slices) -> trilinear onto the thin grid -> ControlNet sample -> HR NIfTI; with a
  reference, PSNR / SSIM against trilinear and cubic interpolation. `memory`: the model and the LR volume given
  in memory, the result kept there (meddiff_jax/api.py)."""
  # the network runs at the branch run's training spacing (its base's); the result goes to the thin grid asked for
  # ('checkpoint': the same)
  asked = None if task.spacing == common.CHECKPOINT else tuple(float(s) for s in task.spacing)
  data = common.model_data(task, memory)
  setting = common.CHECKPOINT if data.training_spacing() else (asked or common.INPUT)
  scan = common.open_scan(task, data, by_region=False, spacing=setting, memory=memory)
  summary = common.summary(task, scan, task.controlnet, task.window_blend_hu)
  cm = common.load_model(task, memory)
  inp = common.prepare_input(cm.pre, task, scan=scan)
  lr, up, region = inp.original, inp.work, inp.region
  model_spacing = up.spacing
  target_spacing = asked or model_spacing
  timesteps = samplers.make_timesteps(cm.pre.schedule.num_timesteps, task.num_steps, "trailing")
  sample = from_noise(cm.pre.schedule, timesteps, (1, *inp.unit.shape, 1), task.sampler)
  out = sample_controlled(cm, inp, inp.unit, task, sample)
  hu = scans.keep_outside_window(preprocess.unit_to_hu(out, region), up.data, region, task.window_blend_hu)
  sr_vol = volumes.Volume(data=hu, affine=up.affine, path=up.path, source=up.source)
  if not np.allclose(model_spacing, target_spacing):
    sr_vol = volumes.resample(sr_vol, target_spacing, order=1, fill=-1024.0)
  sr = sr_vol.data
  result: dict[str, Any] = {"output": task.output, "shape": list(sr.shape), "spacing": list(sr_vol.spacing)}
  if task.reference:
    ref = volume_io.load(task.reference)
    cubic = volumes.resample(lr, target_spacing, order=3, fill=-1024.0).data
    linear = volumes.resample(lr, target_spacing, order=1, fill=-1024.0).data
    sl = tuple(slice(0, min(a, b)) for a, b in zip(ref.shape, sr.shape))
    unit = lambda v: preprocess.hu_to_unit(v[sl], region)
    result["metrics"] = {
      name: {"psnr": metrics.psnr(unit(ref.data), unit(v), 2.0), "ssim": metrics.ssim(unit(ref.data), unit(v), 2.0)}
      for name, v in (("controlnet", sr), ("trilinear", linear), ("cubic", cubic))
    }
  summary.spacing += f"; written on the {scans._mm(target_spacing)} grid asked for"
  # the thin grid, in the input's voxel order
  return common.finish(sr, task.output, sr_vol, dtype=np.int16, sidecar=result, summary=summary, memory=memory)


def mask_on_grid(mask: volumes.Volume, work: volumes.Volume) -> np.ndarray:
  """A mask on the input's grid moved to the working grid `work` (nearest), as the label maps are."""
  if mask.shape == work.shape and np.allclose(mask.affine, work.affine):
    return mask.data > 0
  moved = volumes.resample_like(mask, work.shape, work.affine, order=0, fill=0.0).data
  return moved > 0


def run_lesion(task: LesionSpec) -> dict[str, Any]:
  """CT + lesion mask NIfTI -> a lesion generated inside the mask, on the branch's training grid and back. method
  'inpaint' (RePaint: the scan is kept outside the mask, exactly as read) or 'generate' (the whole window
  resampled, conditioned on the mask). The result is written into the scan's own array slab by slab, scored as it
  goes: memory is the scan, the mask as bits and one slab (benchmarks/RESULTS.md "#25")."""
  # (jump_timesteps within the schedule: checks.task, before any work)
  scan = common.open_scan(task, common.data_spec(task.controlnet), by_region=False)
  mask = volume_io.load(task.mask, is_mask=True, options=task.read, binary=True)  # (label > 0: a byte a voxel)
  if mask.shape != scan.original.shape or not np.allclose(mask.affine, scan.original.affine, atol=1e-2):
    raise scans.Refusal(f"--config.mask={task.mask!r} is on another grid than --config.input; give a mask on its grid")
  lesion = mask.data
  mask = volumes.Volume(lesion.view(np.uint8), mask.affine)  # (resampled as 0 / 1)
  summary = common.summary(task, scan, task.controlnet, task.window_blend_hu)
  cm = pretrained.load_controlled(task.controlnet, task.inference_dtype)
  inp = common.prepare_input(cm.pre, task, scan=scan)  # on the branch's training grid (task.spacing)
  m = inp.pad(mask_on_grid(mask, inp.work).astype(np.float32), 0.0)
  scores = ChangeScores(lesion, inp.region, task.dice_threshold_hu)
  lesion = scores.lesion  # as bits: the mask as read is freed
  del mask
  timesteps = samplers.make_timesteps(cm.pre.schedule.num_timesteps, task.num_steps, "trailing")
  known = jnp.asarray(inp.unit)[None, ..., None]
  hole = ndimage.binary_dilation(m > 0, iterations=1)  # regenerated: the lesion and a one-voxel rim
  if task.method == "inpaint":
    keep = 1.0 - jnp.asarray(hole, jnp.float32)[None, ..., None]
    sample = lambda fn, r: repaint(
      fn, cm.pre.schedule, timesteps, r, known, keep, task.jump_timesteps, task.jump_n_sample
    )
  else:  # generate
    sample = from_noise(cm.pre.schedule, timesteps, known.shape, task.sampler)
  gen_unit = sample_controlled(cm, inp, m * 2.0 - 1.0, task, sample)
  part = scans.PartResult(inp.part, inp.work, preprocess.unit_to_hu(gen_unit, inp.region))
  # inpaint: the scan outside the regenerated region (on the scan's grid: the hole moved back, nearest), as read
  regenerated = hole[inp.crop].astype(np.float32) if task.method == "inpaint" else None

  box = None if regenerated is None else grid_box(regenerated > 0.5, inp.work.affine, scan.original)

  def finish_block(index: tuple[slice, ...], block: np.ndarray) -> np.ndarray:
    before = scan.original.data[index]  # (not yet overwritten)
    if regenerated is not None:
      new = lesion[index].copy()
      both = intersect(index, box) if box is not None else None
      if both is not None:  # the hole, moved back where it can reach
        shape, affine = geometry.box_grid(scan.original.shape, scan.original.affine, both)
        moved = geometry.resample_to(regenerated, inp.work.affine, shape, affine, order=0, fill=0.0)
        new[within(both, index)] |= moved > 0.5
      block = np.where(new, block, np.round(before))
    scores.add(index, before, block)
    return block

  # what the file holds (the scan's HU outside the window, int16), so the scores are those of the written volume
  gen = scans.onto_scan(
    scan, [part], window_blend_hu=task.window_blend_hu, dtype=np.int16, in_place=True, finish_block=finish_block
  )
  result = {"output": task.output, "method": task.method, **scores.result()}
  dice = result["dice_threshold_segmentation"]
  summary.add("lesion", f"{task.method}, {scores.count[True]} mask voxels; Dice of what changed {dice:.3f}")
  return common.finish_scan(
    scan,
    [part],
    task,
    summary,
    window_blend_hu=task.window_blend_hu,
    dtype=np.int16,
    description=f"meddiff lesion {task.method} ({task.controlnet})",
    sidecar=result,
    values=gen,
  )
