"""The Python API: what the `meddiff` command does, from a notebook or a script, on files or on arrays.

  import meddiff_jax as md

  pipe = md.load("tiny_ct")  # a builtin name, an exported directory or a training workdir; local, gs:// or s3://
  out = pipe.denoise(hu, affine=affine, noise_sigma_hu=30.0)  # an array and its affine, or a file's path
  out.image, out.affine, out.info  # the result on the input's grid; what the command prints
  amap = pipe.detect_anomalies("ct.nii.gz", output="map.nii.gz")  # written too, as the command writes it
  ct = pipe.synthesize(shape=(64, 64, 64), region="chest")
  md.denoise("ct.nii.gz", "denoised.nii.gz", checkpoint="tiny_ct")  # one call: a file in, a file out
  md.prepare("scans/", "store/", mask_dir="totalseg/")
  md.pretrain("pretrain:tiny", "runs/tiny")  # training: a config's name, path or ConfigDict (finetune: ControlNet)

Every call is the command's: the shipped config (configs/denoise.py, ...: every default lives there) with the
keyword options set (the config keys of the same names, typed by `DenoiseOptions` & co.), checked by the
command's own check (`checks.task`, `checks.prepare`, `checks.pretrain`, `checks.controlnet`) and run by the
command's own function, so a call and `meddiff --config=denoise --config.KEY=VALUE` cannot disagree. An option
not given keeps the shipped value. An array goes through the checks a file does (`volume_io.from_array`: 3D,
size limits, geometry, finite voxels; then CT in HU) and through the same working grid (resampled to the
model's spacing and back). A mistake raises one exception with a one-line message: a ConfigError (a ValueError)
naming the option, a VolumeError naming the input, a FileNotFoundError for a path that does not exist.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any, TypedDict, Unpack

import ml_collections
import numpy as np

from meddiff_jax import checks, config_files, pretrained, sections
from meddiff_jax.data import prepare as prepare_lib
from meddiff_jax.data import preprocess, samples, volume_io, volumes
from meddiff_jax.tasks import anomaly, common, controlled, synthesis
from meddiff_jax.tasks import denoise as denoise_lib
from meddiff_jax.train import controlnet, dry_run, loop

ConfigError = sections.ConfigError
VolumeError = volumes.VolumeError
example_ct = samples.example_ct  # the public sample CT the notebooks use (a local path; downloaded once)


def hu_window(region: str) -> tuple[float, float]:
  """(lowest, highest) HU the model sees for `region` (head_neck, chest, abdomen; unknown: the widest): tasks map
  this window to [-1, 1]; outside it, the tasks keep the input's HU (blended over window_blend_hu at its edges)."""
  return preprocess.window_bounds(preprocess.region_id(region))


# A file (NIfTI, NRRD / MHA, a DICOM series folder) or an array with its `affine`.
VolumeInput = str | os.PathLike | np.ndarray


# ------------------------------------------------------------------------------------------- typed options


class Limits(TypedDict, total=False):
  """config.limits (configs/input_options.py)."""

  max_voxels: int
  max_gb: float
  max_spacing_mm: float
  min_side_voxels: int


class InputOptions(TypedDict, total=False):
  """How an input volume is read and checked (configs/input_options.py)."""

  assume_orientation: str
  trust_affine: str
  assume_hu: bool
  limits: Limits


class TaskOptions(InputOptions, total=False):
  """What every task config has (configs/task_options.py and the task files)."""

  region: str
  overwrite: bool
  num_steps: int
  sampler: str
  overlap: float
  window_batch: int
  seed: int
  inference_dtype: str


class DenoiseOptions(TaskOptions, total=False):
  """configs/denoise.py."""

  spacing: tuple[float, float, float] | str
  method: str
  noise_sigma_hu: float | str
  lam: float
  zeta: float
  window_blend_hu: float
  output_int16: bool


class AnomalyOptions(TaskOptions, total=False):
  """configs/anomaly.py."""

  spacing: tuple[float, float, float] | str
  noise_t: int
  smooth_sigma: float
  top_fraction: float


class SynthesisOptions(TaskOptions, total=False):
  """configs/synthesis.py."""

  shape: tuple[int, int, int]
  spacing: tuple[float, float, float] | str
  guidance_scale: float
  eta: float


class SuperResolutionOptions(TaskOptions, total=False):
  """configs/super_resolution.py."""

  reference: str
  spacing: tuple[float, float, float] | str
  conditioning_scale: float
  window_blend_hu: float


class PrepareOptions(InputOptions, total=False):
  """configs/prepare.py."""

  dataset: str
  manifest: str
  allow_outside_paths: bool
  mask_dir: str
  class_map: str
  exclude: tuple[str, ...]
  default_region: str
  regions: dict[str, Any]
  split_fractions: tuple[float, float, float]
  split_seed: int
  max_volumes: int
  spacing: tuple[float, float, float]
  workers: int
  overwrite: bool
  store_format: str
  store_codec: str
  whole_sizes: tuple[int, ...]


