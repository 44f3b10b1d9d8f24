"""Configs by name and by path (meddiff_jax/config_files.py), from any working directory; the --config flag."""

import pathlib

import pytest
from absl import flags
from conftest import REPO, override, run_main

import meddiff_jax.configs
from meddiff_jax import config_files
from meddiff_jax.protocols import adapters

# every shipped config with each of its presets (None: called without one)
PRESETS = {
  "anomaly": [None],
  "controlnet": ["sr", "lesion"],
  "demo": [None],
  "denoise": [None],
  "evaluate": [None],
  "export": [None],
  "lesion": [None],
  "prepare": [None],
  "pretrain": [None, "tiny", "base", "paper", "paper256", "tiny+classes", "paper+classes"],
  "super_resolution": [None],
  "synthesis": [None],
  "tiny_ct": [None],
}


def _spec(target, preset):
  return target if preset is None else f"{target}:{preset}"


def test_the_package_configs_are_the_checkout_folder():
  assert pathlib.Path(meddiff_jax.configs.__file__).resolve().parent == (REPO / "configs").resolve()
  files = {p.stem for p in (REPO / "configs").glob("*.py") if "def get_config" in p.read_text()}
  assert config_files.names() == sorted(PRESETS) == sorted(files)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_shipped_config_loads_by_name_and_by_path_from_another_directory(name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  for preset in PRESETS[name]:
    by_name = config_files.load(_spec(name, preset))
    by_path = config_files.load(_spec(str(REPO / "configs" / f"{name}.py"), preset))
    assert by_name.to_dict() == by_path.to_dict(), (name, preset)
    if name == "pretrain" and preset:  # the preset reached get_config
      assert by_name.preset == preset.split("+")[0]
      assert by_name.data.structures == ("classes" if "+classes" in preset else "grouped")


def test_a_config_file_anywhere_builds_on_the_shipped_ones(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "mine.py").write_text(
    "from meddiff_jax.configs import pretrain\n\n\ndef get_config(arg=None):\n"
    "  c = pretrain.get_config(arg)\n  c.training.num_steps = 7\n  return c\n"
  )
  assert (
    config_files.load("mine.py:paper").to_dict()
    == override(config_files.load("pretrain:paper"), **{"training.num_steps": 7}).to_dict()
  )
  (tmp_path / "bad.py").write_text("def get_config():\n  x = {}\n  return x['model']\n")
  with pytest.raises(ValueError, match=r"^bad\.py:3: KeyError: 'model'$"):
    config_files.load("bad.py")


def test_unknown_names_and_helpers_are_one_line_errors_listing_the_shipped_configs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  listing = ", ".join(sorted(PRESETS))
  with pytest.raises(ValueError) as e:
    config_files.load("denoize")
  assert str(e.value) == f"'denoize' is neither a shipped config ({listing}) nor a file"
  with pytest.raises(ValueError, match="is a helper of the shipped configs; choose one of anomaly, controlnet"):
    config_files.load("task_options")
  with pytest.raises(ValueError, match="^unknown preset 'huge'"):
    config_files.load("pretrain:huge")


def test_the_config_flag_takes_names_paths_overrides_and_locks(tmp_path):
  for spec in ("pretrain:tiny", f"{REPO}/configs/pretrain.py:tiny"):
    argv = ["meddiff", f"--config={spec}", "--config.training.num_steps=3", "--config.model.dtype=bfloat16"]
    values = flags.FlagValues()
    holder = config_files.define_config_flag("config", "help", flag_values=values, sys_argv=argv)
    values(argv)
    expected = override(config_files.load("pretrain:tiny"), **{"training.num_steps": 3, "model.dtype": "bfloat16"})
    assert holder.value.to_dict() == expected.to_dict()
    with pytest.raises(AttributeError):
      holder.value.training.num_stepz = 3  # locked: a misspelt key is an error, not a new key
  values = flags.FlagValues()
  config_files.define_config_flag("config", "help", flag_values=values, sys_argv=["meddiff", "--config=nope"])
  with pytest.raises(flags.IllegalFlagValueError, match="'nope' is neither a shipped config"):
    values(["meddiff", "--config=nope"])


def test_the_evaluate_command_loads_task_defaults_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  cfg = adapters.task_config("denoising", config_files.load("evaluate"), input="a.nii.gz", output="b.nii.gz")
  # + what the protocol sets: its region (not estimated per case) and overwriting its own outputs on a re-run
  expected = override(config_files.load("denoise"), input="a.nii.gz", output="b.nii.gz", region="abdomen")
  assert cfg.to_dict() == override(expected, overwrite=True).to_dict()


def test_the_command_line_from_another_directory(tmp_path):
  proc = run_main("--config=denoize", cwd=tmp_path)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
    f"error: flag --config=denoize: 'denoize' is neither a shipped config ({', '.join(sorted(PRESETS))}) nor a file"
  ]
  missing = tmp_path / "missing.nii.gz"
  proc = run_main("--config=denoise", f"--config.input={missing}", "--config.output=o.nii.gz", cwd=tmp_path)
  assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
    f"error: --config.input='{missing}' is not a file or DICOM series folder (does not exist)"
  ]
