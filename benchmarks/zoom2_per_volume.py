"""CPU per zoom2 sample, per volume of a prepared store, for the code of a given tree (#24): run it once per tree
(e.g. a worktree of the commit before a change, then this checkout), alternating, to compare them.

python benchmarks/zoom2_per_volume.py --store_dir=STORE [--tree=.] [--operation=zoom2] [--rounds=9] [--samples=4]

STORE: a prepared store (pipeline_margin.py's phantoms and the real CT: its windows reach outside the volume, so
it shows the padded-window path). Per round `samples` samples of each volume (the paper preset's samples, decoded
on the device as the presets ship them); printed: the median over rounds 2.. per volume, and their mean.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--store_dir", required=True)
  parser.add_argument("--tree", default=str(pathlib.Path(__file__).resolve().parents[1]))
  parser.add_argument("--operation", default="zoom2")
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--samples", type=int, default=4)
  args = parser.parse_args()
  tree = pathlib.Path(args.tree).resolve()
  sys.path[:0] = [str(tree), str(tree / "benchmarks")]  # that tree's package and its pipeline_margin
  import pipeline_margin

  from meddiff_jax.data import pipeline, store

  prepared = store.PreparedStore(args.store_dir)
  sample = pipeline.MultiLevelSample(prepared, pipeline_margin.paper_sample_spec(True, "device"))
  ms = {v: [] for v in range(len(prepared.records))}
  for r in range(args.rounds):
    rng = np.random.default_rng(r)
    for v in ms:
      c0 = time.process_time()
      for _ in range(args.samples):
        sample(v, rng, operation=args.operation)
      ms[v].append((time.process_time() - c0) / args.samples * 1e3)
  medians = {prepared.records[v]["id"]: float(np.median(t[1:])) for v, t in ms.items()}
  print(f"{tree} {args.operation}: " + " ".join(f"{k}={m:.1f}" for k, m in medians.items()))
  print(f"mean over volumes: {np.mean(list(medians.values())):.1f} ms CPU per sample")


if __name__ == "__main__":
  main()
