"""The Python API (meddiff_jax/api.py) is the command: every call against the command run on the same input (the
same output array, bitwise), arrays and files, a gs:// checkpoint on the GCS emulator, one-line errors.

The fast tier checks what makes them equal without running a model: the options become the spec the command line
gives, an array becomes the volume its file would, the result is what the file would hold, and every error is one
line; the slow tier runs each call and its command. "The command" is main.COMMANDS[mode] (the check and the run
that `meddiff` dispatches to after parsing its flags) on a config built as the command line builds it; one test
runs the real command line in a subprocess against the API in a subprocess (one device each)."""

import json
import os
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, run_main, tiny_config

import meddiff_jax as md
from meddiff_jax import api, checks, config_files, main, pretrained
from meddiff_jax.data import nifti, phantom, store, volume_io, volumes
from meddiff_jax.tasks import denoise

# a short reverse process (one model call per step on 8 devices); the region given: a small phantom has too little
# anatomy for the estimate
STEPS = {"num_steps": 2, "window_batch": 8, "region": "abdomen"}
# voxel order L, P, S: an array whose first two axes run the other way (e.g. from ITK / DICOM tools)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_lps(hu: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The same volume in L, P, S voxel order, with its affine (the same world positions)."""
  flip = LPS.copy()
  flip[:2, 3] = np.array(hu.shape[:2]) - 1
  return np.ascontiguousarray(hu[::-1, ::-1, :]), affine @ flip


def from_lps(values: np.ndarray) -> np.ndarray:
  return values[::-1, ::-1, :]


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
  """A small abdomen phantom CT (RAS, shifted origin) and its TotalSegmentator-style labels, as files and arrays."""
  d = tmp_path_factory.mktemp("api_ct")
  p = phantom.make_phantom((20, 18, 16), (6.0, 6.0, 6.0), "abdomen", seed=5, num_lesions=1)
  affine = p.affine.copy()
  affine[:3, 3] += [10.0, -20.0, 30.0]
  hu, labels = np.round(p.hu).astype(np.int16), p.labels.astype(np.int16)
  nifti.save(volumes.Volume(hu, affine), d / "ct.nii.gz", np.int16)
  nifti.save(volumes.Volume(labels, affine), d / "seg.nii.gz", np.int16)
  return dict(dir=d, path=str(d / "ct.nii.gz"), labels_path=str(d / "seg.nii.gz"), hu=hu, labels=labels, affine=affine)


def command(name: str, **keys) -> dict:
  """`meddiff --config=NAME --config.KEY=VALUE ...` in this process: the shipped config with the keys set (as
  the flags set them), then the command's check and run from main's table."""
  config = config_files.load(name)
  for key, value in keys.items():
    config[key] = value
  config.lock()
  entry = main.COMMANDS[config.mode]
  return entry.run(entry.check(config), None)


def file_data(path) -> np.ndarray:
  """The voxels as stored, in the file's voxel order and dtype."""
  return np.asarray(nib.load(str(path)).dataobj)


def info(result_info: dict, **expected) -> dict:
  """A result's info as the command's (the closing summary's fields) for comparison: without its wall time, with
  the `expected` entries set."""
  return {**{k: v for k, v in result_info.items() if k != "seconds"}, **expected}


def one_line(e: pytest.ExceptionInfo) -> str:
  message = str(e.value)
  assert "\n" not in message and message, message
  return message


# ------------------------------------------------------------------------------------------------ the surface


def test_import_is_cheap_and_the_api_names_no_module():
  out = subprocess.run(
    [sys.executable, "-c", "import sys, meddiff_jax as md; print(len(md.__all__), 'jax' in sys.modules)"],
    capture_output=True,
    text=True,
    env=dict(os.environ, PYTHONPATH=str(REPO)),
  )
  assert out.stdout.split() == [str(len(md.__all__)), "False"], out.stderr[-2000:]
  assert md.denoise.__module__ == "meddiff_jax.api"
  import pkgutil

  modules = {m.name for m in pkgutil.iter_modules(md.__path__)}
  assert not set(md.__all__) & modules  # `md.train` would be the subpackage once imported, not a function
  assert all(getattr(md, name) is getattr(api, name) for name in md.__all__)


