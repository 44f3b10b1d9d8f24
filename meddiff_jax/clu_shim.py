"""Make clu 0.0.12 usable without TensorFlow (the one place that knows about it; STACK_NOTES section 2).

clu's `metric_writers/__init__.py` imports `summary_writer`, which imports TensorFlow; so do
`periodic_actions` through it. Registering a tensorboardX-backed `summary_writer` module first lets the
rest of clu import unchanged and still write standard TensorBoard event files. Also patches
`clu.metrics.Std`, which calls `jnp.clip(a_min=...)`, removed from jax.

Import this module before anything from `clu.metric_writers` or `clu.periodic_actions`.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Mapping

import numpy as np

_MODULE = "clu.metric_writers.summary_writer"


def _summary_writer_class() -> type:
  import tensorboardX
  from clu.metric_writers import interface

  class SummaryWriter(interface.MetricWriter):
    """clu MetricWriter over tensorboardX.SummaryWriter."""

    def __init__(self, logdir: str):
      self._writer = tensorboardX.SummaryWriter(logdir)

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Any = None) -> None:
      for key, value in values.items():
        if np.ndim(value) == 0:
          self._writer.add_scalar(key, float(value), step)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
      for key, value in scalars.items():
        self._writer.add_scalar(key, float(np.asarray(value)), step)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
      for key, value in images.items():
        value = np.asarray(value)
        self._writer.add_images(key, value[None] if value.ndim == 3 else value, step, dataformats="NHWC")

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
      del step, videos  # not used by meddiff_jax

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
      del step, audios, sample_rate

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
      for key, value in texts.items():
        self._writer.add_text(key, value, step)

    def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets: Any = None) -> None:
      for key, value in arrays.items():
        self._writer.add_histogram(key, np.asarray(value), step)

    def write_pointcloud(self, step: int, point_clouds: Any, *, point_colors: Any = None, configs: Any = None) -> None:
      del step, point_clouds, point_colors, configs

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
      flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
      self._writer.add_hparams(flat, {})

    def flush(self) -> None:
      self._writer.flush()

    def close(self) -> None:
      self._writer.close()

  return SummaryWriter


def _install() -> None:
  try:
    import tensorflow  # noqa: F401  # the real clu writer works when TF is present
    return
  except ImportError:
    pass
  if _MODULE in sys.modules:
    return
  module = types.ModuleType(_MODULE)

  def __getattr__(name: str) -> Any:  # built lazily: interface is importable only after clu's __init__ runs
    if name == "SummaryWriter":
      cls = _summary_writer_class()
      module.SummaryWriter = cls
      return cls
    raise AttributeError(name)

  module.__getattr__ = __getattr__
  sys.modules[_MODULE] = module


def _patch_std() -> None:
  import jax.numpy as jnp
  from clu import metrics

  def compute(self):
    mean = self.total / self.count
    return jnp.clip(self.sum_of_squares / self.count - mean ** 2, min=0.0) ** 0.5

  metrics.Std.compute = compute


_install()
_patch_std()
