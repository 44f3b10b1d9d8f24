"""docs/configs.md is generated from configs/ and must match them."""

import importlib.util

from conftest import REPO


def test_config_reference_is_up_to_date():
  spec = importlib.util.spec_from_file_location("make_ref", REPO / "docs" / "make_config_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert (REPO / "docs" / "configs.md").read_text() == module.render(), "run python docs/make_config_reference.py"