def test_the_readme_example_uses_the_api_only():
  """The README's "Python API" block calls names the package exports and a Pipeline's methods."""
  import re

  readme = (REPO / "README.md").read_text()
  block = readme.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
  assert set(re.findall(r"\bmd\.(\w+)", block)) <= set(md.__all__)
  methods = set(re.findall(r"\bpipe\.(\w+)\(", block)) | set(re.findall(r"\)\.(\w+)\(", block))
  assert methods and methods <= {n for n in vars(api.Pipeline) if not n.startswith("_")}


@pytest.mark.parametrize(
  "options,name",
  [
    (api.DenoiseOptions, "denoise"),
    (api.AnomalyOptions, "anomaly"),
    (api.SynthesisOptions, "synthesis"),
    (api.SuperResolutionOptions, "super_resolution"),
    (api.PrepareOptions, "prepare"),
  ],
)
def test_typed_options_are_the_shipped_config_keys(options, name):
  """Each keyword-option type names exactly the config's keys that are not the call's own arguments."""
  config = config_files.load(name)
  assert set(options.__annotations__) == set(config) - set(api.ARGUMENTS)
  assert set(api.Limits.__annotations__) == set(config.limits)


def test_options_reach_the_spec_as_the_command_line_sets_them(ct, monkeypatch):
  """The spec a call runs on is the one `meddiff --config=denoise --config.KEY=...` checks into (numpy values,
  nested sections and keyword values included)."""
  seen = {}
  monkeypatch.setattr(denoise, "run", lambda task, memory: seen.update(task=task) or {})
  md.load("tiny_phantom").denoise(
    ct["path"],
    num_steps=np.int64(3),
    spacing=np.array([4.0, 4.0, 4.0]),
    noise_sigma_hu=30,
    limits={"max_gb": 2.0},
    method="partial",
  )
  config = config_files.load("denoise")
  config.update(checkpoint="tiny_phantom", input=ct["path"], output="", num_steps=3, spacing=(4.0, 4.0, 4.0))
  config.update(noise_sigma_hu=30, method="partial")
  config.limits.max_gb = 2.0
  assert seen["task"] == checks.task(config, api.common.InMemory(None))


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
  "kwargs,error,match",
  [
    (dict(foo=1), api.ConfigError, "denoise has no option 'foo'; its options: assume_hu, "),
    (dict(num_steps=2.5), api.ConfigError, r"denoise option num_steps=2.5: must be of type int \(shipped: 10\)"),
    (dict(limits=3), api.ConfigError, "option limits=3: a section; give a dict"),
    (dict(limits={"max_gbs": 1}), api.ConfigError, "has no option 'limits.max_gbs'; its options: max_gb, "),
    (dict(input="x.nii.gz"), api.ConfigError, r"\['input'\] are arguments of the call, not options"),
    (dict(num_steps=0), ValueError, "config.num_steps=0"),
    (dict(method="magic"), ValueError, "config.method='magic'"),
    (dict(region="knee"), ValueError, "region"),
  ],
)
def test_bad_options_are_one_line_errors(ct, kwargs, error, match):
  with pytest.raises(error, match=match) as e:
    md.load("tiny_phantom").denoise(ct["path"], **kwargs)
  one_line(e)


