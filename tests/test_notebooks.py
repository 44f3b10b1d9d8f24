"""Every notebook runs headless on CPU (few steps), as the Colab demos would offline: the install cell is
skipped (meddiff_jax is importable), and the public sample CT comes from ../shared/data instead of its URL."""

import os

import pytest
from conftest import REPO, data_dir

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, tmp_path):
  monkeypatch.setenv("NB_STEPS", "3")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend: figures come back as PNG outputs
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if "example_ct()" in path.read_text():  # the real-CT demos: offline, from the test data
    monkeypatch.setenv("MEDDIFF_TEST_DATA", str(data_dir()))
  nb = nbformat.read(path, as_version=4)
  assert 'REPO = "' in nb.cells[1].source and "MEDDIFF_REPO" in nb.cells[1].source  # where a Colab user sets it
  assert 'environ.setdefault("JAX_PLATFORMS"' not in nb.cells[1].source  # the runtime's GPU / TPU when present
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
  client.execute()
  nbformat.write(nb, tmp_path / path.name)  # the executed notebook, for a look after a failure
  errors = [
    o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"
  ]
  assert not errors, errors
  text = "".join(o.get("text", "") for o in nb.cells[1].get("outputs", []))
  assert " on CPU: " in text, text  # the setup cell says which device is in use (CPU here: JAX_PLATFORMS=cpu)
  pictures = [
    o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})
  ]
  assert len(pictures) >= (3 if "example_ct()" in path.read_text() else 2)


def test_notebooks_match_their_generator():
  """notebooks/make_notebooks.py is the one source of the three notebooks (they share the install cell)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("make_notebooks", REPO / "notebooks" / "make_notebooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert sorted(module.NOTEBOOKS) == [p.stem for p in NOTEBOOKS]
  for path in NOTEBOOKS:
    committed = [(c.cell_type, c.source) for c in nbformat.read(path, as_version=4).cells]
    assert committed == [(c.cell_type, c.source) for c in module.NOTEBOOKS[path.stem].cells], (
      f"{path.name}: run python notebooks/make_notebooks.py"
    )


def test_the_setup_cell_picks_the_jax_build_as_jax_finds_accelerators_and_asks_for_the_repository(
  monkeypatch, tmp_path
):
  """Without meddiff_jax installed and without REPO, the setup cell stops with one clear sentence naming REPO and
  MEDDIFF_REPO, before cloning anything; its accelerator test is JAX's (PCI TPU ids, NVIDIA device files): on this
  CPU machine, the CPU build."""
  import importlib.util
  import pathlib

  spec = importlib.util.spec_from_file_location("make_notebooks", REPO / "notebooks" / "make_notebooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.REPOSITORY == "" or module.REPOSITORY.startswith("https://")
  jax_tpu_ids = importlib.import_module("jax._src.hardware_utils")._TPU_PCI_DEVICE_IDS
  namespace = {}
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv("MEDDIFF_REPO", raising=False)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # as on a fresh Colab runtime
  source = module.SETUP.replace(f'REPO = "{module.REPOSITORY}"', 'REPO = ""')
  with pytest.raises(SystemExit, match=r"REPO is not set: .*MEDDIFF_REPO"):
    exec(source, namespace)
  assert set(namespace["TPU_PCI_DEVICES"]) == set(jax_tpu_ids)  # the same chips JAX recognises
  assert namespace["accelerator"]() == "cpu" and namespace["JAX_BUILD"] == "jax"
  assert not (pathlib.Path(tmp_path) / "meddiff_jax_src").exists()
