"""Test setup: 8 fake CPU devices for every sharding test, plus shared tiny configs."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
  """The tiny preset shrunk further: 8^3 patches of 24^3 phantoms (XLA:CPU 3D convs are slow)."""
  from configs import pretrain

  c = pretrain.get_config("tiny")
  c.data.patch_size = 8
  c.data.phantom.update(num_volumes=3, shape=(24, 24, 24), spacing=(12.0, 12.0, 12.0))
  c.model.update(base_channels=8, channel_mult=(1, 2), attention_levels=(1,))
  c.training.update(batch_size=8, num_steps=3, log_every=1)
  return override(c, **overrides)


def override(config, **dotted):
  """Set nested config keys given as 'a.b.c': value (what --config.a.b.c=value does)."""
  for key, value in dotted.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def data_dir() -> pathlib.Path | None:
  """../shared/data (or $MEDDIFF_TEST_DATA); skip, or fail under MEDDIFF_REQUIRE_DATA=1, when absent."""
  path = pathlib.Path(os.environ.get("MEDDIFF_TEST_DATA", REPO.parent / "shared" / "data"))
  if (path / "example_ct.nii.gz").exists():
    return path
  if os.environ.get("MEDDIFF_REQUIRE_DATA") == "1":
    pytest.fail(f"MEDDIFF_REQUIRE_DATA=1 but no example_ct.nii.gz under {path}")
  pytest.skip(f"real CT data not found under {path}")


@pytest.fixture
def real_data_dir():
  return data_dir()
