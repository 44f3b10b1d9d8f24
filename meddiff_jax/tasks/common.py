"""What every downstream task shares: the pretrained model, the mesh, volumes in and out.

A pretrained model is either a training workdir (Orbax checkpoints; the EMA params of the newest step
are used) or an exported directory (`config.json` + `params.msgpack`, see `export_pretrained`), which is
what ships in `meddiff_jax/assets/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from meddiff_jax.data import nifti, pipeline, preprocess
from meddiff_jax.diffusion import samplers, schedules
from meddiff_jax.models import unet3d
from meddiff_jax.tasks import sliding_window
from meddiff_jax.train import sharding

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
BUILTIN = {"tiny_phantom": os.path.join(ASSETS, "tiny_phantom")}


@dataclasses.dataclass
class Pretrained:
  model: unet3d.UNet3D
  spec: unet3d.UNetSpec
  params: Any
  config: ml_collections.ConfigDict
  schedule: schedules.Schedule

  @property
  def patch_size(self) -> int:
    return int(self.config.data.patch_size)

  def apply(self, x: jax.Array, t: jax.Array, cond: dict[str, jax.Array]) -> jax.Array:
    return self.model.apply({"params": self.params}, x, t, cond)


def _from_config_json(config_dict: dict, params: Any) -> Pretrained:
  config = ml_collections.ConfigDict(config_dict)
  spec = unet3d.UNetSpec.from_config(config.model, config.data.patch_size)  # patch: legacy attention config
  schedule = schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  return Pretrained(unet3d.UNet3D(spec), spec, params, config, schedule)


def load_pretrained(path: str) -> Pretrained:
  """From an exported dir, a builtin name (e.g. 'tiny_phantom'), or a training workdir."""
  path = BUILTIN.get(path, path)
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist (a training workdir, an exported directory, "
                            f"or one of {sorted(BUILTIN)})")
  if os.path.exists(os.path.join(path, "params.msgpack")):
    with open(os.path.join(path, "config.json")) as f:
      config_dict = json.load(f)
    with open(os.path.join(path, "params.msgpack"), "rb") as f:
      params = flax.serialization.msgpack_restore(f.read())
    return _from_config_json(config_dict, jax.tree_util.tree_map(jnp.asarray, params))
  return _from_workdir(path)


def _from_workdir(path: str) -> Pretrained:
  from meddiff_jax.train import checkpoint, loop
  from meddiff_jax.train import state as state_lib

  ckpt_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  ck = checkpoint.Checkpointer(ckpt_dir)
  if not ck.all_steps():
    raise FileNotFoundError(f"{path}: no checkpoints (expected WORKDIR/checkpoints/STEP or params.msgpack)")
  meta = ck.latest_config()
  config = ml_collections.ConfigDict(meta)
  model, spec = loop.build_model(config)
  tx = state_lib.make_optimizer(config.optimizer)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  st, shardings = state_lib.create(loop.init_params_fn(model, spec, config.data.patch_size), tx, 0, mesh,
                                   sharding.DEFAULT_RULES)
  restored = ck.restore_latest(checkpoint.abstract_target(st, shardings), None)
  ck.close()
  return _from_config_json(meta, restored.state.ema_params)


def export_pretrained(workdir: str, out_dir: str) -> str:
  """EMA params + config of a training run as a small self-contained directory."""
  pre = load_pretrained(workdir)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(json.loads(pre.config.to_json_best_effort()), f, indent=1)
  with open(os.path.join(out_dir, "params.msgpack"), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, pre.params)))
  return out_dir


def model_fn(pre: Pretrained, guidance_scale: jax.Array | None = None):
  """(x, t, cond) -> model output, classifier-free guided when a scale is given."""
  if guidance_scale is None:
    return pre.apply

  def fn(x, t, cond):
    return samplers.guided_denoise_fn(pre.apply, cond, pre.spec.num_regions, guidance_scale)(x, t)
  return fn


def structure_volume(pre: Pretrained, labels: np.ndarray | None, hu: np.ndarray | None, shape) -> np.ndarray | None:
  """(X, Y, Z, K) uint8 structure channels the model expects, from a label map (zeros when absent)."""
  if not pre.spec.structure_channels:
    return None
  lut, groups = pipeline.structure_lut(pre.config.data)
  if labels is None and hu is None:
    return np.zeros(tuple(shape) + (pre.spec.structure_channels,), np.uint8)
  hu = hu if hu is not None else np.full(shape, 0.0, np.float32)
  return preprocess.structure_channels(labels, hu, lut, groups)


def window_batch(config: Any) -> int:
  """Windows per batch: a multiple of the device count so every device gets some."""
  n = jax.device_count()
  return max(n, int(np.ceil(config.window_batch / n)) * n)


def load_ct(path: str, region: str, spacing: tuple[float, ...] | None) -> tuple[nifti.Volume, nifti.Volume]:
  """(original volume, working volume resampled to `spacing` (or as is))."""
  original = nifti.load(path)
  nifti.check_ct(original)
  work = original
  if spacing and any(spacing):
    work = nifti.resample(original, tuple(spacing), order=1, fill=-1024.0)
  preprocess.region_id(region)
  return original, work


def back_to_input_grid(values: np.ndarray, work: nifti.Volume, original: nifti.Volume, order: int = 1) -> np.ndarray:
  """Resample a result computed on the working grid back onto the input's grid (same shape/affine)."""
  if work.shape == original.shape and np.allclose(work.affine, original.affine):
    return values
  vol = nifti.resample(nifti.Volume(values.astype(np.float32), work.affine), original.spacing, order=order,
                       fill=float(values.min()))
  out = np.zeros(original.shape, np.float32) + float(values.min())
  sl = tuple(slice(0, min(a, b)) for a, b in zip(original.shape, vol.shape))
  out[sl] = vol.data[sl]
  return out


def windowed_denoiser(pre: Pretrained, volume_shape, region: int, structures: np.ndarray | None, config: Any,
                      guidance_scale: jax.Array | None = None, hint: np.ndarray | None = None, apply_fn=None):
  """(x (1,X,Y,Z,1), t) -> blended model output over the whole (padded) volume, windows over devices.

  hint: a ControlNet condition volume (X, Y, Z, 1); apply_fn overrides the model (e.g. base + branch).
  """
  plan = sliding_window.plan_windows(tuple(volume_shape), pre.patch_size, config.overlap, window_batch(config))
  cond = {"region": jnp.array([region], jnp.int32)}
  if structures is not None:
    cond["structures"] = jnp.asarray(structures)
  if hint is not None:
    cond["hint"] = jnp.asarray(hint)
  axes = ("data",) if jax.device_count() > 1 else None
  fn = apply_fn or model_fn(pre, guidance_scale)
  return sliding_window.blended_denoise_fn(fn, plan, cond, axes), plan


class ProgressBar:
  """A tqdm bar fed from inside jitted loops through `jax.debug.callback` (process 0 only)."""

  def __init__(self, total: int, desc: str):
    from tqdm import tqdm
    self.bar = tqdm(total=total, desc=desc, unit="step", disable=jax.process_index() != 0)

  def __call__(self, i) -> None:
    self.bar.n = int(i) + 1
    self.bar.refresh()

  def close(self) -> None:
    self.bar.close()


def task_mesh() -> jax.sharding.Mesh:
  return sharding.make_mesh({"data": -1})
