"""Typed config sections (meddiff_jax/sections.py and the XSpec beside each consumer), built once by checks.py
into the typed config each command runs on.

Every validated key: a bad value is one ConfigError naming `config.SECTION.KEY` and the value; unknown and
missing keys are refused; every shipped config file and preset passes; the specs hold no defaults of their
own (configs/ are the only defaults); what training stores in a checkpoint types back to the same config, and
configs stored by older versions still load. Fast tier: nothing here compiles a model.
"""

import dataclasses
import importlib
import json
import re

import ml_collections
import pytest
from conftest import REPO, override, run_main, tiny_config

from meddiff_jax import checks, pretrained, sharding
from meddiff_jax.configs import controlnet as controlnet_configs
from meddiff_jax.configs import input_options, pretrain
from meddiff_jax.data import multilevel, volumes
from meddiff_jax.data import spec as data_spec
from meddiff_jax.diffusion import spec as diffusion_spec
from meddiff_jax.models import unet3d
from meddiff_jax.protocols.spec import EvaluateSpec
from meddiff_jax.train import spec as train_spec
from meddiff_jax.train import state as state_lib

# (section of configs/pretrain.py, its spec)
PRETRAIN_SPECS = [
  ("model", unet3d.UNetSpec),
  ("diffusion", diffusion_spec.DiffusionSpec),
  ("data", data_spec.DataSpec),
  ("data.phantom", data_spec.PhantomSpec),
  ("optimizer", state_lib.OptimizerSpec),
  ("training", train_spec.TrainingSpec),
  ("eval", train_spec.EvalSpec),
  ("checkpoint", train_spec.CheckpointSpec),
  ("mesh", sharding.MeshSpec),
  ("sharding", sharding.ShardingSpec),
]
TASK_CONFIGS = ["denoise", "anomaly", "synthesis", "super_resolution", "lesion"]
ALL_SPECS = (
  [s for _, s in PRETRAIN_SPECS]
  + [train_spec.PretrainConfig, train_spec.ControlNetConfig, pretrained.ControlNetSpec, pretrained.ExportSpec]
  + [EvaluateSpec]
  + list(checks.TASK_SPECS.values())
)


def section(config, dotted):
  for key in dotted.split("."):
    config = config[key]
  return config


def assert_names(error, key, bad):
  message = str(error.value)
  assert f"config.{key}" in message, message
  assert repr(bad) in message or str(bad) in message, message
  assert "\n" not in message


# ------------------------------------------------------------------------------------------ bad values

