"""The demos' public sample CT: local test data when given, else one cached download (file:// here, offline)."""

import pytest

from meddiff_jax.data import samples, volume_io, volumes


def test_example_ct_comes_from_the_test_data_when_given(monkeypatch, real_data_dir):
  monkeypatch.setenv("MEDDIFF_TEST_DATA", str(real_data_dir))
  path = samples.example_ct()
  assert path == str(real_data_dir / "example_ct.nii.gz")
  volumes.check_ct(volume_io.load(path))


def test_example_ct_is_downloaded_once_into_the_cache(monkeypatch, tmp_path, real_data_dir):
  monkeypatch.delenv("MEDDIFF_TEST_DATA", raising=False)
  source = tmp_path / "server" / "example_ct.nii.gz"
  source.parent.mkdir()
  source.write_bytes((real_data_dir / "example_ct.nii.gz").read_bytes())
  cache = tmp_path / "cache"
  path = samples.example_ct(str(cache), source.as_uri())
  assert path == str(cache / "example_ct.nii.gz") and open(path, "rb").read() == source.read_bytes()
  source.unlink()  # a second call does not fetch again
  assert samples.example_ct(str(cache), source.as_uri()) == path
  assert not list(cache.glob("*.part"))


def test_missing_local_sample_is_one_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv("MEDDIFF_TEST_DATA", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="has no example_ct.nii.gz"):
    samples.example_ct()
