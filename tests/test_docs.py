"""docs/configs.md is generated from configs/ and must match them."""

import importlib.util

from conftest import REPO


def test_config_reference_is_up_to_date():
  spec = importlib.util.spec_from_file_location("make_ref", REPO / "docs" / "make_config_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert (REPO / "docs" / "configs.md").read_text() == module.render(), "run python docs/make_config_reference.py"


def test_every_documented_config_key_exists():
  """Each `--config.KEY` the README, docs/, launch/ and notebooks/ show is a key of a shipped config (a key that
  was renamed or removed would give the user an error on a command copied from the docs)."""
  import re

  from meddiff_jax import config_files

  keys = set()

  def walk(tree, prefix=""):
    for name, value in tree.items():
      keys.add(prefix + name)
      if hasattr(value, "items"):
        walk(value, f"{prefix}{name}.")

  for name in config_files.names():
    walk(config_files.load(name))
  texts = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "launch").glob("*.py")]
  texts += [*(REPO / "notebooks").glob("*.py")]
  unknown = {
    (path.name, m.group(1).rstrip("."))
    for path in texts
    for m in re.finditer(r"--config\.([A-Za-z0-9_.]+)", path.read_text())
    if m.group(1).rstrip(".") not in keys and m.group(1) not in ("KEY", "key")
  }
  assert not unknown, sorted(unknown)