PRETRAIN_BAD = [
  ("model.base_channels", 0),
  ("model.channel_mult", (1, 0)),
  ("model.attention_levels", (2,)),
  ("model.dropout", 1.0),
  ("model.dtype", "float8"),
  ("model.remat", "sometimes"),
  ("model.conv_impl", "winograd"),
  ("model.num_structure_ids", -1),
  ("diffusion.schedule", "sigmoid"),
  ("diffusion.num_timesteps", 1),
  ("diffusion.prediction_type", "score"),
  ("diffusion.loss_type", "huber"),
  ("diffusion.min_snr_gamma", -1.0),
  ("diffusion.cond_drop_prob", 1.5),
  ("diffusion.structure_drop_prob", -0.1),
  ("diffusion.body_drop_prob", 2.0),
  ("data.source", "nifti"),
  ("data.patch_size", 0),
  ("data.spacing", (1.0, 1.0)),
  ("data.spacing", (1.0, 0.0, 1.0)),
  ("data.spacing", "sourced"),
  ("data.structures", "onehot"),
  ("data.structure_groups", (("liver",),)),
  ("data.operation_probs", (0.0, 0.0, 0.0)),
  ("data.operation_probs", (0.5, -0.5, 1.0)),
  ("data.num_threads", -1),
  ("data.prefetch", -1),
  ("data.worker_count", -2),
  ("data.val_fraction", 1.5),
  ("data.hint", "edges"),
  ("data.sr_factor", 0),
  ("data.positive_fraction", 1.1),
  ("data.phantom.num_volumes", 0),
  ("data.phantom.shape", (48, 0, 48)),
  ("data.phantom.spacing", (6.0, 6.0)),
  ("data.phantom.seed", -1),
  ("data.phantom.num_lesions", -1),
  ("optimizer.learning_rate", 0.0),
  ("optimizer.schedule", "linear"),
  ("optimizer.warmup_steps", -1),
  ("optimizer.decay_steps", -1),
  ("optimizer.end_lr_factor", 1.5),
  ("optimizer.b1", 1.0),
  ("optimizer.b2", -0.1),
  ("optimizer.eps", 0.0),
  ("optimizer.weight_decay", -1e-4),
  ("optimizer.grad_clip_norm", -1.0),
  ("optimizer.trainable", ()),
  ("optimizer.trainable", ("encoder/(",)),
  ("training.batch_size", 0),
  ("training.grad_accum_steps", 0),
  ("training.num_steps", 0),
  ("training.ema_decay", 1.01),
  ("training.log_every", -1),
  ("training.max_consecutive_nan", 0),
  ("training.profile_steps", -1),
  ("eval.every_steps", -1),
  ("eval.num_batches", 0),
  ("eval.num_buckets", 0),
  ("eval.sample_every_steps", -5),
  ("eval.sample_steps", 0),
  ("checkpoint.every_steps", -1),
  ("checkpoint.keep", 0),
  ("checkpoint.on_unrestorable", "delete"),
  ("mesh.data", 0),
  ("mesh.fsdp", -2),
  ("mesh.spatial", 0),
  ("mesh.tensor", 0),
  ("sharding.rules", (("batch", "pipeline"),)),
  ("sharding.rules", "defaults"),
  ("sharding.min_shard_size", -1),
]


@pytest.mark.parametrize("key,bad", PRETRAIN_BAD, ids=[f"{k}={v!r}" for k, v in PRETRAIN_BAD])
def test_pretrain_bad_value_names_the_key(key, bad):
  with pytest.raises(checks.ConfigError) as e:
    checks.pretrain(override(tiny_config(), **{key: bad}))
  assert_names(e, key, bad)


SPEC_OF = dict(PRETRAIN_SPECS)
TYPE_BAD = [
  ("data", "use_structures", "yes"),
  ("data", "pack_structures", "yes"),
  ("data", "prepared_dir", 3),
  ("data", "class_map", None),
  ("checkpoint", "asynchronous", 1),
  ("training", "num_steps", 2.5),
  ("data", "patch_size", True),
]


@pytest.mark.parametrize("name,key,bad", TYPE_BAD, ids=[f"{n}.{k}={v!r}" for n, k, v in TYPE_BAD])
def test_wrong_types_are_refused(name, key, bad):
  """What ConfigDict's own type lock lets through when a config is built in code (or read back from JSON)."""
  values = dict(section(tiny_config(), name).to_dict(), **{key: bad})
  with pytest.raises(checks.ConfigError) as e:
    SPEC_OF[name].from_config(values)
  assert_names(e, f"{name}.{key}", bad)


def test_choices_are_listed_and_mesh_rest_axis_once():
  with pytest.raises(
    checks.ConfigError,
    match=r"config.diffusion.schedule='sigmoid'; choose one of \('linear', "
    r"'cosine', 'scaled_linear'\)",
  ):
    checks.pretrain(override(tiny_config(), **{"diffusion.schedule": "sigmoid"}))
  with pytest.raises(checks.ConfigError, match=r"config.mesh has -1 for \['data', 'fsdp'\]; at most one"):
    checks.pretrain(override(tiny_config(), **{"mesh.fsdp": -1}))


