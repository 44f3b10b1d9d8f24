"""`--config=configs/evaluate.py`: read the cases, run the protocol, write WORKDIR/results.json, print the table."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from meddiff_jax.benchmarking import datasets, protocols


def _jsonable(x: Any) -> Any:
  """NaN/inf -> null (strict JSON), numpy scalars -> Python."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if hasattr(x, "item") and not isinstance(x, (str, bytes)):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


CONTROLNET_PROTOCOLS = ("super_resolution", "lesion", "inpainting")


def validate(config: Any) -> None:
  """Config mistakes found before any case is read (one-line errors)."""
  if config.protocol not in protocols.PROTOCOLS:
    raise ValueError(f"--config.protocol={config.protocol!r}; choose from {sorted(protocols.PROTOCOLS)}")
  if config.protocol in CONTROLNET_PROTOCOLS and not config.skip_model and not os.path.isdir(
      os.path.join(config.controlnet or "", "checkpoints")):
    raise FileNotFoundError(f"--config.controlnet={config.controlnet!r} is not a ControlNet fine-tuning workdir "
                            f"(configs/controlnet.py); the {config.protocol} protocol needs one (or skip_model=True "
                            "for the reference rows only)")


def run(config: Any, workdir: str) -> dict[str, Any]:
  validate(config)
  cases = datasets.read_cases(config)
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  result = protocols.PROTOCOLS[config.protocol](config, cases, workdir)
  out = {"protocol": config.protocol, "dataset": config.dataset or None, "pairs": config.pairs or None,
         "rows": result.rows, "aggregate": result.aggregate, "cases": result.cases, "table": result.table,
         "seconds": time.time() - start, "config": json.loads(config.to_json_best_effort())}
  path = os.path.join(workdir, "results.json")
  with open(path, "w") as f:
    json.dump(_jsonable(out), f, indent=1)
  print(result.table)
  print(f"results: {path}")
  return out
