"""CLU metric collections (no `from __future__ import annotations`: clu reads the annotations)."""

import flax.struct

from meddiff_jax import clu_shim  # noqa: F401  # patches clu.metrics.Std
from clu import metrics


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  loss_std: metrics.Std.from_output("loss")
  grad_norm: metrics.Average.from_output("grad_norm")
  param_norm: metrics.LastValue.from_output("param_norm")
  learning_rate: metrics.LastValue.from_output("learning_rate")
  nan_skips: metrics.LastValue.from_output("nan_skips")