def test_cross_section_checks():
  with pytest.raises(checks.ConfigError, match="config.eval.sample_steps=2000 exceeds config.diffusion.num_timesteps"):
    checks.pretrain(override(tiny_config(), **{"eval.sample_steps": 2000}))
  with pytest.raises(checks.ConfigError, match="config.eval.num_buckets=1001 exceeds"):
    checks.pretrain(override(tiny_config(), **{"eval.num_buckets": 1001}))
  # switched-off previews / validation do not need sample_steps / num_buckets in range
  checks.pretrain(override(tiny_config(), **{"eval.sample_steps": 2000, "eval.sample_every_steps": 0}))


def test_top_level_pretrain_keys():
  with pytest.raises(checks.ConfigError, match="config.seed=-1"):
    checks.pretrain(override(tiny_config(), seed=-1))
  with pytest.raises(checks.ConfigError, match="config.compilation_cache_dir=None"):
    checks.pretrain(override(tiny_config(), compilation_cache_dir=None))


CONTROLNET_BAD = [
  ("controlnet.hint_hidden", ()),
  ("controlnet.hint_hidden", (16, 0)),
  ("controlnet.conditioning_scale", -1.0),
]


@pytest.mark.parametrize("key,bad", CONTROLNET_BAD, ids=[f"{k}={v!r}" for k, v in CONTROLNET_BAD])
def test_controlnet_bad_value_names_the_key(key, bad):
  with pytest.raises(checks.ConfigError) as e:
    checks.controlnet(override(controlnet_configs.get_config("sr"), **{key: bad}))
  assert_names(e, key, bad)


COMMON_TASK_BAD = [
  ("num_steps", 0),
  ("sampler", "euler"),
  ("overlap", 1.0),
  ("overlap", -0.5),
  ("window_batch", 0),
  ("seed", -1),
  ("inference_dtype", "fp16"),
  ("region", "pelvis"),
  ("trust_affine", "both"),
  ("assume_orientation", "XYZ"),
  ("limits.max_voxels", 0),
  ("limits.max_gb", 0.0),
  ("limits.max_spacing_mm", -1.0),
  ("limits.min_side_voxels", 0),
]
TASK_BAD = [(t, k, v) for t in TASK_CONFIGS for k, v in COMMON_TASK_BAD] + [
  ("denoise", "method", "nlm"),
  ("denoise", "noise_sigma_hu", -1.0),
  ("denoise", "noise_sigma_hu", 0.0),
  ("denoise", "noise_sigma_hu", "estimated"),
  ("denoise", "spacing", "checkpnt"),
  ("denoise", "lam", 0.0),
  ("denoise", "zeta", 1.5),
  ("denoise", "window_blend_hu", -1.0),
  ("super_resolution", "window_blend_hu", -5.0),
  ("lesion", "window_blend_hu", -1.0),
  ("denoise", "spacing", (1.0,)),
  ("anomaly", "noise_t", 0),
  ("anomaly", "smooth_sigma", -1.0),
  ("anomaly", "top_fraction", 0.0),
  ("anomaly", "top_fraction", 1.5),
  ("anomaly", "spacing", (0.0, 1.0, 1.0)),
  ("synthesis", "shape", (48, 0, 48)),
  ("synthesis", "shape", (48, 48)),
  ("synthesis", "guidance_scale", -1.0),
  ("synthesis", "eta", -0.1),
  ("synthesis", "spacing", (2.0, 2.0)),
  ("super_resolution", "conditioning_scale", -1.0),
  ("super_resolution", "spacing", (1.0, 1.0)),
  ("lesion", "method", "paint"),
  ("lesion", "jump_timesteps", 0),
  ("lesion", "jump_n_sample", 0),
  ("lesion", "spacing", (1.0, 1.0)),
  ("lesion", "conditioning_scale", -0.5),
]


@pytest.mark.parametrize("task,key,bad", TASK_BAD, ids=[f"{t}:{k}={v!r}" for t, k, v in TASK_BAD])
def test_task_bad_value_names_the_key(task, key, bad):
  """The spec runs before the paths are looked at: the defaults' empty input / output do not matter."""
  config = override(importlib.import_module(f"meddiff_jax.configs.{task}").get_config(), **{key: bad})
  with pytest.raises(ValueError) as e:
    checks.task(config)
  assert_names(e, key, bad)