@pytest.mark.parametrize(
  "case,error,match",
  [
    ("array without affine", api.ConfigError, r"ct given as an array: give its affine= \(4x4"),
    ("affine with a file", api.ConfigError, "affine= is for an array input; a file carries its own"),
    ("2D array", md.VolumeError, r"<ct array>: array of shape \(18, 16\): give a 3D volume"),
    ("3x3 affine", md.VolumeError, r"<ct array>: affine of shape \(3, 3\): give the 4x4"),
    ("NaN voxels", md.VolumeError, "<ct array>: 1 NaN/inf voxels"),
    ("not CT", md.VolumeError, r"<ct array>: intensities in \[0, 255\] .* not CT in Hounsfield units"),
    ("sheared affine", md.VolumeError, "<ct array>: sheared voxel grid"),
    ("labels off grid", ValueError, "labels=<labels array> is on another grid than the input CT"),
    ("missing file", FileNotFoundError, r"--config.input='/nonexistent/ct.nii.gz' is not a file"),
    ("a list", api.ConfigError, "ct=list: give a file path or a numpy array"),
  ],
)
def test_bad_inputs_are_one_line_errors(ct, case, error, match):
  hu, affine = ct["hu"].astype(np.float32), ct["affine"]
  sheared = affine.copy()
  sheared[0, 1] = 2.0
  nan = hu.copy()
  nan[3, 4, 5] = np.nan
  kwargs = {
    "array without affine": dict(ct=hu),
    "affine with a file": dict(ct=ct["path"], affine=affine),
    "2D array": dict(ct=hu[0], affine=affine),
    "3x3 affine": dict(ct=hu, affine=np.eye(3)),
    "NaN voxels": dict(ct=nan, affine=affine),
    "not CT": dict(ct=np.linspace(0, 255, hu.size).reshape(hu.shape), affine=affine),
    "sheared affine": dict(ct=hu, affine=sheared),
    "labels off grid": dict(ct=hu, labels=ct["labels"][:-1], affine=affine),
    "missing file": dict(ct="/nonexistent/ct.nii.gz"),
    "a list": dict(ct=[1, 2, 3]),
  }[case]
  with pytest.raises(error, match=match) as e:
    md.load("tiny_phantom").denoise(**kwargs, num_steps=1)
  one_line(e)


def test_bad_checkpoints_and_configs_are_one_line_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"checkpoint '/nonexistent' does not exist .*'tiny_phantom'") as e:
    md.load("/nonexistent")
  one_line(e)
  with pytest.raises(md.ConfigError, match="super_resolve needs a ControlNet fine-tuning workdir") as e:
    md.load("tiny_phantom").super_resolve(np.zeros((8, 8, 8)), affine=np.eye(4))
  one_line(e)
  with pytest.raises(md.ConfigError, match="pretrain takes a config of mode 'train'.*not 'denoise'") as e:
    md.pretrain("denoise", tmp_path)
  one_line(e)
  with pytest.raises(md.ConfigError, match="finetune takes a config of mode 'controlnet'") as e:
    md.finetune(tiny_config(), tmp_path)
  with pytest.raises(ValueError, match="'nonexistent' is neither a shipped config"):
    md.pretrain("nonexistent", tmp_path)
  with pytest.raises(FileNotFoundError, match="config.input_dir='/nonexistent' is not a directory"):
    md.prepare("/nonexistent", tmp_path / "out")
  assert md.hu_window("abdomen") == (-120.0, 240.0)
  with pytest.raises(ValueError, match="unknown region 'knee'"):
    md.hu_window("knee")


# ------------------------------------------------------------------------------------- API == command, bitwise


@pytest.fixture(scope="module")
def denoised(ct):
  """The denoise command on the CT file (the shipped options but a short budget)."""
  out = ct["dir"] / "denoised_command.nii.gz"
  info = command("denoise", input=ct["path"], output=str(out), **STEPS)
  return dict(path=out, info=info)


@pytest.mark.slow
def test_denoise_on_an_array_in_any_voxel_order_is_the_command_on_its_file(ct, denoised):
  """An L,P,S-ordered array with its affine: the same checks, the same working grid (the model's 3 mm, and back),
  the same numbers, and the result in the array's own voxel order and dtype, bitwise."""
  hu, affine = to_lps(ct["hu"].astype(np.float32), ct["affine"])
  result = md.load("tiny_phantom").denoise(hu, affine=affine, **STEPS)
  assert result.image.dtype == np.int16 and result.image.shape == hu.shape
  np.testing.assert_array_equal(from_lps(result.image), file_data(denoised["path"]))
  np.testing.assert_allclose(result.affine, affine)
  assert info(result.info) == info(denoised["info"], input="", output="")


