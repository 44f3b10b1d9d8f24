"""The package outside its checkout: a wheel built from this tree, installed (non-editable) into a fresh
virtual environment and run from a temporary directory, as after `pip install meddiff_jax`; and an editable
install of the same tree.

The fresh environments reuse this one's dependencies through a .pth file instead of downloading them again: the
path it adds comes after the environment's own site-packages (its meddiff_jax is the one imported, which the
tests check), and .pth files inside an added path are not processed (this environment's editable install of the
checkout stays out).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np
import pytest
from conftest import REPO, data_dir

pytestmark = pytest.mark.slow

SHIPPED = [
  "anomaly",
  "controlnet",
  "demo",
  "denoise",
  "evaluate",
  "export",
  "lesion",
  "prepare",
  "pretrain",
  "super_resolution",
  "synthesis",
  "tiny_ct",
]


def _run(cmd, cwd, timeout=600, **kw):
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "XLA_FLAGS")}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def _source_copy(dest: pathlib.Path) -> pathlib.Path:
  """What a build reads (meddiff_jax/configs stays a link), without this checkout's caches and build outputs."""
  ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
  for name in ("meddiff_jax", "configs"):
    shutil.copytree(REPO / name, dest / name, symlinks=True, ignore=ignore)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, dest / name)
  return dest


def _venv(path: pathlib.Path) -> pathlib.Path:
  """A new environment without pip that sees this one's packages after its own; its python."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
  python = path / "bin" / "python"
  site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path)
  ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  (pathlib.Path(site.stdout.strip()) / "meddiff_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
  return python


def _pip(python: pathlib.Path, *args, cwd):
  proc = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", *args], cwd=cwd)
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  tmp = tmp_path_factory.mktemp("build")
  src = _source_copy(tmp / "src")
  proc = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(src)], cwd=tmp)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (whl,) = (tmp / "dist").glob("meddiff_jax-*.whl")
  return whl


def test_the_wheel_carries_configs_and_the_console_command(wheel):
  with zipfile.ZipFile(wheel) as z:
    for path in sorted((REPO / "configs").iterdir()):
      if path.suffix in (".py", ".csv"):
        assert z.read(f"meddiff_jax/configs/{path.name}") == path.read_bytes(), path.name
    (entry_points,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "meddiff = meddiff_jax.main:run" in z.read(entry_points).decode()
    assert not [n for n in z.namelist() if n.startswith("configs/")]  # no top-level `configs` module


CHECKS = """
import json, pathlib, sys
import meddiff_jax
from meddiff_jax import config_files
from meddiff_jax.protocols import adapters
out = dict(package=meddiff_jax.__file__, names=config_files.names())
out["user_file"] = config_files.load("my_pretrain.py:paper").training.num_steps
try:
  config_files.load("old_style.py")
except ValueError as e:
  out["old_style"] = str(e)
evaluate = config_files.load("evaluate")
out["evaluate_task"] = adapters.task_config("denoising", evaluate, input="a.nii.gz", output="b.nii.gz").mode
print(json.dumps(out))
"""


def test_the_installed_wheel_runs_the_demo_and_a_task_from_a_temporary_directory(wheel, tmp_path):
  python = _venv(tmp_path / "venv")
  _pip(python, str(wheel), cwd=tmp_path)
  meddiff = str(tmp_path / "venv" / "bin" / "meddiff")
  run = tmp_path / "run"  # the user's folder: no checkout, no configs/ beside it
  run.mkdir()
  (run / "my_pretrain.py").write_text(
    "from meddiff_jax.configs import pretrain\n\n\ndef get_config(arg):\n"
    "  c = pretrain.get_config(arg)\n  c.training.num_steps = 7\n  return c\n"
  )
  (run / "old_style.py").write_text("from configs import pretrain\n\nget_config = pretrain.get_config\n")

  proc = _run([str(python), "-c", CHECKS], cwd=run)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout)
  assert out["package"].startswith(str(tmp_path / "venv"))
  assert out["names"] == SHIPPED and out["user_file"] == 7 and out["evaluate_task"] == "denoise"
  assert out["old_style"] == "old_style.py:1: ModuleNotFoundError: No module named 'configs'"
  proc = _run([str(python), "-m", "pip", "check"], cwd=run)  # the declared dependencies are all there
  assert proc.returncode == 0, proc.stdout + proc.stderr

  proc = _run([meddiff, "--config=pretrain:tny"], cwd=run)
  assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
    "error: flag --config=pretrain:tny: unknown preset 'tny'; choose tiny, base, paper or paper256"
  ]
  proc = _run([meddiff, "--config=demo", "--workdir=demo", *DEMO_STEPS], cwd=run)
  assert proc.returncode == 0, proc.stderr[-3000:]
  steps = [json.loads(line)["step"] for line in (run / "demo" / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2] and (run / "demo" / "checkpoints" / "2").is_dir()

  ct = data_dir() / "example_ct_sm.nii.gz"
  denoise = ["--config=denoise", f"--config.input={ct}", "--config.output=den.nii.gz", *DENOISE_STEPS]
  proc = _run([str(python), "-m", "meddiff_jax.main", *denoise], cwd=run)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import nibabel as nib

  src, res = nib.load(ct), nib.load(run / "den.nii.gz")
  assert res.shape == src.shape and np.allclose(res.affine, src.affine, atol=1e-4)


DEMO_STEPS = [  # the demo shortened to two steps of a smaller problem, no validation or samples
  "--config.training.num_steps=2",
  "--config.training.log_every=1",
  "--config.data.patch_size=8",
  "--config.data.phantom.shape=(24,24,24)",
  "--config.data.phantom.num_volumes=3",
  "--config.eval.every_steps=0",
  "--config.eval.sample_every_steps=0",
]
DENOISE_STEPS = ["--config.num_steps=1", "--config.overlap=0.0"]


def test_an_editable_install_reads_the_checkout_configs(tmp_path):
  src = _source_copy(tmp_path / "src")
  python = _venv(tmp_path / "venv")
  _pip(python, "-e", str(src), cwd=tmp_path)
  code = (
    "import pathlib, meddiff_jax.configs as c\nfrom meddiff_jax import config_files\n"
    "print(pathlib.Path(c.__file__).resolve().parent, config_files.load('pretrain:paper+classes').data.structures)"
  )
  proc = _run([str(python), "-c", code], cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == [str((src / "configs").resolve()), "classes"]
