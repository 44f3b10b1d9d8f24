"""Pretrained models: names, the model builders, loading (EMA params only) and exporting.

Below train/ and tasks/ (both import it); it imports models/, diffusion/ and the checkpoint reader only.
A pretrained model is
  - a builtin name (BUILTIN, shipped in meddiff_jax/assets/),
  - an exported directory (`config.json` + `params.msgpack`, written by `--config=configs/export.py`), or
  - a training workdir (Orbax checkpoints): the newest step's EMA params, restored against a
    `jax.eval_shape` target; no optimizer is built and nothing else is read.
Paths may be local or URLs (gs://, s3://; an exported directory also memory:// and any fsspec scheme):
everything is read and written through meddiff_jax/storage.py.
A ControlNet fine-tuning workdir holds the branch (and whatever else its run trained); its config's
`base_checkpoint` names the base, loaded as above.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from meddiff_jax import checkpoint, sections, sharding, storage
from meddiff_jax.data import preprocess
from meddiff_jax.data.spec import DataSpec
from meddiff_jax.diffusion import schedules
from meddiff_jax.diffusion.spec import DiffusionSpec
from meddiff_jax.models import conditions, controlnet, trainable, unet3d

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
BUILTIN = {name: os.path.join(ASSETS, name) for name in ("tiny_phantom", "tiny_ct")}
ALL_PARAMS = (".*",)  # config.optimizer.trainable of checkpoints written before the option existed
# Config keys added after checkpoints had been written (the tiny_phantom shipped until #26 among them:
# tests/legacy_tiny_phantom_config.json), with what their
# absence meant then. Only configs read back from a checkpoint get them (`stored_config`); a new config
# has every key, with its default visible in configs/pretrain.py.
LEGACY_KEYS = {
  "model.structure_embed_dim": 0,
  "model.num_structure_ids": 0,
  "model.conv_impl": "auto",
  "model.attention_impl": "auto",
  "diffusion.structure_drop_prob": 0.0,
  "diffusion.body_drop_prob": 0.0,
  "data.class_map": "",
  "data.spacing": "source",
  "data.structures": "grouped",
  "data.structure_groups": tuple(preprocess.DEFAULT_STRUCTURE_GROUPS.items()),
  "data.hint": "",
  "data.sr_factor": 5,
  "data.positive_fraction": 0.0,
  "data.phantom.num_lesions": 0,
  "data.pack_structures": False,
  "data.decode_on_device": False,
  "data.resize_on_device": False,
  "data.numpy_huge_pages": True,  # numpy's own default
  "optimizer.trainable": ALL_PARAMS,
  "dry_run_topology": "",
}
# Values that meant "work it out" before that had a name: (key, old value) -> the name.
LEGACY_VALUES = {
  ("data.spacing", ()): "source",  # from the data source (data/spec.DataSpec.training_spacing)
  ("sharding.rules", ()): "default",  # sharding.DEFAULT_RULES
}


def stored_config(raw: dict) -> ml_collections.ConfigDict:
  """A config as a checkpoint or export stored it, brought up to date: completed with LEGACY_KEYS it predates,
  LEGACY_VALUES named, a legacy model.attention_resolutions turned into attention_levels."""
  config = json.loads(json.dumps(raw))  # a copy, as stored: lists, not tuples

  def parent(dotted: str) -> tuple[dict | None, str]:
    *path, last = dotted.split(".")
    node = config
    for key in path:
      node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None, last

  for dotted, value in LEGACY_KEYS.items():
    node, last = parent(dotted)
    if node is not None and last not in node:
      node[last] = json.loads(json.dumps(value))
  for (dotted, old), new in LEGACY_VALUES.items():
    node, last = parent(dotted)
    if node is not None and sections.frozen(node.get(last)) == old:
      node[last] = new
  model = config.get("model")
  if isinstance(model, dict) and "attention_resolutions" in model:
    model["attention_levels"] = list(
      unet3d.legacy_attention_levels(
        model.pop("attention_resolutions"),
        len(model["channel_mult"]),
        config.get("data", {}).get("patch_size"),
        "attention_levels" in model,
      )
    )
  return ml_collections.ConfigDict(config)


@dataclasses.dataclass
class Pretrained:
  """A pretrained model: the network, its EMA params and what its stored config says about it, typed (the
  architecture `spec`, the `diffusion` it was trained with, the `data` layout: patch size, training spacing,
  structure conditions)."""

  model: unet3d.UNet3D
  spec: unet3d.UNetSpec
  params: Any
  diffusion: DiffusionSpec
  data: DataSpec
  schedule: schedules.Schedule
  config: ml_collections.ConfigDict  # the whole config as stored (`stored_config`): what `export` writes

  @property
  def patch_size(self) -> int:
    return self.data.patch_size

  def apply(self, x: jax.Array, t: jax.Array, cond: dict[str, jax.Array]) -> jax.Array:
    return self.apply_with(self.params, x, t, cond)

  def apply_with(self, params: Any, x: jax.Array, t: jax.Array, cond: dict[str, jax.Array]) -> jax.Array:
    """The network on `params`: what a compiled sampler calls, the params its argument (tasks/common.run_windowed)."""
    return self.model.apply({"params": params}, x, t, cond)


def dummy_inputs(spec: unet3d.UNetSpec, patch: int, batch: int = 1) -> tuple[jax.Array, jax.Array, dict]:
  x = jnp.zeros((batch, patch, patch, patch, 1), jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  cond = {
    conditions.POS_BOX: jnp.asarray(conditions.whole_box(batch)),
    conditions.REGION: jnp.zeros((batch,), jnp.int32),
  }
  if spec.structure_channels:
    cond[conditions.STRUCTURES] = jnp.zeros((batch, patch, patch, patch, spec.structure_channels), jnp.uint8)
  return x, t, cond


def init_params_fn(model: unet3d.UNet3D, spec: unet3d.UNetSpec, patch: int):
  x, t, cond = dummy_inputs(spec, patch)
  return lambda key: model.init(key, x, t, cond)["params"]


@dataclasses.dataclass(frozen=True)
class ControlNetSpec:
  """config.controlnet (configs/controlnet.py): the branch's hint encoder."""

  hint_hidden: tuple[int, ...]  # hint-encoder widths, full resolution first
  conditioning_scale: float

  def __post_init__(self):
    sections.sizes("config.controlnet.hint_hidden", self.hint_hidden, length=None, integer=True)
    sections.at_least("config.controlnet.conditioning_scale", self.conditioning_scale, 0.0)

  @classmethod
  def from_config(cls, section: Any) -> ControlNetSpec:
    return sections.from_config(cls, section, "config.controlnet")