@pytest.mark.slow
def test_denoise_file_in_file_out_is_the_command(ct, denoised, tmp_path):
  """A path in, a path out (the module-level call): the same file, and the image is what the file holds."""
  out = tmp_path / "api.nii.gz"
  result = md.denoise(ct["path"], out, checkpoint="tiny_phantom", **STEPS)
  np.testing.assert_array_equal(file_data(out), file_data(denoised["path"]))
  np.testing.assert_array_equal(result.image, file_data(out))
  np.testing.assert_allclose(result.affine, nib.load(str(out)).affine, atol=1e-6)
  assert info(result.info) == info(denoised["info"], output=str(out))


@pytest.mark.slow
def test_detect_anomalies_with_labels_on_arrays_is_the_command_on_files(ct, tmp_path):
  """The anomaly map (float32) and the scores, with organ conditions from a label map: arrays vs files."""
  out = tmp_path / "map.nii.gz"
  options = dict(noise_t=500, **STEPS)
  command_info = command("anomaly", input=ct["path"], labels=ct["labels_path"], output=str(out), **options)
  hu, affine = to_lps(ct["hu"], ct["affine"])
  labels, _ = to_lps(ct["labels"], ct["affine"])
  result = md.load("tiny_phantom").detect_anomalies(hu, labels=labels, affine=affine, **options)
  np.testing.assert_array_equal(from_lps(result.image), file_data(out))
  assert result.image.dtype == np.float32
  assert info(result.info) == info(command_info, input="", output="")
  assert json.loads((tmp_path / "map.json").read_text())["slice_scores"] == result.info["slice_scores"]


@pytest.mark.slow
def test_synthesize_from_a_shape_and_from_a_label_map_is_the_command(ct, tmp_path):
  out = tmp_path / "shape.nii.gz"
  command_info = command("synthesis", output=str(out), shape=(24, 16, 20), guidance_scale=2.0, **STEPS)
  result = md.synthesize(checkpoint="tiny_phantom", shape=(24, 16, 20), guidance_scale=2.0, **STEPS)
  np.testing.assert_array_equal(result.image, file_data(out))
  np.testing.assert_allclose(result.affine, nib.load(str(out)).affine, atol=1e-6)
  assert info(result.info) == info(command_info, output="")
  out = tmp_path / "labels.nii.gz"
  command("synthesis", output=str(out), labels=ct["labels_path"], **STEPS)
  labels, affine = to_lps(ct["labels"], ct["affine"])
  result = md.load("tiny_phantom").synthesize(labels, affine=affine, **STEPS)
  np.testing.assert_array_equal(from_lps(result.image), file_data(out))


@pytest.mark.slow
def test_prepare_is_the_command(tmp_path):
  scans = tmp_path / "scans"
  for i in range(2):
    p = phantom.make_phantom((24, 20, 16), (3.0, 3.0, 4.0), "abdomen", seed=i)
    nifti.save(volumes.Volume(np.round(p.hu), p.affine), scans / f"ct{i}.nii.gz", np.int16)
  options = dict(spacing=(6.0, 6.0, 6.0), default_region="abdomen", workers=1, store_format="zarr")
  command("prepare", input_dir=str(scans), output_dir=str(tmp_path / "command"), **options)
  report = md.prepare(scans, tmp_path / "api", **options)
  assert report == json.loads((tmp_path / "api" / "report.json").read_text())
  ours, theirs = (store.PreparedStore(str(tmp_path / d)) for d in ("api", "command"))
  assert len(ours) == len(theirs) == 2
  for a, b in zip(sorted(ours.records, key=lambda r: r["id"]), sorted(theirs.records, key=lambda r: r["id"])):
    assert a["id"] == b["id"] and a["shape"] == b["shape"]
    np.testing.assert_array_equal(
      np.asarray(store.open_array(str(tmp_path / "api" / a["image"]))[...]),
      np.asarray(store.open_array(str(tmp_path / "command" / b["image"]))[...]),
    )


