"""What every downstream task shares: the guided model, the mesh, volumes in and out.

A task module holds only its algorithm and its typed config (a `TaskSpec`); around it every task runs the
same prologue and epilogue: `prepare_input` (read and check the CT, region, working grid, [-1, 1] padded to
the window, structure conditions), `run_windowed` (the blended whole-volume denoiser over a `Canvas` on the
task mesh, the sampler jitted) and `finish` (back onto the input's grid, saved like the input, the sidecar
JSON).
Loading a pretrained model (names, workdirs, exported directories) is meddiff_jax/pretrained.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from meddiff_jax import pretrained, sections, sharding
from meddiff_jax.data import preprocess, volume_io, volumes
from meddiff_jax.diffusion import samplers
from meddiff_jax.models import conditions
from meddiff_jax.pretrained import Pretrained
from meddiff_jax.tasks import sliding_window

CHECKPOINT = "checkpoint"  # config.spacing: the checkpoint's training spacing (`task_spacing`)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """The options every task config shares (configs/task_options.py, input_options.py and the keys every
  task file sets), typed; each task module subclasses it with its own keys (DenoiseSpec, ...), and
  `from_config` refuses keys the task does not have. Paths are checked in checks.py (they touch the disk);
  the task's `run` takes its spec."""

  MODE: ClassVar[str] = ""
  mode: str
  output: str
  region: str
  labels: str
  num_steps: int
  sampler: str
  overlap: float
  window_batch: int
  seed: int
  inference_dtype: str
  read: volumes.ReadOptions  # assume_orientation, trust_affine, assume_hu, limits (volumes.INPUT_KEYS)

  def __post_init__(self):
    sections.choice("config.mode", self.mode, (self.MODE,))
    sections.text("config.output", self.output)
    try:
      preprocess.region_id(self.region)
    except ValueError as e:
      raise sections.ConfigError(f"--config.region: {e}") from None
    sections.text("config.labels", self.labels)
    sections.count("config.num_steps", self.num_steps)
    sections.choice("config.sampler", self.sampler, samplers.METHODS)
    sections.fraction("config.overlap", self.overlap, upper_open=True)
    sections.count("config.window_batch", self.window_batch)
    sections.count("config.seed", self.seed, 0)
    sections.choice("config.inference_dtype", self.inference_dtype, pretrained.COMPUTE_DTYPES)

  @classmethod
  def from_config(cls, config: Any) -> TaskSpec:
    values = {k: v for k, v in dict(config).items() if k not in volumes.INPUT_KEYS}
    return sections.from_config(cls, dict(values, read=volumes.ReadOptions.from_section(config)), "config")


def model_fn(pre: Pretrained, guidance_scale: jax.Array | None = None):
  """(x, t, cond) -> model output, classifier-free guided when a scale is given."""
  if guidance_scale is None:
    return pre.apply

  def fn(x, t, cond):
    return samplers.guided_denoise_fn(pre.apply, cond, pre.spec.num_regions, guidance_scale)(x, t)

  return fn


def structure_volume(
  pre: Pretrained, labels: np.ndarray | None, hu: np.ndarray, pad_to: int | None = None
) -> np.ndarray | None:
  """(X, Y, Z, K+1) uint8 structure channels exactly as training builds them (`preprocess.structure_channels`).

  The body channel always comes from the HU (HU > BODY_THRESHOLD_HU, the training definition). The organ
  channels come from a TotalSegmentator label map (`--config.labels`); without one they are all zero,
  the "organs unknown" condition that training produces with structure-only dropout
  (`diffusion.structure_drop_prob`): never all channels zero next to a real region, which training never
  shows. `pad_to`: pad like the image (`sliding_window.pad_to_window`), zeros outside the volume.
  """
  if not pre.spec.structure_channels:
    return None
  if hu is None:
    raise ValueError("structure_volume needs the HU volume: the body channel is computed from it as in training")
  lut, groups = pre.data.structure_lut()
  encode = preprocess.structure_labels if pre.data.structures_as_labels else preprocess.structure_channels
  out = encode(labels, np.asarray(hu), lut, groups)
  if out.shape[-1] != pre.spec.structure_channels:
    raise ValueError(
      f"the checkpoint expects {pre.spec.structure_channels} structure channels, the label "
      f"grouping gives {out.shape[-1]}"
    )
  if pad_to:
    out, _ = sliding_window.pad_to_window(out, pad_to, 0)
  return out


