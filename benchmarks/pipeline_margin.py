"""Does the input pipeline keep >= 5x ahead of the paper preset's train step? (#12)

python benchmarks/pipeline_margin.py [--store_dir=DIR] [--patches=6] [--gpus_per_host=8] [--device_kind=H100]
    [--whole_sizes=128] [--pack_structures=1] [--codec=blosc_lz4hc] [--formats=zarr,npy]
    [--out=benchmarks/results/pipeline_margin.json]

Supply: the paper preset's samples (configs/pretrain.py:paper data section: 128^3 windows, multi-level
whole / zoom2 / patch at 1/3 each, grouped structure channels) drawn from a prepared store on local
disk, zarr and .npy, each operation timed on its own and mixed by the preset's probabilities. The figure
that transfers to another host is CPU seconds per sample (process CPU time, one thread, page cache warm),
not this shared 2-core box's wall clock: a host with C free cores delivers about C / (CPU s per sample).
Demand: the paper preset's model FLOPs per step (effective batch 4) at 40% MFU on `gpus_per_host` GPUs
of `device_kind` (train/throughput.projected_step_s, the dry run's projection).

Volumes: --store_dir (a prepared zarr store, left as it is: read from copies) or, by default, input_pipeline.py's
4 phantoms at 256^3 + the real CT, prepared into a temporary directory. --whole_sizes=128: the copies get their
whole levels (store.add_whole_levels), so whole-volume samples read those. --pack_structures=0: ship the 13 grouped
channels as before instead of one packed channel. --codec=NAME (store.CODECS): the zarr copy's arrays are
rewritten with that codec (and its whole levels written with it) before timing; default: the store's own codecs
kept, whole levels in store.DEFAULT_CODEC. Bytes read per sample: zarr, what the process read
(/proc/self/io rchar); npy (memory-mapped, invisible to rchar), the bytes of the arrays the sample slices.
Writes --out (default benchmarks/results/pipeline_margin.json).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

OPERATIONS = ("whole", "zoom2", "patch")  # the order of data.operation_probs


def demand(gpus: int, device_kind: str, mfu: float) -> dict[str, float]:
  from meddiff_jax import pretrained
  from meddiff_jax.configs import pretrain
  from meddiff_jax.train import throughput

  config = pretrain.get_config("paper")
  spec = pretrained.build_model(config)[1]
  flops = throughput.flops_for_config(config, spec)
  step_s = throughput.projected_step_s(flops, gpus, device_kind, mfu)
  batch = int(config.training.batch_size)
  return {
    "flops_per_step": flops,
    "step_s": step_s,
    "samples_per_step": batch,
    "samples_per_s_per_host": batch / step_s,
    "samples_per_s_per_gpu": batch / step_s / gpus,
  }


def _rchar() -> int:
  with open("/proc/self/io") as f:
    return int(next(l for l in f if l.startswith("rchar")).split()[1])


class _SlicedBytes:
  """Counts the bytes of the arrays a sample slices out of (memory-mapped .npy reads do not show in rchar)."""

  def __init__(self, base):
    self.base, self.bytes = base, 0

  def __len__(self):
    return len(self.base)

  def _wrap(self, a):
    if a is None:
      return None
    outer = self

    class Sliced:
      shape, dtype, ndim = a.shape, a.dtype, a.ndim

      def __getitem__(self, index):
        out = a[index]
        outer.bytes += out.nbytes
        return out

    return Sliced()

  def load(self, index):
    hu, labels, region = self.base.load(index)
    return self._wrap(hu), self._wrap(labels), region

  def load_whole(self, index, size):
    level = self.base.load_whole(index, size)
    if level is not None:
      self.bytes += level[0].nbytes + (0 if level[1] is None else level[1].nbytes)
    return level


def cpu_seconds_per_sample(store_dir: pathlib.Path, n: int, pack: bool) -> dict[str, float]:
  """Per operation: (process CPU s, wall s, bytes read) per paper-preset sample, one thread, after a warm-up."""
  from meddiff_jax.configs import pretrain
  from meddiff_jax.data import pipeline, store

  data = pretrain.get_config("paper").data
  lut, groups = pipeline.structure_lut(data)
  ps = _SlicedBytes(store.PreparedStore(str(store_dir)))
  out = {}
  for op, name in enumerate(OPERATIONS):
    probs = tuple(float(i == op) for i in range(3))
    sample = pipeline.MultiLevelSample(ps, int(data.patch_size), lut, groups, probs, pack_structures=pack)
    rng = np.random.default_rng(op)
    for i in range(len(ps)):  # warm-up: page cache, TensorStore handles, first touches
      sample(i, rng)
    c0, w0, r0, b0 = time.process_time(), time.perf_counter(), _rchar(), ps.bytes
    for i in range(n):
      sample(i % len(ps), rng)
    out[f"{name}_cpu_s"] = (time.process_time() - c0) / n
    out[f"{name}_wall_s"] = (time.perf_counter() - w0) / n
    out[f"{name}_rchar_mb"] = (_rchar() - r0) / n / 1e6
    out[f"{name}_sliced_mb"] = (ps.bytes - b0) / n / 1e6
  probs = tuple(float(p) for p in data.operation_probs)
  out["mixed_cpu_s"] = sum(p * out[f"{k}_cpu_s"] for p, k in zip(probs, OPERATIONS))
  out["mixed_wall_s"] = sum(p * out[f"{k}_wall_s"] for p, k in zip(probs, OPERATIONS))
  return out


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--store_dir", default="", help="a prepared zarr store (default: build the benchmark volumes)")
  p.add_argument("--patches", type=int, default=6, help="timed samples per operation and format")
  p.add_argument("--gpus_per_host", type=int, default=8)
  p.add_argument("--device_kind", default="H100")
  p.add_argument("--mfu", type=float, default=0.4)
  p.add_argument("--whole_sizes", default="", help="e.g. 128: give the store copies whole levels at these sizes")
  p.add_argument("--pack_structures", type=int, default=1, help="1: one packed structure channel (the default)")
  p.add_argument("--formats", default="zarr,npy", help="which copies to time")
  p.add_argument("--codec", default="", help="re-encode the zarr copy with this store.CODECS codec")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline_margin.json"))
  args = p.parse_args()
  import input_pipeline

  from meddiff_jax.data import store

  whole_sizes = tuple(int(s) for s in args.whole_sizes.split(",") if s)

  need = demand(args.gpus_per_host, args.device_kind, args.mfu)
  print(
    f"demand: paper preset {need['flops_per_step'] / 1e12:.1f} TFLOP/step, {need['step_s'] * 1e3:.1f} ms/step on "
    f"{args.gpus_per_host} x {args.device_kind} at {args.mfu:.0%} MFU -> {need['samples_per_s_per_host']:.0f} "
    f"samples/s per host ({need['samples_per_s_per_gpu']:.1f} per GPU)",
    flush=True,
  )
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    if args.store_dir:
      store_dir = pathlib.Path(shutil.copytree(args.store_dir, tmp / "store_zarr"))
    else:
      t0 = time.perf_counter()
      store_dir = input_pipeline.make_inputs(tmp)[1]
      print(f"prepared inputs in {time.perf_counter() - t0:.0f} s", flush=True)
    formats = args.formats.split(",")
    npy_dir = input_pipeline.npy_copy(store_dir, tmp / "store_npy") if "npy" in formats else None
    if args.codec:
      for path in sorted(store_dir.glob("*.zarr")):
        store.write_array(str(path), np.asarray(store.open_array(str(path))), "zarr", codec=args.codec)
    for d in (store_dir, npy_dir):
      if whole_sizes and d is not None:
        store.add_whole_levels(str(d), whole_sizes, args.codec or store.DEFAULT_CODEC)
    for fmt, d in (("zarr", store_dir), ("npy", npy_dir)):
      if fmt not in formats:
        continue
      row = {
        "format": fmt,
        "codec": (args.codec or "as stored") if fmt == "zarr" else None,
        "whole_sizes": list(whole_sizes),
        "pack_structures": bool(args.pack_structures),
        **cpu_seconds_per_sample(d, args.patches, bool(args.pack_structures)),
      }
      per_core = 1.0 / row["mixed_cpu_s"]
      row["samples_per_core_s"] = per_core
      row["cores_for_1x"] = need["samples_per_s_per_host"] / per_core
      row["cores_for_5x"] = 5 * need["samples_per_s_per_host"] / per_core
      rows.append(row)
      print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"command": " ".join(sys.argv), "demand": need, "rows": rows}, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