def build_controlled(branch: ControlNetSpec, spec: unet3d.UNetSpec) -> controlnet.ControlledUNet:
  return controlnet.ControlledUNet(spec, branch.hint_hidden)


def controlled_init_fn(model: controlnet.ControlledUNet, patch: int) -> Callable[[jax.Array, Any], Any]:
  """(key, base params) -> boxed {'base': the given params, 'controlnet': a new branch whose encoder is a
  copy of the base encoder (ControlNet's "trainable copy"; zero convs make the sum equal the base)}."""
  x, t, cond = dummy_inputs(model.spec, patch)
  cond[conditions.HINT] = jnp.zeros(x.shape, jnp.float32)
  is_box = lambda v: isinstance(v, nn.Partitioned)
  fill = lambda boxed, values: jax.tree_util.tree_map(
    lambda b, v: b.replace_boxed(v) if is_box(b) else v, boxed, values, is_leaf=is_box
  )

  def init(key, base_params):
    params = model.init(key, x, t, cond)["params"]  # the base's random init is unused (dead code under jit)
    branch = dict(params["controlnet"], encoder=fill(params["controlnet"]["encoder"], base_params["encoder"]))
    return {"base": fill(params["base"], base_params), "controlnet": branch}

  return init


def resolve(path: str) -> str:
  """A builtin name or an existing path, else a FileNotFoundError naming both options."""
  path = BUILTIN.get(path, path)
  if not path or not storage.exists(path):
    raise FileNotFoundError(
      f"checkpoint {path!r} does not exist (a training workdir, an exported directory, or one of {sorted(BUILTIN)})"
    )
  return path


def _checkpoint_dir(path: str) -> str:
  sub = storage.join(path, "checkpoints")
  return sub if storage.isdir(sub) else path


def _is_export(path: str) -> bool:
  return storage.exists(storage.join(path, "params.msgpack"))


def read_config(path: str) -> ml_collections.ConfigDict:
  """The config a pretrained model was trained with (cheap: no params are read)."""
  path = resolve(path)
  if _is_export(path):
    return stored_config(json.loads(storage.read_text(storage.join(path, "config.json"))))
  ck = checkpoint.Checkpointer(_checkpoint_dir(path))
  try:
    return stored_config(ck.latest_config())
  finally:
    ck.close()


COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def inference_dtype(name: str | None, backend: str | None = None) -> jnp.dtype | None:
  """The network's compute dtype for inference (`--config.inference_dtype`); None keeps the checkpoint's.

  'auto': bfloat16 where the backend has fast bf16 matrix units (GPU, TPU), float32 on CPU (XLA:CPU has no
  fast bf16 convolutions, and CPU runs are the ones that check results). Parameters stay float32 in storage
  (flax casts them at each layer); GroupNorm and the model output stay float32, so samplers run in float32.
  """
  if name is None:
    return None
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"inference_dtype={name!r}; choose from {list(COMPUTE_DTYPES)}")
  if name == "auto":
    name = "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"
  return jnp.dtype(name)


def with_compute_dtype(pre: Pretrained | Controlled, dtype: jnp.dtype | str | None) -> Pretrained | Controlled:
  """The same params under a model that computes in `dtype` (a name is resolved by `inference_dtype`); a
  Controlled's branch computes in its base's dtype, as `load_controlled` builds it."""
  if isinstance(pre, Controlled):
    base = with_compute_dtype(pre.pre, dtype)
    if base is pre.pre:
      return pre
    model = build_controlled(ControlNetSpec.from_config(pre.config.controlnet), base.spec)
    return dataclasses.replace(pre, pre=base, model=model)
  if isinstance(dtype, str):
    dtype = inference_dtype(dtype)
  if dtype is None or jnp.dtype(dtype) == pre.spec.dtype:
    return pre
  spec = dataclasses.replace(pre.spec, dtype=jnp.dtype(dtype))
  return dataclasses.replace(pre, model=unet3d.UNet3D(spec), spec=spec)


def _from_config(config: ml_collections.ConfigDict, params: Any) -> Pretrained:
  """A stored config's model sections, typed, with these params (the training-only sections are not read)."""
  spec = unet3d.UNetSpec.from_config(config.model)
  diffusion = DiffusionSpec.from_config(config.diffusion)
  return Pretrained(
    unet3d.UNet3D(spec), spec, params, diffusion, DataSpec.from_config(config.data), diffusion.make_schedule(), config
  )


def load(path: str, compute_dtype: str | None = None) -> Pretrained:
  """From a builtin name (e.g. 'tiny_phantom'), an exported dir, or a training workdir.

  compute_dtype: auto | float32 | bfloat16 (`inference_dtype`); None computes as the checkpoint was trained.
  """
  dtype = inference_dtype(compute_dtype)  # a bad name fails before anything is read
  return with_compute_dtype(_load(path), dtype)


def untrained(config: ml_collections.ConfigDict, seed: int = 0) -> Pretrained:
  """A training config's model with freshly initialised params: nothing learned, for speed and memory checks of
  the tasks at an architecture no checkpoint exists for yet (benchmarks/sliding_window.py --checkpoint=preset:paper)."""
  pre = _from_config(stored_config(config.to_dict()), None)
  init = jax.jit(init_params_fn(pre.model, pre.spec, pre.patch_size))
  return dataclasses.replace(pre, params=sharding.strip_boxes(init(jax.random.key(seed, impl="rbg"))))


def _load(path: str) -> Pretrained:
  path = resolve(path)
  if _is_export(path):
    config = read_config(path)
    params = flax.serialization.msgpack_restore(storage.read_bytes(storage.join(path, "params.msgpack")))
    return _from_config(config, jax.tree_util.tree_map(jnp.asarray, params))
  ck = checkpoint.Checkpointer(_checkpoint_dir(path))
  try:
    if not ck.all_steps():
      raise FileNotFoundError(f"{path}: no checkpoints (expected WORKDIR/checkpoints/STEP or params.msgpack)")
    config = stored_config(ck.latest_config())
    pre = _from_config(config, None)
    abstract = _abstract(init_params_fn(pre.model, pre.spec, pre.patch_size))
    return dataclasses.replace(pre, params=_inference_params(ck, abstract, tuple(config.optimizer.trainable)))
  finally:
    ck.close()


def _abstract(init_fn: Callable, *args: Any) -> Any:
  """Unboxed ShapeDtypeStructs of the params on this process's first device (no compute, no memory)."""
  boxed = jax.eval_shape(init_fn, jax.random.key(0, impl="rbg"), *args)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), sharding.strip_boxes(boxed)
  )