def task_spacing(pre: Pretrained, spacing: tuple[float, ...] | str) -> tuple[float, float, float] | None:
  """The working voxel size: `--config.spacing` in mm, or 'checkpoint': the checkpoint's training spacing (the
  network is only right at the scale it learned); None (the input's own grid) when that is not known."""
  if spacing != CHECKPOINT:
    return tuple(float(s) for s in spacing)
  return pre.data.training_spacing()


def read_labels(source: str | volumes.Volume) -> volumes.Volume | None:
  """A label map: `--config.labels` read (a path), or given in memory (`InMemory.labels`); None when neither."""
  if isinstance(source, volumes.Volume):
    return source
  return volume_io.load(source, is_mask=True) if source else None


def load_labels(source: str | volumes.Volume, original: volumes.Volume, work: volumes.Volume) -> np.ndarray | None:
  """A TotalSegmentator label map (`--config.labels`, or a Volume: `read_labels`) on the input's grid, moved to the
  working grid (nearest)."""
  labels = read_labels(source)
  if labels is None:
    return None
  name = f"--config.labels={source!r}" if isinstance(source, str) else "labels"
  try:
    volumes.check_same_grid(original, labels)
  except ValueError as e:
    raise ValueError(f"{name}: {e}") from None
  if work.shape == original.shape and np.allclose(work.affine, original.affine):
    return labels.data
  moved = volumes.resample(labels, work.spacing, order=0, fill=0.0).data
  if moved.shape != work.shape:
    raise ValueError(f"{name}: resampled to {moved.shape}, the image to {work.shape}")
  return moved


def window_batch(task: TaskSpec) -> int:
  """Windows per batch: config.window_batch rounded up to a multiple of the device count so every device
  gets some."""
  n = jax.device_count()
  return max(n, int(np.ceil(task.window_batch / n)) * n)


def load_ct(
  source: str | volumes.Volume, spacing: tuple[float, ...] | None, options: volumes.ReadOptions
) -> tuple[volumes.Volume, volumes.Volume]:
  """(original volume, working volume resampled to `spacing` (None: as is)). `source`: a NIfTI / NRRD / MHA file
  or a DICOM series folder, read with `options` (configs/input_options.py: TaskSpec.read), or a volume in memory
  as volume_io reads one (`volume_io.from_array`); checked as CT either way."""
  original = source if isinstance(source, volumes.Volume) else volume_io.load(source, options=options)
  volumes.check_ct(original, assume_hu=options.assume_hu)
  work = original
  if spacing:
    work = volumes.resample(original, tuple(spacing), order=1)
  return original, work


def back_to_input_grid(
  values: np.ndarray, work: volumes.Volume, original: volumes.Volume, order: int = 1
) -> np.ndarray:
  """Resample a result computed on the working grid back onto the input's grid (same shape/affine)."""
  if work.shape == original.shape and np.allclose(work.affine, original.affine):
    return values
  back = volumes.resample_like(
    volumes.Volume(np.asarray(values, np.float32), work.affine),
    original.shape,
    original.affine,
    order=order,
    fill=float(np.min(values)),
  )
  return back.data


def save_like_input(
  values_ras: np.ndarray, original: volumes.Volume, path: str, dtype=None, description: str = ""
) -> str:
  """Write a task result on the input's own grid: same shape, voxel order, affine and qform/sform codes
  (NIfTI), or a new DICOM series beside the original when the input was DICOM and `path` is a folder."""
  return volume_io.save_like(values_ras, original, path, dtype, description=description)


@dataclasses.dataclass(frozen=True)
class TaskInput:
  """A CT read for a task, on the model's grid and scale."""

  original: volumes.Volume  # as read: the output is saved on its grid, voxel order and header
  work: volumes.Volume  # on the working grid (resampled to the working spacing, or `original` itself)
  region: int
  unit: np.ndarray  # (X, Y, Z) `work` in [-1, 1], padded with -1 to at least the patch on every side
  crop: tuple[slice, ...]  # unit[crop] is `work`; also the windows' position frame
  structures: np.ndarray | None  # the structure conditions, padded like `unit`
  patch_size: int

  def pad(self, values: np.ndarray, fill: float) -> np.ndarray:
    """Another volume on the working grid padded like `unit` (e.g. a lesion mask)."""
    return sliding_window.pad_to_window(values, self.patch_size, fill)[0]

  def canvas(self, hint: np.ndarray | None = None) -> Canvas:
    """The padded volume as the windows cover it, positions those of the real volume; `hint`: a ControlNet
    condition volume (X, Y, Z, 1) padded like `unit`."""
    return Canvas(self.unit.shape, self.region, self.structures, self.crop, hint)