def test_evaluate_checks_the_task_config_it_will_run():
  from meddiff_jax.configs import evaluate

  with pytest.raises(checks.ConfigError, match=re.escape("config.sampler='euler'")):
    checks.evaluate(override(evaluate.get_config(), sampler="euler"))
  with pytest.raises(checks.ConfigError, match=re.escape("config.lam=0.0")):
    checks.evaluate(override(evaluate.get_config(), task="lam=0.0"))
  checks.evaluate(override(evaluate.get_config(), sampler="euler", skip_model=True))  # no model run: not used


def test_prepare_checks_the_input_limits(tmp_path):
  from conftest import prepare_config

  config = prepare_config(tmp_path, tmp_path / "out")
  checks.prepare(config)
  with pytest.raises(checks.ConfigError) as e:
    checks.prepare(override(config, **{"limits.max_gb": -1.0}))
  assert_names(e, "limits.max_gb", -1.0)


# ------------------------------------------------------------------------------------------ unknown / missing keys


@pytest.mark.parametrize("name,spec", PRETRAIN_SPECS, ids=[n for n, _ in PRETRAIN_SPECS])
def test_unknown_and_missing_keys_are_refused(name, spec):
  values = section(tiny_config(), name).to_dict()
  with pytest.raises(checks.ConfigError, match=re.escape(f"config.{name} has unknown keys ['bogus']; valid keys: ")):
    spec.from_config(dict(values, bogus=1))
  missing = next(iter(values))
  with pytest.raises(checks.ConfigError, match=re.escape(f"config.{name} lacks keys ['{missing}']")):
    spec.from_config({k: v for k, v in values.items() if k != missing})


@pytest.mark.parametrize("name", [n for n, _ in PRETRAIN_SPECS], ids=[n for n, _ in PRETRAIN_SPECS])
def test_checks_pretrain_refuses_an_unknown_key_in_every_section(name):
  config = tiny_config()
  section(config, name).bogus = 1
  with pytest.raises(checks.ConfigError, match=re.escape(f"config.{name} has unknown keys ['bogus']")):
    checks.pretrain(config)


@pytest.mark.parametrize("task", TASK_CONFIGS)
def test_task_unknown_keys_are_refused(task):
  config = importlib.import_module(f"meddiff_jax.configs.{task}").get_config()
  config.bogus = 1
  with pytest.raises(checks.ConfigError, match=re.escape("config has unknown keys ['bogus']; valid keys: ")):
    checks.task(config)
  del config["bogus"]
  config.limits.bogus = 1
  with pytest.raises(checks.ConfigError, match=re.escape("config.limits has unknown keys ['bogus']")):
    checks.task(config)


def test_a_key_of_another_task_is_refused():
  config = importlib.import_module("meddiff_jax.configs.denoise").get_config()
  config.noise_t = 950  # anomaly's
  with pytest.raises(checks.ConfigError, match=re.escape("unknown keys ['noise_t']")):
    checks.task(config)


def test_controlnet_section_unknown_key():
  config = controlnet_configs.get_config("lesion")
  config.controlnet.hint_depth = 3
  with pytest.raises(checks.ConfigError, match=re.escape("config.controlnet has unknown keys ['hint_depth']")):
    checks.controlnet(config)


# ------------------------------------------------------------------------------------------ shipped configs pass


# (preset, devices it is planned for): tiny / base on one CPU or GPU, paper on 1 to 8, paper256 on 8 per sample
PRESETS = [
  (p + o, n)
  for p, ns in (("tiny", (1,)), ("base", (1,)), ("paper", (1, 8)), ("paper256", (8,)))
  for n in ns
  for o in ("", "+classes")
]