def _metrics(workdir) -> list[dict]:
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k and "/s" not in k} for r in rows]


@pytest.mark.slow
def test_pretrain_is_the_command(tmp_path):
  """The same losses, logged the same way, as the train command's check and run."""
  config = tiny_config(**{"training.num_steps": 1, "eval.every_steps": 0, "eval.sample_every_steps": 0})
  md.pretrain(config, tmp_path / "api")
  entry = main.COMMANDS["train"]
  entry.run(entry.check(config), str(tmp_path / "command"))
  assert _metrics(tmp_path / "api") == _metrics(tmp_path / "command")


@pytest.mark.slow
def test_finetune_and_super_resolve_are_the_commands(ct, tmp_path):
  """ControlNet fine-tuning logs the same losses as the command; its workdir loads as a pipeline (the base for the
  zero-shot tasks) whose super_resolve on an array is the super_resolution command on the file."""
  cn = config_files.load("controlnet:sr")
  cn.training.update(num_steps=1, batch_size=8)
  cn.data.phantom.update(num_volumes=3, shape=(32, 32, 32))
  cn.eval.update(every_steps=0, sample_every_steps=0)
  md.finetune(cn, tmp_path / "cn")
  entry = main.COMMANDS["controlnet"]
  entry.run(entry.check(cn), str(tmp_path / "cn_command"))
  assert _metrics(tmp_path / "cn") == _metrics(tmp_path / "cn_command")

  thin = volumes.Volume(ct["hu"].astype(np.float32), ct["affine"])
  lr = volumes.resample(thin, (6.0, 6.0, 12.0), order=1)
  lr.data = np.round(lr.data).astype(np.int16)
  nifti.save(lr, tmp_path / "lr.nii.gz", np.int16)
  options = dict(spacing=(6.0, 6.0, 6.0), **STEPS)
  out = tmp_path / "sr.nii.gz"
  command_info = command(
    "super_resolution", controlnet=str(tmp_path / "cn"), input=str(tmp_path / "lr.nii.gz"), output=str(out), **options
  )
  pipe = md.load(str(tmp_path / "cn"))
  result = pipe.super_resolve(lr.data, affine=lr.affine, **options)
  np.testing.assert_array_equal(result.image, file_data(out))
  np.testing.assert_allclose(result.affine, nib.load(str(out)).affine, atol=1e-5)
  assert info(result.info) == info(command_info, output="")
  base = pretrained.load("tiny_phantom")
  assert isinstance(pipe.model, pretrained.Controlled) and pipe.spacing == (3.0, 3.0, 3.0)
  assert all(np.array_equal(a, b) for a, b in zip(*map(jax.tree_util.tree_leaves, (pipe.base.params, base.params))))


@pytest.mark.slow
def test_a_gs_checkpoint_loads_and_runs_like_the_local_one(ct, gcs, denoised):
  """An exported checkpoint on gs:// (the emulator): the same params, the same result as the builtin."""
  pretrained.export("tiny_phantom", "gs://bucket/api/tiny")
  pipe, local = md.load("gs://bucket/api/tiny"), pretrained.load("tiny_phantom")
  flat = lambda params: jax.tree_util.tree_leaves(params)
  assert all(np.array_equal(a, b) for a, b in zip(flat(pipe.base.params), flat(local.params), strict=True))
  result = md.denoise(ct["path"], checkpoint="gs://bucket/api/tiny", **STEPS)
  np.testing.assert_array_equal(result.image, file_data(denoised["path"]))


API_SCRIPT = """
import json, sys, numpy as np, meddiff_jax as md
options = dict(method="partial", num_steps=2, region="abdomen")
r = md.denoise(sys.argv[1], checkpoint="tiny_phantom", labels=sys.argv[2], **options)
np.save(sys.argv[3], r.image)
print(json.dumps(r.info))
"""