def prepare_input(
  pre: Pretrained, task: Any, spacing: tuple[float, ...] | None, memory: InMemory | None = None
) -> TaskInput:
  """The task prologue: `task.input` read and checked as CT (`task.read`: configs/input_options.py), moved to
  `spacing` (None: its own grid), mapped to [-1, 1] with `task.region`'s window and padded to the patch; the
  structure conditions from `task.labels` (or the body channel alone). `task`: a TaskSpec with an input;
  `memory`: the CT and labels given in memory instead (`InMemory`)."""
  original, work = load_ct(given(task.input, memory and memory.ct), spacing, task.read)
  region = preprocess.region_id(task.region)
  unit, crop = sliding_window.pad_to_window(preprocess.hu_to_unit(work.data, region), pre.patch_size, fill=-1.0)
  labels = load_labels(given(task.labels, memory and memory.labels), original, work)
  structures = structure_volume(pre, labels, work.data, pre.patch_size)
  return TaskInput(original, work, region, unit, crop, structures, pre.patch_size)


@dataclasses.dataclass
class InMemory:
  """A task run from Python (meddiff_jax/api.py) on what is already in memory: the model loaded once (`model`: a
  Pretrained, or a Controlled for the ControlNet tasks; each run computes in its task's inference dtype), the CT
  and the label map as volumes (`volume_io.from_array`) in place of `task.input` / `task.labels`. The task's `run(task,
  memory)` reads nothing else; `finish` leaves the result here, as a file would hold it (`result`, `affine`:
  `volume_io.as_saved`), and writes `task.output` only when one is set."""

  model: Any
  ct: volumes.Volume | None = None
  labels: volumes.Volume | None = None
  result: np.ndarray | None = None
  affine: np.ndarray | None = None


def given(path: str, volume: volumes.Volume | None) -> str | volumes.Volume:
  """What a task reads: the volume given in memory, else the config's path."""
  return path if volume is None else volume


def load_model(task: Any, memory: InMemory | None = None) -> Any:
  """The task's model: `memory.model`, else read from `task.checkpoint` (a Pretrained) or `task.controlnet` (a
  fine-tuning workdir: a Controlled), computing in `task.inference_dtype`."""
  if memory is not None:
    return pretrained.with_compute_dtype(memory.model, task.inference_dtype)
  if hasattr(task, "controlnet"):
    return pretrained.load_controlled(task.controlnet, task.inference_dtype)
  return pretrained.load(task.checkpoint, task.inference_dtype)


def sidecar_path(output: str) -> str:
  """OUTPUT.json beside a task's output (OUTPUT.nii.gz, OUTPUT.nii or a DICOM folder OUTPUT/)."""
  return output.rstrip("/\\").replace(".nii.gz", "").replace(".nii", "") + ".json"


def finish(
  values: np.ndarray,
  output: str,
  like: volumes.Volume,
  *,
  work: volumes.Volume | None = None,
  dtype=None,
  description: str = "",
  sidecar: dict[str, Any] | None = None,
  memory: InMemory | None = None,
) -> None:
  """The task epilogue: `values` (computed on the grid of `work`, default `like`'s) back onto `like`'s grid,
  saved like it (`save_like_input`), and the result summary `sidecar` as OUTPUT.json beside it; with `memory`,
  also left there as the file holds it, and written only when `output` is set."""
  if work is not None:
    values = back_to_input_grid(values, work, like)
  if memory is not None:
    memory.result, memory.affine = volume_io.as_saved(values, like, dtype)
    if not output:
      return
  save_like_input(values, like, output, dtype, description)
  if sidecar is not None:
    with open(sidecar_path(output), "w") as f:
      json.dump(sidecar, f, indent=1, default=float)


@dataclasses.dataclass(frozen=True)
class Canvas:
  """What the windows of `run_windowed` cover and are conditioned on: the whole (padded) volume's shape, the
  region id, the structure channels over it (or None), the crop of the real volume (positions are those of
  the real volume, as in training; the result is cropped to it; None: all of it) and a ControlNet condition
  volume (X, Y, Z, 1) windowed with the image (or None)."""

  shape: tuple[int, ...]
  region: int
  structures: np.ndarray | None
  frame: tuple[slice, ...] | None
  hint: np.ndarray | None