# The config keys a call sets from its arguments, not from options: mode, the paths and the model.
ARGUMENTS = ("mode", "checkpoint", "controlnet", "input", "labels", "output", "input_dir", "output_dir")


def shipped_config(name: str, options: Mapping[str, Any], arguments: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The shipped config `name` with `options` (keyword options, nested ones as dicts) and then `arguments` (the
  keys ARGUMENTS that the call's own parameters give) set; an unknown option or a value of the wrong type is a
  ConfigError naming it and what to give."""
  config = config_files.load(name)
  misplaced = sorted(set(options) & set(ARGUMENTS))
  if misplaced:
    raise ConfigError(f"{name}: {misplaced} are arguments of the call, not options")
  _override(config, options, name, "")
  for key, value in arguments.items():
    config[key] = value
  return config


def _plain(value: Any) -> Any:
  """numpy scalars and arrays as the Python values a config holds (int, float, tuples)."""
  if isinstance(value, np.ndarray):
    return tuple(value.tolist())
  if isinstance(value, (tuple, list)):
    return tuple(_plain(v) for v in value)
  return value.item() if isinstance(value, np.generic) else value


def _override(section: ml_collections.ConfigDict, options: Mapping[str, Any], name: str, prefix: str) -> None:
  for key, value in options.items():
    dotted = f"{prefix}{key}"
    if key not in section or (not prefix and key in ARGUMENTS):
      valid = sorted(k for k in section if prefix or k not in ARGUMENTS)
      raise ConfigError(f"{name} has no option {dotted!r}; its options: {', '.join(valid)}")
    if isinstance(section[key], ml_collections.ConfigDict):
      if not isinstance(value, Mapping):
        raise ConfigError(f"{name} option {dotted}={value!r}: a section; give a dict of some of its keys")
      _override(section[key], value, name, f"{dotted}.")
      continue
    value = _plain(value)
    try:
      section[key] = value
    except TypeError:
      default = section[key]
      raise ConfigError(
        f"{name} option {dotted}={value!r}: must be of type {type(default).__name__} (shipped: {default!r})"
      ) from None


def _path(value: str | os.PathLike | None) -> str:
  return "" if value is None else os.fspath(value)


def _is_array(value: Any) -> bool:
  return isinstance(value, np.ndarray) or (hasattr(value, "__array__") and not isinstance(value, (str, os.PathLike)))


def _inputs(
  ct: VolumeInput | None, labels: VolumeInput | None, affine: np.ndarray | None, read: volumes.ReadOptions
) -> tuple[dict[str, str], volumes.Volume | None, volumes.Volume | None]:
  """(the config's paths, the CT and the label map given as arrays, as volumes checked like files)."""
  arrays = [name for name, value in (("ct", ct), ("labels", labels)) if _is_array(value)]
  if arrays and affine is None:
    raise ConfigError(f"{' and '.join(arrays)} given as an array: give its affine= (4x4, voxel indices -> RAS mm)")
  if affine is not None and not arrays:
    raise ConfigError("affine= is for an array input; a file carries its own")
  for name, value in (("ct", ct), ("labels", labels)):
    if value is not None and not _is_array(value) and not isinstance(value, (str, os.PathLike)):
      raise ConfigError(f"{name}={type(value).__name__}: give a file path or a numpy array (with affine=)")
  ct_volume = volume_io.from_array(ct, affine, options=read, name="<ct array>") if _is_array(ct) else None
  labels_volume = (  # read as the command reads a label map file: the default limits (common.read_labels)
    volume_io.from_array(labels, affine, is_mask=True, name="<labels array>") if _is_array(labels) else None
  )
  paths = {
    "input": "" if ct_volume is not None else _path(ct),
    "labels": "" if labels_volume is not None else _path(labels),
  }
  return paths, ct_volume, labels_volume


# ------------------------------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Result:
  """A task's result: `image` on the input's grid as the output file holds it (the input array's shape and voxel
  order, or the input file's; super-resolution: the thin grid), `affine` that grid's (voxel indices -> RAS mm),
  `info` what the command prints (e.g. denoise's `noise_sigma_hu`, anomaly's `volume_score` and `slice_scores`)."""

  image: np.ndarray
  affine: np.ndarray
  info: dict[str, Any]


# ------------------------------------------------------------------------------------------------ pipeline


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A pretrained model, loaded once, and the tasks it runs (diffusers' `Pipeline.from_pretrained`, then calls).

  `model`: a pretrained.Pretrained, or a pretrained.Controlled for a ControlNet fine-tuning workdir (which runs
  `super_resolve`, and the zero-shot tasks with its base)."""

  checkpoint: str
  model: pretrained.Pretrained | pretrained.Controlled = dataclasses.field(repr=False)  # params: not for printing

  @classmethod
  def from_pretrained(cls, checkpoint: str) -> Pipeline:
    """A builtin name (`tiny_phantom`, `tiny_ct`), an exported directory, a pretraining workdir or a ControlNet
    fine-tuning workdir; a local path or a gs:// / s3:// URL. Each task computes in its `inference_dtype`."""
    stored = pretrained.read_config(checkpoint)  # FileNotFoundError: one line naming the path and the choices
    if "base_checkpoint" in stored and "controlnet" in stored:
      return cls(checkpoint, pretrained.load_controlled(checkpoint))
    return cls(checkpoint, pretrained.load(checkpoint))

  @property
  def base(self) -> pretrained.Pretrained:
    """The pretrained model (a ControlNet's base)."""
    return self.model.pre if isinstance(self.model, pretrained.Controlled) else self.model

  @property
  def spacing(self) -> tuple[float, float, float] | None:
    """The voxel size (mm) the model was trained at: the working grid of `spacing='checkpoint'`; None: unknown."""
    return self.base.data.training_spacing()

  @property
  def patch_size(self) -> int:
    return self.base.patch_size

  def _zero_shot(self) -> dict[str, str]:
    if isinstance(self.model, pretrained.Controlled):
      return {"checkpoint": self.model.config.base_checkpoint}
    return {"checkpoint": self.checkpoint}

  def _run(
    self,
    name: str,
    run: Callable[..., dict[str, Any]],
    model: dict[str, str],
    options: Mapping[str, Any],
    *,
    ct: VolumeInput | None = None,
    labels: VolumeInput | None = None,
    affine: np.ndarray | None = None,
    output: str | os.PathLike | None = None,
  ) -> Result:
    config = shipped_config(name, options, {**model, "output": _path(output)})
    paths, ct_volume, labels_volume = _inputs(ct, labels, affine, volumes.ReadOptions.from_section(config))
    for key, value in paths.items():
      if key in config:
        config[key] = value
    memory = common.InMemory(self.model, ct=ct_volume, labels=labels_volume)
    info = run(checks.task(config, memory), memory)
    return Result(memory.result, memory.affine, info)

  def denoise(
    self,
    ct: VolumeInput,
    *,
    affine: np.ndarray | None = None,
    labels: VolumeInput | None = None,
    output: str | os.PathLike | None = None,
    **options: Unpack[DenoiseOptions],
  ) -> Result:
    """The `denoise` command on `ct` (a file, or an array in HU with its `affine`); `labels`: a TotalSegmentator
    label map on its grid (organ conditions); `output`: also written there. info: the closing summary's fields
    (noise_sigma_hu, method, region, spacing, ...)."""
    return self._run(
      "denoise", denoise_lib.run, self._zero_shot(), options, ct=ct, labels=labels, affine=affine, output=output
    )

  def detect_anomalies(
    self,
    ct: VolumeInput,
    *,
    affine: np.ndarray | None = None,
    labels: VolumeInput | None = None,
    output: str | os.PathLike | None = None,
    **options: Unpack[AnomalyOptions],
  ) -> Result:
    """The `anomaly` command: the anomaly map on `ct`'s grid; info: volume_score, slice_scores, noise_t."""
    return self._run(
      "anomaly", anomaly.run, self._zero_shot(), options, ct=ct, labels=labels, affine=affine, output=output
    )

  def synthesize(
    self,
    labels: VolumeInput | None = None,
    *,
    affine: np.ndarray | None = None,
    output: str | os.PathLike | None = None,
    **options: Unpack[SynthesisOptions],
  ) -> Result:
    """The `synthesis` command: a CT in HU of `shape` (an option) at the model's spacing, or on the grid of a
    label map `labels` (a file, or an array with its `affine`: extent and anatomy)."""
    return self._run(
      "synthesis", synthesis.run, self._zero_shot(), options, labels=labels, affine=affine, output=output
    )

  def super_resolve(
    self,
    ct: VolumeInput,
    *,
    affine: np.ndarray | None = None,
    labels: VolumeInput | None = None,
    output: str | os.PathLike | None = None,
    **options: Unpack[SuperResolutionOptions],
  ) -> Result:
    """The `super_resolution` command (a ControlNet workdir's pipeline): thick slices `ct` onto the thin grid;
    info: shape and, with a `reference` path, PSNR / SSIM against trilinear and cubic interpolation."""
    if not isinstance(self.model, pretrained.Controlled):
      raise ConfigError(
        f"super_resolve needs a ControlNet fine-tuning workdir (configs/controlnet.py:sr); {self.checkpoint!r} is a "
        "pretrained model"
      )
    model = {"controlnet": self.checkpoint}
    run = controlled.run_super_resolution
    return self._run("super_resolution", run, model, options, ct=ct, labels=labels, affine=affine, output=output)


def load(checkpoint: str) -> Pipeline:
  """`Pipeline.from_pretrained(checkpoint)`."""
  return Pipeline.from_pretrained(checkpoint)


# ---------------------------------------------------------------------------------------- one call, as a command


def denoise(
  ct: VolumeInput,
  output: str | os.PathLike | None = None,
  *,
  checkpoint: str,
  affine: np.ndarray | None = None,
  labels: VolumeInput | None = None,
  **options: Unpack[DenoiseOptions],
) -> Result:
  """`meddiff --config=denoise`: `load(checkpoint).denoise(...)`."""
  return load(checkpoint).denoise(ct, affine=affine, labels=labels, output=output, **options)


def detect_anomalies(
  ct: VolumeInput,
  output: str | os.PathLike | None = None,
  *,
  checkpoint: str,
  affine: np.ndarray | None = None,
  labels: VolumeInput | None = None,
  **options: Unpack[AnomalyOptions],
) -> Result:
  """`meddiff --config=anomaly`: `load(checkpoint).detect_anomalies(...)`."""
  return load(checkpoint).detect_anomalies(ct, affine=affine, labels=labels, output=output, **options)


def synthesize(
  output: str | os.PathLike | None = None,
  *,
  checkpoint: str,
  labels: VolumeInput | None = None,
  affine: np.ndarray | None = None,
  **options: Unpack[SynthesisOptions],
) -> Result:
  """`meddiff --config=synthesis`: `load(checkpoint).synthesize(...)`."""
  return load(checkpoint).synthesize(labels, affine=affine, output=output, **options)


def super_resolve(
  ct: VolumeInput,
  output: str | os.PathLike | None = None,
  *,
  controlnet: str,
  affine: np.ndarray | None = None,
  labels: VolumeInput | None = None,
  **options: Unpack[SuperResolutionOptions],
) -> Result:
  """`meddiff --config=super_resolution`: `load(controlnet).super_resolve(...)`."""
  return load(controlnet).super_resolve(ct, affine=affine, labels=labels, output=output, **options)


def prepare(input_dir: str | os.PathLike, output_dir: str | os.PathLike, **options: Unpack[PrepareOptions]) -> dict:
  """`meddiff --config=prepare`: a folder of CT (+ TotalSegmentator masks) into a prepared store; returns the
  report (also OUTPUT_DIR/report.json)."""
  config = shipped_config("prepare", options, {"input_dir": _path(input_dir), "output_dir": _path(output_dir)})
  return prepare_lib.run(checks.prepare(config))


def pretrain(config: str | ml_collections.ConfigDict, workdir: str | os.PathLike) -> Any:
  """`meddiff --config=pretrain:tiny --workdir=WORKDIR`: pretraining (or, with `dry_run=True`, its compile-only
  report) from a config (mode 'train'): a shipped name, a config file's path or a ConfigDict (e.g.
  `meddiff_jax.configs.pretrain.get_config('tiny')`, edited). Resumes from WORKDIR/checkpoints; returns the last
  metrics. One process (a notebook): a multi-process job runs the command, which starts jax.distributed first."""
  config = _training_config(config, "train", "pretrain")
  workdir = checks.workdir(_path(workdir))
  typed = checks.pretrain(config)
  loop.configure_compilation_cache(typed.compilation_cache_dir, workdir)
  return dry_run.run(typed) if typed.dry_run else loop.train_and_evaluate(typed, workdir)


def finetune(config: str | ml_collections.ConfigDict, workdir: str | os.PathLike) -> Any:
  """`meddiff --config=controlnet:sr --workdir=WORKDIR`: ControlNet fine-tuning on its `base_checkpoint` from a
  config (mode 'controlnet'), as `pretrain` takes one. Returns the last metrics; `load(WORKDIR)` then runs
  `super_resolve`."""
  config = _training_config(config, "controlnet", "finetune")
  workdir = checks.workdir(_path(workdir))
  typed = checks.controlnet(config)
  loop.configure_compilation_cache(typed.compilation_cache_dir, workdir)
  return controlnet.finetune(typed, workdir)


def _training_config(config: str | ml_collections.ConfigDict, mode: str, call: str) -> ml_collections.ConfigDict:
  config = config_files.load(config) if isinstance(config, str) else config
  if config.get("mode") != mode:
    raise ConfigError(
      f"{call} takes a config of mode {mode!r} (configs/{'pretrain' if mode == 'train' else mode}.py)"
      f", not {config.get('mode')!r}"
    )
  return config
