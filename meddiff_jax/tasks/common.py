"""What every downstream task shares: the guided model, the mesh, volumes in and out.

A task module holds only its algorithm and its typed config (a `TaskSpec`); around it every task runs the
same prologue and epilogue: `open_scan` (tasks/scans.py: read and check the CT and its label map, decide the
region parts and the working spacing, before the model loads), `prepare_part` (one part on the working grid,
[-1, 1] padded to the window, structure conditions), `run_windowed` (the blended whole-volume denoiser over a
`Canvas` on the task mesh, the sampler jitted, Ctrl-C honoured between window batches) and `finish_scan`
(tasks/scans.py: back onto the scan's grid, the scan's HU kept outside the window, saved like the input with its
JSON sidecar, the closing summary).
Loading a pretrained model (names, workdirs, exported directories) is meddiff_jax/pretrained.py.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from meddiff_jax import pretrained, sections, sharding
from meddiff_jax.data import preprocess, regions, volume_io, volumes, workers
from meddiff_jax.data.spec import DataSpec
from meddiff_jax.diffusion import samplers
from meddiff_jax.models import conditions
from meddiff_jax.pretrained import Pretrained
from meddiff_jax.tasks import scans, sliding_window

CHECKPOINT = scans.CHECKPOINT  # config.spacing: the checkpoint's training spacing (`task_spacing`)
INPUT = scans.INPUT  # config.spacing: the scan's own grid


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """The options every task config shares (configs/task_options.py, input_options.py and the keys every
  task file sets), typed; each task module subclasses it with its own keys (DenoiseSpec, ...), and
  `from_config` refuses keys the task does not have. Paths are checked in checks.py (they touch the disk);
  the task's `run` takes its spec."""

  MODE: ClassVar[str] = ""
  mode: str
  output: str
  overwrite: bool  # replace an existing output (an output that is an input is refused regardless)
  region: str  # 'auto' (the label map, else the scan) or a region
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
    sections.flag("config.overwrite", self.overwrite)
    sections.choice("config.region", self.region, scans.REGION_CHOICES)
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
  """(params, x, t, cond) -> model output of `pre`'s network, classifier-free guided when a scale is given."""
  if guidance_scale is None:
    return pre.apply_with

  def fn(params, x, t, cond):
    apply = functools.partial(pre.apply_with, params)
    return samplers.guided_denoise_fn(apply, cond, pre.spec.num_regions, guidance_scale)(x, t)

  return fn


def structure_volume(
  pre: Pretrained, labels: np.ndarray | None, hu: np.ndarray, pad_to: int | None = None, *, packed: bool = False
) -> np.ndarray | None:
  """(X, Y, Z, K+1) uint8 structure channels exactly as training builds them (`preprocess.structure_channels`).

  The body channel always comes from the HU (HU > BODY_THRESHOLD_HU, the training definition). The organ
  channels come from a TotalSegmentator label map (`--config.labels`); without one they are all zero,
  the "organs unknown" condition that training produces with structure-only dropout
  (`diffusion.structure_drop_prob`): never all channels zero next to a real region, which training never
  shows. `pad_to`: pad like the image (`sliding_window.pad_to_window`), zeros outside the volume. `packed`: grouped
  channels as one packed channel (`preprocess.structure_packed`, 1 byte per voxel instead of K + 1), which the
  model expands per window (`conditions.unpack_if_packed`): what the tasks hold over a whole scan.
  """
  if not pre.spec.structure_channels:
    return None
  if hu is None:
    raise ValueError("structure_volume needs the HU volume: the body channel is computed from it as in training")
  lut, groups = pre.data.structure_lut()
  as_labels = pre.data.structures_as_labels
  channels = 1 if as_labels else groups + 1
  if channels != pre.spec.structure_channels:
    raise ValueError(
      f"the checkpoint expects {pre.spec.structure_channels} structure channels, the label grouping gives {channels}"
    )
  if as_labels:
    encode = preprocess.structure_labels
  else:
    encode = preprocess.structure_packed if packed else preprocess.structure_channels
  out = encode(labels, np.asarray(hu), lut, groups)
  if pad_to:
    out, _ = sliding_window.pad_to_window(out, pad_to, 0)
  return out