def run_windowed(
  pre: Pretrained,
  sample: Callable[..., jax.Array],
  args: tuple,
  canvas: Canvas,
  task: TaskSpec,
  *,
  apply_fn: Callable[..., jax.Array] | None = None,
  progress: ProgressBar | None = None,
) -> np.ndarray:
  """Run a sampler over a whole (padded) volume on the task mesh: `sample(fn, *args, rng)` jitted, where fn is
  the blended windowed eps prediction over `canvas` (`windowed_denoiser`: `task`'s overlap and window batch, the
  model `apply_fn`, default `pre`'s) and rng = key(task.seed). Returns the (X, Y, Z) result, cropped to
  `canvas.frame`; closes `progress`."""
  with sharding.activate(task_mesh(), sharding.DEFAULT_RULES):
    fn, plan = windowed_denoiser(pre, canvas, task, apply_fn)
    if progress is not None:
      progress.windows = int(plan.valid.sum())
    out = np.asarray(jax.jit(lambda *a: sample(fn, *a))(*args, jax.random.key(task.seed)))
  if progress is not None:
    progress.close()
  out = out[0, ..., 0]
  return out if canvas.frame is None else out[canvas.frame]


def windowed_denoiser(pre: Pretrained, canvas: Canvas, task: TaskSpec, apply_fn: Callable | None = None):
  """((x (1,X,Y,Z,1), t) -> the blended eps prediction over the whole (padded) volume of `canvas`, windows over
  devices; the window plan). The model output is read in the checkpoint's parameterisation
  (`pre.diffusion.prediction_type`, `samplers.epsilon_fn`): every task algorithm takes eps. apply_fn overrides
  the model (e.g. base + branch, or `model_fn` with guidance)."""
  plan = sliding_window.plan_windows(
    tuple(canvas.shape), pre.patch_size, task.overlap, window_batch(task), canvas.frame
  )
  cond = {conditions.REGION: jnp.array([canvas.region], jnp.int32)}
  if canvas.structures is not None:
    cond[conditions.STRUCTURES] = jnp.asarray(canvas.structures)
  if canvas.hint is not None:
    cond[conditions.HINT] = jnp.asarray(canvas.hint)
  axes = ("data",) if jax.device_count() > 1 else None
  blended = sliding_window.blended_denoise_fn(apply_fn or pre.apply, plan, cond, axes)
  return samplers.epsilon_fn(blended, pre.schedule, pre.diffusion.prediction_type), plan


class ProgressBar:
  """A tqdm bar fed from inside jitted loops through `jax.debug.callback` (process 0 only).

  Shows steps and, when `windows` (network windows per step) is set, windows/s. After the second step
  (the first includes compilation) it prints the measured time per step and the estimated total, so a
  user can stop a long run and pick a cheaper budget (--config.num_steps, --config.sampler=dpmpp_2m).
  """

  def __init__(self, total: int, desc: str, windows: int = 0):
    import time

    from tqdm import tqdm

    self._clock = time.perf_counter
    self.total, self.windows = total, windows
    self.bar = tqdm(total=total, desc=desc, unit="step", disable=jax.process_index() != 0)
    self._seen: list[tuple[int, float]] = []  # (step index, time) of the first two callbacks

  def __call__(self, i) -> None:
    i, now = int(i), self._clock()
    if len(self._seen) < 2:
      self._seen.append((i, now))
      if len(self._seen) == 2:
        self._report_estimate()
    self.bar.n = i + 1
    if self.windows and len(self._seen) == 2:
      (i0, t0) = self._seen[0]
      if i > i0 and now > t0:
        self.bar.set_postfix_str(f"{self.windows * (i - i0) / (now - t0):.1f} windows/s", refresh=False)
    self.bar.refresh()

  def estimate(self) -> tuple[float, float] | None:
    """(seconds per step, estimated seconds for the remaining steps) once two steps were seen."""
    if len(self._seen) < 2:
      return None
    (i0, t0), (i1, t1) = self._seen
    per_step = (t1 - t0) / max(i1 - i0, 1)
    return per_step, per_step * (self.total - i1 - 1)

  def _report_estimate(self) -> None:
    per_step, rest = self.estimate()
    rate = f", {self.windows / per_step:.1f} windows/s" if self.windows and per_step > 0 else ""
    if not self.bar.disable:
      self.bar.write(
        f"{self.bar.desc}: {per_step:.2f} s/step{rate}; estimated {rest / 60:.1f} min for the "
        f"remaining {self.total - self._seen[1][0] - 1} steps (Ctrl-C and lower --config.num_steps "
        f"or use --config.sampler=dpmpp_2m for a cheaper budget)"
      )

  def close(self) -> None:
    self.bar.close()


def task_mesh() -> jax.sharding.Mesh:
  return sharding.make_mesh({"data": -1})
