"""CLU metric collections (no `from __future__ import annotations`: clu reads the annotations).

`clu.metrics` (TensorFlow-free) earns its place here: the collection merges on device, so the loop
never blocks on a step's metrics until it logs.
"""

import flax.struct
import jax.numpy as jnp
from clu import metrics


@flax.struct.dataclass
class Std(metrics.Std):
  """clu's Std with its variance clip written for current jax (clu 0.0.12 calls jnp.clip(a_min=...),
  which jax removed)."""

  def compute(self):
    mean = self.total / self.count
    return jnp.clip(self.sum_of_squares / self.count - mean**2, min=0.0) ** 0.5


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  loss_std: Std.from_output("loss")
  grad_norm: metrics.Average.from_output("grad_norm")
  param_norm: metrics.LastValue.from_output("param_norm")
  learning_rate: metrics.LastValue.from_output("learning_rate")
  nan_skips: metrics.LastValue.from_output("nan_skips")