@pytest.mark.parametrize("preset,devices", PRESETS, ids=[f"{p}-{n}dev" for p, n in PRESETS])
def test_every_pretrain_preset_passes(preset, devices, tmp_path):
  config = pretrain.get_config(preset)
  if config.data.source == "prepared":
    config.data.prepared_dir = str(tmp_path)
  typed = checks.pretrain(config, devices)
  assert isinstance(typed, train_spec.PretrainConfig) and typed.preset == preset.split("+")[0]
  assert typed.data.spacing == "source" and typed.sharding.logical_rules == sharding.DEFAULT_RULES


@pytest.mark.parametrize("name", ["demo", "tiny_ct"])
def test_every_training_config_file_passes(name, tmp_path):
  config = importlib.import_module(f"meddiff_jax.configs.{name}").get_config()
  if config.data.source == "prepared":
    config.data.prepared_dir = str(tmp_path)
  checks.pretrain(config, num_devices=1)


@pytest.mark.parametrize("preset", ["sr", "lesion"])
def test_controlnet_presets_and_their_derived_configs_pass(preset):
  config = controlnet_configs.get_config(preset)
  config.model.base_channels = 16  # the base checkpoint's architecture wins
  derived = checks.controlnet(config, num_devices=1)
  assert isinstance(derived, train_spec.ControlNetConfig) and derived.task == preset
  assert derived.model == unet3d.UNetSpec.from_config(pretrained.read_config("tiny_phantom").model)
  assert derived.model.base_channels == 8 and config.model.base_channels == 16  # the argument is left as it was
  # what a checkpoint stores of it types back to the same config
  assert train_spec.ControlNetConfig.from_config(derived.stored(None)) == derived


@pytest.mark.parametrize("task", TASK_CONFIGS)
def test_every_task_config_passes_its_spec(task):
  config = importlib.import_module(f"meddiff_jax.configs.{task}").get_config()
  spec = checks.TASK_SPECS[task].from_config(config)
  assert spec.mode == task and spec.read == volumes.ReadOptions.from_config(config)


def test_prepare_evaluate_export_configs_pass(tmp_path):
  from conftest import prepare_config

  from meddiff_jax.configs import evaluate, export

  checks.prepare(prepare_config(tmp_path, tmp_path / "out"))
  checks.evaluate(evaluate.get_config())
  config = export.get_config()
  config.source, config.output = "tiny_phantom", str(tmp_path / "exported")
  checks.export(config)


# ------------------------------------------------------------------------------------------ one source of defaults


@pytest.mark.parametrize("spec", ALL_SPECS, ids=[s.__name__ for s in ALL_SPECS])
def test_specs_have_no_defaults_of_their_own(spec):
  """configs/*.py are the only defaults: a default in a spec would be a second one that can drift."""
  defaulted = [
    f.name
    for f in dataclasses.fields(spec)
    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
  ]
  assert not defaulted


def test_read_options_defaults_equal_configs_input_options():
  """ReadOptions() (library callers) and the command line's defaults (configs/input_options.py) agree."""
  config = input_options.add_input_options(ml_collections.ConfigDict())
  assert volumes.ReadOptions() == volumes.ReadOptions.from_section(config)
  assert set(dataclasses.asdict(volumes.ReadOptions())) == set(volumes.INPUT_KEYS[:-1]) | set(config.limits)


def test_hint_names_agree():
  """data/ cannot import train/: the hint names of the data spec and of ControlNet's tasks must agree."""
  assert set(train_spec.HINTS.values()) == set(multilevel.HINTS)


def test_unet_spec_still_types_the_model_section():
  with pytest.raises(checks.ConfigError, match="config.model has unknown keys"):
    config = tiny_config()
    config.model.bogus = 1
    checks.pretrain(config)
  assert isinstance(unet3d.UNetSpec.from_config(tiny_config().model), unet3d.UNetSpec)


# ------------------------------------------------------------------------------------------ the command line


