"""meddiff_jax: MedDiff-FM, a 3D CT diffusion foundation model, in JAX.

The Python API (meddiff_jax/api.py) is re-exported here and imported on first use, so `import meddiff_jax` stays
cheap (no JAX until a name of the API is used):

  import meddiff_jax as md
  result = md.load("tiny_ct").denoise("ct.nii.gz")
"""

__all__ = [
  "load",
  "Pipeline",
  "Result",
  "denoise",
  "detect_anomalies",
  "synthesize",
  "super_resolve",
  "prepare",
  "pretrain",
  "finetune",
  "example_ct",
  "hu_window",
  "ConfigError",
  "VolumeError",
]


def __getattr__(name: str):
  if name in __all__:
    from meddiff_jax import api

    return getattr(api, name)
  raise AttributeError(f"module 'meddiff_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__})
