"""zoom2 samples from a zarr store, three ways in one process (#24): as before (each window read into fresh memory,
the label gather as TensorStore's oindex), with the window read into the thread's reused array (multilevel.Scratch),
and with the label gather as strided boxes too (store.ChunkedVolume strided_gathers: the pipeline's way).

python benchmarks/zoom2_zarr.py --store_dir=STORE [--samples=24] [--rounds=7]

STORE: a prepared zarr store of volumes of at least 2P = 256 voxels a side (pipeline_margin.py's phantoms; the
volumes whose id starts with 'real' are left out: their windows are padded, read another way). Every variant is
checked to make the same sample; then per round `samples` zoom2 samples each, variants interleaved, process CPU per
sample; the first round is dropped from the median.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--store_dir", required=True)
  parser.add_argument("--samples", type=int, default=24)
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  import pipeline_margin

  from meddiff_jax.data import pipeline, store

  class WholeGathers(store.PreparedStore):  # TensorStore's oindex, as before
    def _array(self, name):
      array = super()._array(name)
      if isinstance(array, store.ChunkedVolume):
        array.strided_gathers = False
      return array

  spec = pipeline_margin.paper_sample_spec(True, "device")
  plain, strided = WholeGathers(args.store_dir), store.PreparedStore(args.store_dir)
  volumes = [i for i, r in enumerate(plain.records) if not r["id"].startswith("real")]
  before = pipeline.MultiLevelSample(plain, spec)
  before._scratch = None  # a fresh array per window
  variants = {
    "before": before,
    "reused window": pipeline.MultiLevelSample(plain, spec),
    "reused window + strided label boxes": pipeline.MultiLevelSample(strided, spec),
  }
  want = before(volumes[0], np.random.default_rng(5), operation="zoom2")
  for sample in variants.values():
    got = sample(volumes[0], np.random.default_rng(5), operation="zoom2")
    assert all(np.array_equal(got[k], want[k]) for k in want)
  ms = {name: [] for name in variants}
  for r in range(args.rounds):
    for name, sample in variants.items():
      rng = np.random.default_rng(r)
      c0 = time.process_time()
      for k in range(args.samples):
        sample(volumes[k % len(volumes)], rng, operation="zoom2")
      ms[name].append((time.process_time() - c0) / args.samples * 1e3)
  for name, v in ms.items():
    print(f"| {name} | {np.median(v[1:]):.1f} ms ({' '.join(f'{x:.1f}' for x in v[1:])}) |")


if __name__ == "__main__":
  main()
