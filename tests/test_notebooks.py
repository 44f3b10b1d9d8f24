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
  assert 'REPO = "https://github.com/' in nb.cells[1].source  # the one place a Colab user sets
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