def task_spacing(pre: Pretrained, spacing: tuple[float, ...] | str) -> tuple[float, float, float] | None:
  """The working voxel size: `--config.spacing` in mm, or 'checkpoint': the checkpoint's training spacing (the
  network is only right at the scale it learned); None (the input's own grid) for 'input' or when not known."""
  if spacing == INPUT:
    return None
  if spacing != CHECKPOINT:
    return tuple(float(s) for s in spacing)
  return pre.data.training_spacing()


def data_spec(path: str) -> DataSpec:
  """The data layout a pretrained model (or a ControlNet fine-tuning workdir) was trained with, from its stored
  config alone (no params read): what `open_scan` needs to decide before the model loads."""
  return DataSpec.from_config(pretrained.read_config(path).data)


def open_scan(
  task: Any, data: DataSpec, *, by_region: bool = True, spacing: Any = None, memory: InMemory | None = None
) -> scans.Scan:
  """tasks/scans.open_scan: the input read, checked and decided (region parts, working spacing), before the model;
  the CT and label map given in `memory` instead of read."""
  ct, labels = (memory.ct, memory.labels) if memory is not None else (None, None)
  return scans.open_scan(task, data, by_region=by_region, spacing=spacing, ct=ct, labels=labels)


def window_batch(task: TaskSpec) -> int:
  """Windows per batch: config.window_batch rounded up to a multiple of the device count so every device
  gets some."""
  n = jax.device_count()
  return max(n, int(np.ceil(task.window_batch / n)) * n)


def save_like_input(
  values_ras: np.ndarray, original: volumes.Volume, path: str, dtype=None, description: str = ""
) -> str:
  """Write a task result on the input's own grid: same shape, voxel order, affine and qform/sform codes
  (NIfTI), or a new DICOM series beside the original when the input was DICOM and `path` is a folder."""
  return volume_io.save_like(values_ras, original, path, dtype, description=description)


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


@dataclasses.dataclass(frozen=True)
class TaskInput:
  """A CT read for a task, on the model's grid and scale."""

  original: volumes.Volume  # the part of the scan as read (the whole scan, usually)
  work: volumes.Volume  # on the working grid (resampled to the working spacing, or `original` itself)
  region: int
  part: regions.Part  # which part of the scan (tasks/scans.Scan.parts) this is
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


def prepare_part(pre: Pretrained, scan: scans.Scan, part: regions.Part) -> TaskInput:
  """One part of a decided scan for the model: moved to the working spacing (`scan.spacing`; None: as is), mapped
  to [-1, 1] with the part's region window and padded to the patch; the structure conditions from the label map
  (or the body channel alone)."""
  original, labels = scan.part(part)
  work = original
  if scan.spacing is not None:
    work = volumes.resample(original, scan.spacing, order=1)
  if labels is not None and work is not original:
    labels = volumes.resample(labels, work.spacing, order=0, fill=0.0)
    if labels.shape != work.shape:
      raise ValueError(f"--config.labels: resampled to {labels.shape}, the image to {work.shape}")
  region = preprocess.region_id(part.region)
  unit, crop = sliding_window.pad_to_window(preprocess.hu_to_unit(work.data, region), pre.patch_size, fill=-1.0)
  structures = structure_volume(pre, None if labels is None else labels.data, work.data, pre.patch_size, packed=True)
  return TaskInput(original, work, region, part, unit, crop, structures, pre.patch_size)


def prepare_inputs(pre: Pretrained, scan: scans.Scan) -> list[TaskInput]:
  """`prepare_part` for every part of the scan (one, unless it spans regions)."""
  return [prepare_part(pre, scan, part) for part in scan.parts]


def prepare_input(
  pre: Pretrained, task: Any, spacing: Any = None, scan: scans.Scan | None = None, memory: InMemory | None = None
) -> TaskInput:
  """The one part of a single-region task's scan (`scan`, else opened here with `spacing` as the setting:
  'checkpoint', 'input' or mm, from `memory`'s CT when given; a scan that spans regions is refused)."""
  scan = scan or open_scan(task, pre.data, by_region=False, spacing=spacing, memory=memory)
  if len(scan.parts) != 1:
    raise scans.Refusal(f"{task.input}: spans {scan.region}; the {task.mode} task runs one region at a time")
  return prepare_part(pre, scan, scan.parts[0])


def summary(task: Any, scan: scans.Scan | None, checkpoint: str, blend_hu: float | None = None) -> scans.Summary:
  """The closing summary of a task on `scan`, started now (its clock times the run from here)."""
  region = scan.region if scan is not None else task.region
  note = scan.region_note if scan is not None else "given (--config.region)"
  spacing = scan.spacing_note if scan is not None else ""
  window = scans.window_text(scan if scan is not None else [task.region], blend_hu)
  return scans.Summary(task.mode, task.output, describe_checkpoint(checkpoint), region, note, spacing, window)