def _inference_params(
  ck: checkpoint.Checkpointer, abstract: Any, trained: tuple[str, ...], external: Any = None
) -> Any:
  """EMA of the trained leaves (`trained`: the run's optimizer.trainable patterns) + the frozen leaves as
  checkpointed; `external` (the base of a ControlNet run) supplies frozen leaves the run did not checkpoint."""
  labels = trainable.labels(abstract, trained)
  trained, frozen = trainable.split(abstract, labels)
  if external:
    frozen, _ = trainable.split(frozen, _mask_out(frozen, external))
  targets = {"ema_params": trained, **({"params": frozen} if frozen else {})}
  restored = ck.read_state_fields(targets)
  return trainable.merge(external or {}, restored.get("params", {}), restored["ema_params"])


def _mask_out(tree: dict, external: dict) -> dict:
  """Labels for `split`: leaves present in `external` count as 'frozen' (dropped), the rest 'trainable'."""
  ext = traverse_util.flatten_dict(external)
  flat = {k: trainable.FROZEN if k in ext else trainable.TRAINABLE for k in traverse_util.flatten_dict(tree)}
  return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass
class Controlled:
  """A fine-tuned ControlNet: the base + branch module and its full inference params {'base', 'controlnet'}."""

  pre: Pretrained
  model: controlnet.ControlledUNet
  params: Any
  config: ml_collections.ConfigDict  # the fine-tuning config as stored

  @property
  def data(self) -> DataSpec:
    """The branch run's data layout, typed: its data.spacing is the grid the branch was trained at (its
    base's, train/controlnet.derive_config), where the ControlNet tasks run."""
    return DataSpec.from_config(self.config.data)

  def apply_fn(self, scale: float = 1.0) -> Callable[[Any, jax.Array, jax.Array, dict], jax.Array]:
    """(params, x, t, cond) -> the base + branch output, the branch's residuals scaled by `scale`."""
    return lambda params, x, t, cond: self.model.apply({"params": params}, x, t, cond, scale=scale)


def load_controlled(workdir: str, compute_dtype: str | None = None) -> Controlled:
  """A fine-tuning workdir: branch EMA params from its newest checkpoint, the base from `base_checkpoint`;
  compute_dtype as in `load` (the branch computes in the base's dtype)."""
  ck = checkpoint.Checkpointer(storage.join(workdir, "checkpoints"))
  try:
    if not ck.all_steps():
      raise FileNotFoundError(f"{workdir}: no ControlNet checkpoints under checkpoints/")
    config = stored_config(ck.latest_config())
    pre = load(config.base_checkpoint, compute_dtype)
    model = build_controlled(ControlNetSpec.from_config(config.controlnet), pre.spec)
    abstract = _abstract(controlled_init_fn(model, pre.patch_size), pre.params)
    trained = tuple(config.optimizer.trainable)
    params = _inference_params(ck, abstract, trained, external={"base": pre.params})
  finally:
    ck.close()
  return Controlled(pre, model, params, config)


@dataclasses.dataclass(frozen=True)
class ExportSpec:
  """configs/export.py, typed (whether `source` exists and `output` is free: checks.export)."""

  mode: str
  source: str  # a pretraining workdir, an exported directory or a builtin name
  output: str  # a new (or empty) directory
  overwrite: bool  # replace an existing export in `output`

  def __post_init__(self):
    sections.choice("config.mode", self.mode, ("export",))
    sections.text("config.source", self.source)
    sections.text("config.output", self.output)
    sections.flag("config.overwrite", self.overwrite)

  @classmethod
  def from_config(cls, config: Any) -> ExportSpec:
    return sections.from_config(cls, config, "config")


def export(workdir: str, out_dir: str) -> str:
  """EMA params + config of a pretraining run as a small self-contained directory (what BUILTIN ships)."""
  pre = load(workdir)
  storage.makedirs(out_dir)
  # config first: params.msgpack is what marks an export (`_is_export`), so a reader never sees half of one
  storage.write_text(
    storage.join(out_dir, "config.json"), json.dumps(json.loads(pre.config.to_json_best_effort()), indent=1)
  )
  storage.write_bytes(
    storage.join(out_dir, "params.msgpack"),
    flax.serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, pre.params)),
  )
  return out_dir
