"""configs/evaluate.py, typed: `EvaluateSpec` (what datasets.py, adapters.py, protocols.py and run.py read).

Whether the protocol exists, the ControlNet workdir is one and the task config each case runs with passes its
own spec: checks.evaluate. The cases themselves are read and checked by datasets.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from meddiff_jax import sections

TASK_DEFAULT = "task"  # a shared task option left at the task config's own default (configs/<task>.py)
REGION_WINDOW = "region"  # metric_window: the region's training window
THIN_SPACING = "thin"  # sr_spacing: the thin scan's own spacing
ALL = "all"  # max_cases: every case; dice_labels: every label of the conditioning map


def _window(key: str, value: Any) -> None:
  ok = isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
  if not ok or isinstance(value[0], bool) or not value[0] < value[1]:
    raise sections.ConfigError(f"{key}={value!r}; must be (lo, hi) HU with lo < hi")


@dataclasses.dataclass(frozen=True)
class EvaluateSpec:
  """configs/evaluate.py, typed: the protocol, its cases, the model and the task options shared with the task
  commands ('task': the task config's own default), the metrics' options."""

  mode: str
  protocol: str
  # cases: a CSV of paths or a published dataset
  pairs: str
  dataset: str
  data_root: str
  split: str
  test_fraction: float
  split_seed: int
  max_cases: int | str  # or 'all'
  mayo_thickness: str
  ln_subset: str
  png_depth: int
  png_spacing: float
  # the model and the task options shared with the task commands
  checkpoint: str
  controlnet: str
  region: str
  method: str
  sampler: str
  num_steps: int | str
  overlap: float | str
  window_batch: int | str
  inference_dtype: str
  seed: int | str
  task: str  # any other task key, 'KEY=VALUE;...'
  skip_model: bool
  # metrics
  metric_window: tuple[float, float] | str  # or 'region'
  gaussian_sigma: float
  nlm_h_factor: float
  top_fraction: float
  smooth_sigma: float
  slice_axis: int
  pixel_subsample: int
  extractor: str
  segmenter: str
  dice_labels: tuple[int, ...] | str  # or 'all'
  dice_threshold_hu: float
  sr_spacing: tuple[float, float, float] | str  # or 'thin'

  def __post_init__(self):
    sections.choice("config.mode", self.mode, ("evaluate",))
    for name in (
      "protocol", "pairs", "dataset", "data_root", "split", "mayo_thickness", "ln_subset", "checkpoint",
      "controlnet", "region", "method", "sampler", "inference_dtype", "task", "extractor", "segmenter",
    ):  # fmt: skip
      sections.text(f"config.{name}", getattr(self, name))
    sections.fraction("config.test_fraction", self.test_fraction, upper_open=True)
    sections.count("config.split_seed", self.split_seed, 0)
    sections.keyword_or("config.max_cases", self.max_cases, (ALL,), sections.count)
    sections.count("config.png_depth", self.png_depth)
    sections.positive("config.png_spacing", self.png_spacing)
    # checked again, with every other task key, by the task's own spec (checks.evaluate)
    sections.keyword_or("config.num_steps", self.num_steps, (TASK_DEFAULT,), sections.count)
    sections.keyword_or("config.overlap", self.overlap, (TASK_DEFAULT,), sections.fraction, upper_open=True)
    sections.keyword_or("config.window_batch", self.window_batch, (TASK_DEFAULT,), sections.count)
    sections.keyword_or("config.seed", self.seed, (TASK_DEFAULT,), sections.count, 0)
    sections.flag("config.skip_model", self.skip_model)
    sections.keyword_or("config.metric_window", self.metric_window, (REGION_WINDOW,), _window)
    sections.positive("config.gaussian_sigma", self.gaussian_sigma)
    sections.positive("config.nlm_h_factor", self.nlm_h_factor)
    sections.positive("config.top_fraction", self.top_fraction)
    sections.fraction("config.top_fraction", self.top_fraction)
    sections.at_least("config.smooth_sigma", self.smooth_sigma, 0.0)
    sections.choice("config.slice_axis", self.slice_axis, (0, 1, 2))
    sections.count("config.pixel_subsample", self.pixel_subsample)
    sections.keyword_or("config.dice_labels", self.dice_labels, (ALL,), sections.sizes, length=None, integer=True)
    sections.at_least("config.dice_threshold_hu", self.dice_threshold_hu, 0.0)
    sections.keyword_or("config.sr_spacing", self.sr_spacing, (THIN_SPACING,), sections.sizes)

  @classmethod
  def from_config(cls, config: Any) -> EvaluateSpec:
    return sections.from_config(cls, config, "config")