def describe_checkpoint(path: str) -> str:
  """'tiny_phantom (builtin; trained on phantoms at 3 mm)' or the path with its training spacing."""
  try:
    data = data_spec(path)
  except Exception:  # a ControlNet workdir or an older layout: the name alone
    return path
  spacing = data.training_spacing()
  at = f" at {scans._mm(spacing)}" if spacing else ""
  what = "phantoms" if data.source == "phantom" else "prepared CT"
  kind = "builtin, " if path in pretrained.BUILTIN else ""
  return f"{path} ({kind}trained on {what}{at})"


def finish_scan(
  scan: scans.Scan,
  results: Sequence[scans.PartResult],
  task: Any,
  summary: scans.Summary,
  *,
  window_blend_hu: float | None,
  dtype: Any,
  description: str = "",
  sidecar: dict[str, Any] | None = None,
  values: np.ndarray | None = None,
  memory: InMemory | None = None,
) -> dict[str, Any]:
  """The task epilogue on a scan: the parts' results back onto its grid (`scans.onto_scan`: the scan's HU kept
  outside the window when `window_blend_hu` is given; or `values`, already there), written like the input
  (atomically), the sidecar JSON beside it (the summary's fields, then `sidecar`), and the closing summary
  printed. Returns the sidecar. With `memory`, the result is also left there as the file holds it, and written
  only when `task.output` is set."""
  if values is None:  # (written into the scan's own array when it has the output's type: the last use of the scan)
    values = scans.onto_scan(scan, results, window_blend_hu=window_blend_hu, dtype=dtype, in_place=memory is None)
  if memory is not None:
    memory.result, memory.affine = volume_io.as_saved(values, scan.original, dtype)
  if task.output:
    scans.write_atomically(values, scan.original, task.output, dtype, description)
  del values
  fields = {**summary.fields(), "input": task.input, **(sidecar or {})}
  if len(results) > 1:
    fields["parts"] = [
      {"region": r.part.region, "slices": [r.part.start, r.part.stop], "axis": r.part.axis, **r.info} for r in results
    ]
  summary.print(scans.write_sidecar(task.output, fields) if task.output else None)
  return fields


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


def model_data(task: Any, memory: InMemory | None = None) -> DataSpec:
  """The data layout the task's model was trained with (a ControlNet branch: its run's, on its base's grid), from
  `memory.model` or the stored config alone (no params read): what `open_scan` decides with before the model loads."""
  if memory is not None:
    return memory.model.data
  return data_spec(task.controlnet if hasattr(task, "controlnet") else task.checkpoint)


def load_model(task: Any, memory: InMemory | None = None) -> Any:
  """The task's model: `memory.model`, else read from `task.checkpoint` (a Pretrained) or `task.controlnet` (a
  fine-tuning workdir: a Controlled), computing in `task.inference_dtype`."""
  if memory is not None:
    return pretrained.with_compute_dtype(memory.model, task.inference_dtype)
  if hasattr(task, "controlnet"):
    return pretrained.load_controlled(task.controlnet, task.inference_dtype)
  return pretrained.load(task.checkpoint, task.inference_dtype)