def test_one_bad_value_is_one_error_line_exit_1(tmp_path):
  proc = run_main("--config=configs/pretrain.py:tiny", f"--workdir={tmp_path}", "--config.diffusion.loss_type=huber")
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert errors == ["error: config.diffusion.loss_type='huber'; choose one of ('l1', 'l2')"], proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == errors[0]
  assert not list(tmp_path.glob("events.out.tfevents.*")) and not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------------------------ stored configs


def test_what_training_stores_types_back_to_the_same_config():
  """Checkpoints carry `PretrainConfig.stored(spacing)`: the config with data.spacing the training spacing."""
  typed = train_spec.PretrainConfig.from_config(tiny_config())
  assert train_spec.PretrainConfig.from_config(typed.stored(None)) == typed  # spacing unknown: 'source' kept
  stored = typed.stored((1.5, 1.5, 1.5))
  assert stored["data"]["spacing"] == [1.5, 1.5, 1.5] and stored["model"]["dtype"] == "float32"
  back = train_spec.PretrainConfig.from_config(stored)
  assert back.data.spacing == (1.5, 1.5, 1.5) and back.data.training_spacing() == (1.5, 1.5, 1.5)
  assert dataclasses.replace(back, data=typed.data) == typed


def test_configs_stored_by_older_versions_still_type():
  """Keys added later (LEGACY_KEYS) and values that got a name (LEGACY_VALUES: data.spacing () -> 'source',
  sharding.rules () -> 'default'); tests/legacy_tiny_phantom_config.json, the config of the tiny_phantom shipped
  until #26, predates most of them."""
  old = pretrained.stored_config({"data": {"spacing": [], "source": "phantom"}, "sharding": {"rules": []}})
  assert old.data.spacing == "source" and old.sharding.rules == "default"
  kept = pretrained.stored_config({"data": {"spacing": [2.0, 2.0, 2.0]}})
  assert tuple(kept.data.spacing) == (2.0, 2.0, 2.0)
  stored = pretrained.stored_config(json.loads((REPO / "tests" / "legacy_tiny_phantom_config.json").read_text()))
  data, model = data_spec.DataSpec.from_config(stored.data), unet3d.UNetSpec.from_config(stored.model)
  assert data.spacing == "source" and data.training_spacing() == tuple(data.phantom.spacing)
  assert model.attention_levels == (1,) and model.conv_impl == "auto"
  assert stored.optimizer.trainable == list(pretrained.ALL_PARAMS)


def test_keyword_keys_take_a_value_or_their_keyword_on_the_command_line(tmp_path):
  """A key whose default is a keyword (`sections.keyword`) takes a tuple or a number from the command line, and
  a word: the run gets past the spec (to the missing input file), or the spec names the key."""
  base = ("--config=configs/denoise.py", f"--config.input={tmp_path / 'none.nii.gz'}", f"--config.output={tmp_path}/o")
  proc = run_main(*base, "--config.spacing=(1.0,1.0,2.0)", "--config.noise_sigma_hu=30")
  assert proc.returncode == 1 and "none.nii.gz' is not a file" in proc.stderr, proc.stderr[-2000:]
  proc = run_main(*base, "--config.spacing=checkpoint", "--config.noise_sigma_hu=estimate")
  assert proc.returncode == 1 and "none.nii.gz' is not a file" in proc.stderr, proc.stderr[-2000:]
  proc = run_main(*base, "--config.noise_sigma_hu=estimated")
  assert "error: config.noise_sigma_hu='estimated'; must be a number > 0, or one of ('estimate',)" in proc.stderr
  proc = run_main(
    "--config=configs/pretrain.py:tiny",
    f"--workdir={tmp_path / 'w'}",
    "--config.data.spacing=(2.0,2.0,2.0)",
    "--config.sharding.rules=(('batch',('data','fsdp')),)",
    "--config.mesh.data=3",  # past the specs: the mesh against the one device present
  )
  assert proc.returncode == 1 and "error: mesh {'data': 3" in proc.stderr, proc.stderr[-2000:]