@pytest.mark.slow
def test_the_command_line_and_the_api_agree_in_fresh_processes(ct, tmp_path):
  """`python -m meddiff_jax.main` (what the `meddiff` script runs) and a script using the API, one CPU device each."""
  out = tmp_path / "cli.nii.gz"
  args = ("--config=denoise", f"--config.input={ct['path']}", f"--config.labels={ct['labels_path']}")
  proc = run_main(
    *args, f"--config.output={out}", "--config.method=partial", "--config.num_steps=2", "--config.region=abdomen"
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  script = subprocess.run(
    [sys.executable, "-c", API_SCRIPT, ct["path"], ct["labels_path"], str(tmp_path / "api.npy")],
    capture_output=True,
    text=True,
    env=env,
    cwd=tmp_path,
  )
  assert script.returncode == 0, script.stderr[-3000:]
  np.testing.assert_array_equal(np.load(tmp_path / "api.npy"), file_data(out))
  api_info = json.loads(script.stdout.strip().splitlines()[-1])
  sidecar = json.loads((tmp_path / "cli.json").read_text())  # what the command wrote beside its output
  assert api_info["noise_sigma_hu"] == pytest.approx(sidecar["noise_sigma_hu"], rel=1e-12)


def test_volume_io_from_array_is_load_for_an_array(ct):
  """from_array gives what load gives for the file of that array: RAS data, affine, and as_saved inverts it."""
  hu, affine = to_lps(ct["hu"], ct["affine"])
  vol = volume_io.from_array(hu, affine)
  ref = volume_io.load(ct["path"])
  np.testing.assert_array_equal(vol.data, ref.data)
  np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)
  back, back_affine = volume_io.as_saved(vol.data, vol, np.int16)
  np.testing.assert_array_equal(back, hu)
  np.testing.assert_allclose(back_affine, affine)
  # integer outputs are rounded and clipped, also for a volume without a source (was: truncated)
  values, _ = volume_io.as_saved(
    np.array([[[-1.6, 2.5, 40000.0]]]), volumes.Volume(np.zeros((1, 1, 3)), np.eye(4)), np.int16
  )
  np.testing.assert_array_equal(values, [[[-2, 2, 32767]]])


@pytest.mark.parametrize("task", ["denoise", "synthesis"])
def test_the_compiled_sampler_takes_the_params_as_arguments(monkeypatch, task):
  """Params a sampler closes over are constants of its program: XLA folds them at compile time (the paper model's
  first whole-CT call took 135 s on an H200: benchmarks/RESULTS.md "#27, on a lent H200") and the executable holds
  a second copy. So they are its arguments, which XLA's memory analysis counts: every param's bytes. Both ways a
  task hands its network to the sampler: the default (denoise) and its own apply function (guided synthesis)."""
  from meddiff_jax.tasks import common

  argument_bytes = []
  check_fits = common.check_fits

  def recording_check_fits(compiled, what, spec):
    argument_bytes.append(int(compiled.memory_analysis().argument_size_in_bytes))
    return check_fits(compiled, what, spec)

  monkeypatch.setattr(common, "check_fits", recording_check_fits)
  pipe = md.load("tiny_phantom")
  options = {"num_steps": 1, "region": "abdomen"}
  if task == "denoise":
    body = np.sum(np.square(np.mgrid[-1:1:16j, -1:1:16j, -1:1:16j]), 0) < 0.8  # soft tissue in air
    pipe.denoise(np.where(body, 40.0, -1000.0).astype(np.float32), affine=np.diag([6.0, 6.0, 6.0, 1.0]), **options)
  else:
    pipe.synthesize(shape=(16, 16, 16), guidance_scale=2.0, **options)
  params = pretrained.load("tiny_phantom").params
  assert argument_bytes and argument_bytes[-1] >= sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
