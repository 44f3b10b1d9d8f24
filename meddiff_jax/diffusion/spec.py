"""config.diffusion, typed: the forward process, the training target and loss, condition dropout.

Consumed by schedules.make_schedule, losses.diffusion_loss and train/step.py; part of the training configs
(train/spec.py) and of a pretrained model (pretrained.Pretrained), built once from a config section.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from meddiff_jax import sections
from meddiff_jax.diffusion import losses, schedules


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
  schedule: str
  num_timesteps: int
  prediction_type: str
  loss_type: str
  min_snr_gamma: float  # 0 disables
  cond_drop_prob: float
  structure_drop_prob: float
  body_drop_prob: float

  def __post_init__(self):
    key = "config.diffusion."
    sections.choice(key + "schedule", self.schedule, schedules.SCHEDULES)
    sections.count(key + "num_timesteps", self.num_timesteps, 2)
    sections.choice(key + "prediction_type", self.prediction_type, schedules.PREDICTION_TYPES)
    sections.choice(key + "loss_type", self.loss_type, losses.LOSS_TYPES)
    sections.at_least(key + "min_snr_gamma", self.min_snr_gamma, 0.0)
    for name in ("cond_drop_prob", "structure_drop_prob", "body_drop_prob"):
      sections.fraction(key + name, getattr(self, name))

  @classmethod
  def from_config(cls, section: Any) -> DiffusionSpec:
    return sections.from_config(cls, section, "config.diffusion")

  def make_schedule(self) -> schedules.Schedule:
    return schedules.make_schedule(self.schedule, self.num_timesteps)
