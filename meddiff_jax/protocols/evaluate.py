"""`--config=configs/evaluate.py`: read the cases, run the protocol, write WORKDIR/results.json, print the table."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from meddiff_jax.protocols import datasets, paper


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


def run(config: Any, workdir: str) -> dict[str, Any]:
  """`config` was checked by checks.evaluate (main.py)."""
  cases = datasets.read_cases(config)
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  result = paper.PROTOCOLS[config.protocol](config, cases, workdir)
  out = {
    "protocol": config.protocol,
    "dataset": config.dataset or None,
    "pairs": config.pairs or None,
    "rows": result.rows,
    "aggregate": result.aggregate,
    "cases": result.cases,
    "table": result.table,
    "seconds": time.time() - start,
    "config": json.loads(config.to_json_best_effort()),
  }
  path = os.path.join(workdir, "results.json")
  with open(path, "w") as f:
    json.dump(_jsonable(out), f, indent=1)
  print(result.table)
  print(f"results: {path}")
  return out