def finish(
  values: np.ndarray,
  output: str,
  like: volumes.Volume,
  *,
  work: volumes.Volume | None = None,
  dtype=None,
  description: str = "",
  sidecar: dict[str, Any] | None = None,
  summary: scans.Summary | None = None,
  memory: InMemory | None = None,
) -> dict[str, Any] | None:
  """The epilogue of a result that is not on a scan's parts (synthesis, super-resolution's thin grid): `values`
  (computed on the grid of `work`, default `like`'s) back onto `like`'s grid, saved like it (atomically), the
  sidecar JSON beside it, and the summary printed. With `memory`, the result is also left there as the file holds
  it, and written only when `output` is set."""
  if work is not None:
    values = back_to_input_grid(values, work, like)
  if memory is not None:
    memory.result, memory.affine = volume_io.as_saved(values, like, dtype)
  if output:
    scans.write_atomically(values, like, output, dtype, description)
  fields = {**(summary.fields() if summary is not None else {}), **(sidecar or {})}
  written = scans.write_sidecar(output, fields) if fields and output else None
  if summary is not None:
    summary.print(written)
  return fields


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


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during a task: the message says where it stopped and that nothing was written (main.py prints it
  as one line and exits 130)."""


def stoppable(apply_fn: Callable[..., jax.Array], stop: threading.Event) -> Callable[..., jax.Array]:
  """`apply_fn` that asks the host, before every call (every window batch of every step), whether `stop` is set,
  and then skips the network (zeros): a jitted sampling loop cannot be left early, but once Ctrl-C is pressed its
  remaining steps cost nothing. One host round trip per window batch."""

  def stopped() -> np.ndarray:
    return np.bool_(stop.is_set())

  def fn(x, t, cond):
    flag = io_callback(stopped, jax.ShapeDtypeStruct((), jnp.bool_), ordered=False)
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (x, t, cond))
    shape = jax.eval_shape(apply_fn, *abstract)
    return jax.lax.cond(flag, lambda: jnp.zeros(shape.shape, shape.dtype), lambda: apply_fn(x, t, cond))

  return fn


def run_interruptibly(
  compute: Callable[[threading.Event], Any], what: str, progress: ProgressBar | None = None, unwritten: str = ""
):
  """`compute(stop)` on a worker thread while this (the main) thread waits where Ctrl-C reaches it: Ctrl-C sets
  `stop`, the computation skips its remaining network calls (`stoppable`) and returns, and `Interrupted` says at
  which step of `what` it stopped and that `unwritten` (the output) was not written. A second Ctrl-C while it winds
  down (e.g. still compiling) exits at once.

  Ctrl-C is taken by a SIGINT handler of our own for the duration (Python's default raises KeyboardInterrupt
  wherever the main thread is, and XLA aborts the process at exit after that); off the main thread (a library
  caller's thread) there is no handler to install and the computation simply runs."""
  import signal

  stop = threading.Event()
  outcome: dict[str, Any] = {}
  nothing = f"{unwritten} was not written" if unwritten else "nothing was written"

  def work():
    try:
      outcome["value"] = compute(stop)
    except BaseException as e:  # handed to the main thread
      outcome["error"] = e

  def on_sigint(signum, frame):
    if stop.is_set():  # a second Ctrl-C: nothing is written yet, leave now
      print(f"\ninterrupted: Ctrl-C twice during {what}; {nothing}", file=sys.stderr, flush=True)
      os._exit(130)
    stop.set()
    if progress is not None:
      progress.stopped = True

  main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
  try:
    worker = threading.Thread(target=work, name="meddiff-task", daemon=True)
    worker.start()
    while worker.is_alive():
      worker.join(0.2)
  finally:
    if main_thread:
      signal.signal(signal.SIGINT, previous)
  if stop.is_set():
    step = f" after step {progress.done} of {progress.total}" if progress is not None else ""
    raise Interrupted(f"Ctrl-C: stopped{step} of {what}; {nothing}")
  if "error" in outcome:
    raise outcome["error"]
  return outcome["value"]


def run_windowed(
  pre: Pretrained,
  sample: Callable[..., jax.Array],
  args: tuple,
  canvas: Canvas,
  task: TaskSpec,
  *,
  apply_fn: Callable[..., jax.Array] | None = None,
  params: Any = None,
  progress: ProgressBar | None = None,
) -> np.ndarray:
  """Run a sampler over a whole (padded) volume on the task mesh: `sample(fn, *args, rng)` jitted, where fn is
  the blended windowed eps prediction over `canvas` (`windowed_denoiser`: `task`'s overlap and window batch, the
  model `apply_fn(params, x, t, cond)` with `params`, default `pre`'s network and params) and rng =
  key(task.seed). Returns the (X, Y, Z) result, cropped to `canvas.frame`; closes `progress`. Ctrl-C stops it
  within one window batch (`run_interruptibly`)."""
  if apply_fn is None:
    apply_fn, params = model_fn(pre), pre.params

  def compute(stop: threading.Event) -> np.ndarray:
    mesh = task_mesh()
    with sharding.activate(mesh, sharding.DEFAULT_RULES):  # (the mesh context is per thread)
      # The params and conditions are arguments, not constants: XLA folds constant params at compile time (the
      # paper model's first call on an H200 took 135 s, RESULTS.md "#27, on a lent H200") and a scan-sized
      # constant volume is copied several times.
      replicated = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

      def run(params, cond, *a):
        apply = stoppable(functools.partial(apply_fn, params), stop)
        return sample(windowed_denoiser(pre, canvas, task, apply, cond)[0], *a)

      key, cond = jax.random.key(task.seed), canvas_conditions(canvas)
      compiled = jax.jit(run).lower(replicated, cond, *args, key).compile()
      if progress is not None:
        progress.windows = int(window_plan(pre, canvas, task).valid.sum())
      check_fits(compiled, f"the {task.mode} sampling on the {'x'.join(map(str, canvas.shape))} working grid", task)
      return np.asarray(compiled(replicated, cond, *args, key))

  try:
    out = run_interruptibly(compute, f"the {task.mode} sampling", progress, unwritten=task.output)
  finally:
    if progress is not None:
      progress.close()
  out = out[0, ..., 0]
  return out if canvas.frame is None else out[canvas.frame]


def device_free_bytes() -> int | None:
  """Memory free per device on the first local device: its allocator's limit less what is in use (GPU, TPU); on
  CPU the host's available memory shared by its local devices (their memory is the host's); None when the
  backend reports neither."""
  device = jax.local_devices()[0]
  stats = device.memory_stats()
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  return workers.available_memory() // jax.local_device_count() if device.platform == "cpu" else None


def check_fits(compiled: Any, what: str, task: TaskSpec) -> None:
  """Refuse before running a compiled computation whose new memory per device (XLA's memory analysis: outputs +
  temporaries; its arguments are already allocated) is more than the device has free: a refusal naming the
  coarser working grid, not an out-of-memory kill after minutes (a whole-volume sampler holds several float32
  copies of its grid: benchmarks/RESULTS.md #25)."""
  stats = compiled.memory_analysis()
  free = device_free_bytes()
  if stats is None or free is None:
    return
  need = int(stats.output_size_in_bytes) + int(stats.temp_size_in_bytes)
  if need > free:
    source = getattr(task, "input", "")  # (synthesis has no input scan)
    raise scans.Refusal(
      f"{source + ': ' if source else ''}{what} needs {need / 1e9:.1f} GB of memory per device (XLA's analysis of "
      f"the compiled sampler) where {free / 1e9:.1f} GB are free; use a smaller working grid (a coarser "
      "--config.spacing such as checkpoint, a cropped scan) or a device with more memory"
    )


def window_plan(pre: Pretrained, canvas: Canvas, task: TaskSpec) -> sliding_window.WindowPlan:
  """The windows over `canvas`: the model's patch, `task`'s overlap and window batch."""
  return sliding_window.plan_windows(
    tuple(canvas.shape), pre.patch_size, task.overlap, window_batch(task), canvas.frame
  )


def canvas_conditions(canvas: Canvas) -> dict[str, np.ndarray]:
  """The canvas's conditions as arrays: the region id (1,), the structure channels and the ControlNet hint over
  the whole volume when it has them."""
  cond = {conditions.REGION: np.array([canvas.region], np.int32)}
  if canvas.structures is not None:
    cond[conditions.STRUCTURES] = canvas.structures
  if canvas.hint is not None:
    cond[conditions.HINT] = canvas.hint
  return cond


def windowed_denoiser(
  pre: Pretrained,
  canvas: Canvas,
  task: TaskSpec,
  apply_fn: Callable | None = None,
  cond: dict[str, Any] | None = None,
):
  """((x (1,X,Y,Z,1), t) -> the blended eps prediction over the whole (padded) volume of `canvas`, windows over
  devices; the window plan). The model output is read in the checkpoint's parameterisation
  (`pre.diffusion.prediction_type`, `samplers.epsilon_fn`): every task algorithm takes eps. apply_fn overrides
  the model (e.g. base + branch, or `model_fn` with guidance). `cond`: the canvas's conditions
  (`canvas_conditions`) as the caller holds them, e.g. arguments of its jitted function (default: taken from the
  canvas, and so constants of whatever jits the denoiser)."""
  plan = window_plan(pre, canvas, task)
  cond = {k: jnp.asarray(v) for k, v in (canvas_conditions(canvas) if cond is None else cond).items()}
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
    self.done = 0  # steps finished (the last callback's index + 1)
    self.stopped = False  # Ctrl-C: the remaining steps skip the network; the bar stays where it was

  def __call__(self, i) -> None:
    if self.stopped:
      return
    i, now = int(i), self._clock()
    self.done = i + 1
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
