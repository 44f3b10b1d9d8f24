"""Does the input pipeline keep >= 5x ahead of the paper preset's train step? (#12, #24)

python benchmarks/pipeline_margin.py [--store_dir=DIR] [--patches=6] [--gpus_per_host=8] [--device_kind=H100]
    [--whole_sizes=128] [--pack_structures=1] [--codec=blosc_lz4hc] [--formats=zarr,npy] [--decode=device]
    [--numpy_huge_pages=preset|0|1] [--out=benchmarks/results/pipeline_margin.json]
python benchmarks/pipeline_margin.py --store_dir=DIR --whole_sizes=128 --latency_ms=0,20,50 --threads=1,2,4,8
    (bucket mode)

Supply: the paper preset's samples (configs/pretrain.py:paper data section: 128^3 windows, multi-level
whole / zoom2 / patch at 1/3 each, grouped structure channels) drawn from a prepared store on local
disk, zarr and .npy, each operation timed on its own and mixed by the preset's probabilities. The figure
that transfers to another host is CPU seconds per sample (process CPU time, one thread, page cache warm),
not this shared 2-core box's wall clock: a host with C free cores delivers about C / (CPU s per sample).
Per sample: making it (`sample_cpu_s`: what #12's rows counted), then what every sample costs after, whatever its
operation: stacking a batch (`stack_cpu_s`, Grain's np.stack) and one more copy of the batch (`transfer_copy_cpu_s`:
the host side of the transfer, PJRT copying a numpy batch into its pinned staging buffer); `mixed_cpu_s` and the
core counts add all three. --decode=device (data.decode_on_device, the default): samples ship their HU on their
grid (int16 steps of multilevel.HU_STEP, zoom2 resized here by multilevel.halve) and uint8 label codes, 6.3 MB each
at P=128, and the device finishes them; --decode=device_resize (+ data.resize_on_device): zoom2's int16 2P^3 window
ships instead and the device resizes it too (~46 MB each: every sample carries the window's slot); --decode=host:
the host finishes them (10.5 MB each).
Demand: the paper preset's model FLOPs per step (effective batch 4) at 40% MFU on `gpus_per_host` GPUs of
`device_kind` (train/throughput.projected_step_s, the dry run's projection), the step lengthened by what decoding
adds on the device (data/decode.py compiled for a batch: XLA's FLOPs at that MFU or its bytes at the kind's HBM
bandwidth, whichever is longer; its XLA:CPU time per sample is reported beside it).

Bucket mode (--latency_ms): the zarr copy read as from a bucket, every read of an array waiting `latency` ms per
round of requests (one round when its chunks fit in store.REQUESTS_PER_ARRAY, as store.py opens gs:// arrays), by
Grain with --threads samples in flight; samples/s (wall), CPU s per sample and the request rounds a sample waits
for one after another (its HU and label reads start together: one round). A GCS stand-in over HTTP spent more CPU
per chunk request than the pipeline on this 2-core box, so the latency is injected in the store's arrays.

Processes: numpy's transparent huge pages as the paper preset sets them where batches are made
(config.data.numpy_huge_pages, data/workers.numpy_huge_pages); --numpy_huge_pages=1 / 0 overrides.

Volumes: --store_dir (a prepared zarr store, left as it is: read from copies) or, by default, input_pipeline.py's
4 phantoms at 256^3 + the real CT, prepared into a temporary directory. --whole_sizes=128: the copies get their
whole levels (store.add_whole_levels), so whole-volume samples read those. --pack_structures=0: ship the 13 grouped
channels as before instead of one packed channel. --codec=NAME (store.CODECS): the zarr copy's arrays are
rewritten with that codec (and its whole levels written with it) before timing, --chunk=N: with N^3 chunks (with
--codec; default store.CHUNK); default: the store's own codecs kept, whole levels in store.DEFAULT_CODEC. Bytes
read per sample: zarr, what the process read (/proc/self/io rchar); npy (memory-mapped, invisible to rchar), the
bytes of the arrays the sample slices. Writes --out (default benchmarks/results/pipeline_margin.json).
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
  from meddiff_jax.configs import pretrain
  from meddiff_jax.models import unet3d
  from meddiff_jax.train import throughput

  config = pretrain.get_config("paper")
  spec = unet3d.UNetSpec.from_config(config.model)
  flops = throughput.train_flops_per_step(spec, config.data.patch_size, config.training.batch_size)
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
  """Counts the bytes of the arrays a sample slices out of (memory-mapped .npy reads do not show in rchar). Every
  way a volume is read passes through (a lazy volume's begun reads too), so samples are made as the pipeline makes
  them (until 2026-12-04 a zarr volume's read_async / oindex_async were hidden: its windows were read into fresh
  memory and its zoom2 labels gathered by TensorStore's oindex, the slower paths stop 32 replaced)."""

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

    class Gathered(Sliced):  # a lazy store volume that gathers index grids itself (store.ChunkedVolume)
      def oindex(self, index):
        out = a.oindex(index)
        outer.bytes += out.nbytes
        return out

    class Begun(Gathered):  # and begins its reads (store.ChunkedVolume): the pipeline's path, into `out` given
      def read_async(self, index, out=None):
        return counted(a.read_async(index, out=out))

      def oindex_async(self, index, out=None):
        return counted(a.oindex_async(index, out=out))

    def counted(read):
      def wait():
        out = read()
        outer.bytes += out.nbytes
        return out

      return wait

    return Begun() if hasattr(a, "read_async") else Gathered() if hasattr(a, "oindex") else Sliced()

  def load(self, index):
    hu, labels, region = self.base.load(index)
    return self._wrap(hu), self._wrap(labels), region

  def load_lowres(self, index):
    return self.base.load_lowres(index)

  @property
  def splits(self):
    return self.base.splits

  @property
  def records(self):
    return self.base.records

  def load_whole(self, index, size):
    level = self.base.load_whole(index, size)
    if level is not None:
      self.bytes += level[0].nbytes + (0 if level[1] is None else level[1].nbytes)
    return level


def paper_sample_spec(pack: bool, decode: str):
  """The paper preset's sample layout (prepared store: int16 HU), structures packed or not, finished where asked
  (--decode: host, device, device_resize)."""
  import dataclasses

  from meddiff_jax.configs import pretrain
  from meddiff_jax.data.spec import DataSpec

  layout = DataSpec.from_config(pretrain.get_config("paper").data).sample_spec()
  return dataclasses.replace(
    layout, pack_structures=pack, decode_on_device=decode != "host", resize_on_device=decode == "device_resize"
  )


def cpu_seconds_per_sample(store_dir: pathlib.Path, n: int, spec, batch: int) -> tuple[dict[str, float], list]:
  """Per operation: (process CPU s, wall s, bytes read) per paper-preset sample, one thread, after a warm-up; then
  what every sample costs after it is made, whatever its operation (the layout is static): stacking `batch` of
  them into a batch (Grain's np.stack) and copying the batch once more (the host side of the transfer: PJRT
  copies a numpy batch into its pinned staging buffer). Returns the row and the samples (for the device work)."""
  from meddiff_jax.data import pipeline, store

  ps = _SlicedBytes(store.PreparedStore(str(store_dir)))
  sample = pipeline.MultiLevelSample(ps, spec)
  out, made = {}, []
  for op, name in enumerate(OPERATIONS):
    rng = np.random.default_rng(op)
    for i in range(len(ps)):  # warm-up: page cache, TensorStore handles, first touches
      sample(i, rng, operation=name)
    c0, w0, r0, b0 = time.process_time(), time.perf_counter(), _rchar(), ps.bytes
    for i in range(n):
      sample(i % len(ps), rng, operation=name)  # dropped, as a pipeline drops it once batched
    out[f"{name}_cpu_s"] = (time.process_time() - c0) / n
    out[f"{name}_wall_s"] = (time.perf_counter() - w0) / n
    out[f"{name}_rchar_mb"] = (_rchar() - r0) / n / 1e6
    out[f"{name}_sliced_mb"] = (ps.bytes - b0) / n / 1e6
    made += [sample(i % len(ps), rng, operation=name) for i in range(batch)]  # kept for assembly, untimed
  probs = tuple(float(p) for p in spec.operation_probs)
  out["sample_cpu_s"] = sum(p * out[f"{k}_cpu_s"] for p, k in zip(probs, OPERATIONS))
  out["mixed_wall_s"] = sum(p * out[f"{k}_wall_s"] for p, k in zip(probs, OPERATIONS))
  out.update(assembly_seconds(made, batch))
  out["mixed_cpu_s"] = out["sample_cpu_s"] + out["stack_cpu_s"] + out["transfer_copy_cpu_s"]
  return out, made


def assembly_seconds(made: list, batch: int, rounds: int = 5) -> dict[str, float]:
  """CPU s per sample to stack samples into batches of `batch` (operations interleaved, as drawn) and to copy each
  batch into a reused staging buffer; and the bytes each sample ships."""
  order = [made[i] for k in range(len(made) // 3) for i in (k, k + len(made) // 3, k + 2 * len(made) // 3)]
  groups = [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)]
  staging = {k: np.empty((batch, *np.shape(v)), np.asarray(v).dtype) for k, v in groups[0][0].items()}
  stack_s, copy_s, count = 0.0, 0.0, 0
  for _ in range(rounds):
    for group in groups:
      c0 = time.process_time()
      stacked = {k: np.stack([s[k] for s in group]) for k in group[0]}
      c1 = time.process_time()
      for k, v in stacked.items():
        np.copyto(staging[k], v)
      c2 = time.process_time()
      stack_s, copy_s, count = stack_s + c1 - c0, copy_s + c2 - c1, count + len(group)
      del stacked
  shipped = sum(np.asarray(v).dtype.itemsize * int(np.prod(np.shape(v))) for v in made[0].values())
  return {"stack_cpu_s": stack_s / count, "transfer_copy_cpu_s": copy_s / count, "shipped_mb": shipped / 1e6}


def device_work(made: list, spec, batch: int, gpus: int, device_kind: str, mfu: float) -> dict[str, float]:
  """What decoding on the device adds to the step (data/decode.py, in the jitted step): XLA's FLOPs and bytes for a
  batch of `batch` (the paper step's), projected at `mfu` of the kind's peak or at its HBM bandwidth, whichever is
  longer, over `gpus` devices; and the same function's CPU time here (XLA:CPU, process CPU s per sample)."""
  import jax

  from meddiff_jax.data import decode
  from meddiff_jax.train import throughput

  if not spec.decode_on_device:
    return {"decode_flops_per_step": 0.0, "decode_bytes_per_step": 0.0, "decode_device_s": 0.0}
  group = [made[i] for i in np.linspace(0, len(made) - 1, batch).astype(int)]  # operations mixed
  host = {k: np.stack([s[k] for s in group]) for k in group[0]}
  fn = jax.jit(lambda b: decode.decode(b, spec))
  compiled = fn.lower(host).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  jax.block_until_ready(compiled(host))
  times = []
  for _ in range(3):
    c0 = time.process_time()
    jax.block_until_ready(compiled(host))
    times.append((time.process_time() - c0) / batch)
  peak = throughput.peak_flops(device_kind) or 0.0
  hbm = HBM_BYTES_PER_S.get(device_kind, 0.0)
  device_s = max(flops / (gpus * peak * mfu) if peak else 0.0, nbytes / (gpus * hbm) if hbm else 0.0)
  return {
    "decode_flops_per_step": flops,
    "decode_bytes_per_step": nbytes,
    "decode_device_s": device_s,
    "decode_cpu_s_per_sample_xla_cpu": float(np.median(times)),
  }


class LatentArray:
  """A store array (store.ChunkedVolume) read as from a bucket: every read waits `latency_s` per round of requests
  (its chunks over store.REQUESTS_PER_ARRAY, the requests in flight store.py opens gs:// arrays with: one round for
  every read of the paper preset), then reads the local copy. Reads started together (read_async) wait together,
  as TensorStore's requests do."""

  def __init__(self, base, latency_s: float, waited: list):
    self.base, self.latency_s, self.waited = base, latency_s, waited  # waited: [seconds slept, all threads]
    self.shape, self.dtype, self.ndim = base.shape, base.dtype, base.ndim
    self.chunk = tuple(int(c) for c in base._array.chunk_layout.read_chunk.shape)  # as written (--chunk)

  def _after(self, chunks: int, read):
    from meddiff_jax.data import store

    ready = time.perf_counter() + self.latency_s * -(-chunks // store.REQUESTS_PER_ARRAY)

    def wait():
      pause = max(0.0, ready - time.perf_counter())
      self.waited[0] += pause  # a read started with another one waits (almost) nothing more
      time.sleep(pause)
      return read()

    return wait

  def read_async(self, index, out=None):
    box = (index,) if not isinstance(index, tuple) else index
    box = [slice(None)] * self.ndim if box == (...,) else list(box) + [slice(None)] * (self.ndim - len(box))
    chunks = 1
    for sl, n, c in zip(box, self.shape, self.chunk):
      lo, hi, _ = sl.indices(n)
      chunks *= -(-hi // c) - lo // c
    return self._after(chunks, lambda: self.base.read_async(index, out=out)())

  def oindex_async(self, index, out=None):
    chunks = int(np.prod([len(np.unique(np.asarray(i) // c)) for i, c in zip(index, self.chunk)]))
    return self._after(chunks, lambda: self.base.oindex_async(index, out=out)())

  def __getitem__(self, index):
    return self.read_async(index)()

  def oindex(self, index):
    return self.oindex_async(index)()

  def __array__(self, dtype=None, copy=None):
    out = self.read_async(...)()
    return out if dtype is None else out.astype(dtype)


def latent_store(store_dir: pathlib.Path, latency_s: float):
  """A PreparedStore whose zarr arrays are read as from a bucket with `latency_s` per request (LatentArray);
  `.waited[0]`: the seconds its reads waited, over all threads."""
  from meddiff_jax.data import store

  class Latent(store.PreparedStore):
    waited = [0.0]

    def _array(self, name):
      array = super()._array(name)
      if not isinstance(array, store.ChunkedVolume):
        return array
      array.strided_gathers = False  # as store.open_array opens a gs:// / s3:// array
      return LatentArray(array, latency_s, self.waited)

  return Latent(str(store_dir))


def bucket_latency(
  store_dir: pathlib.Path, latencies: list[float], threads: list[int], samples: int, decode: str
) -> list:
  """The paper preset's samples from the zarr store read as from a bucket with `latency` ms per request (each read
  one round of requests: latent_store), by Grain with `threads` samples in flight (batches of 1, read threads of
  this process): samples/s (wall) and process CPU s per sample, per latency and thread count."""
  import dataclasses

  from meddiff_jax.configs import pretrain
  from meddiff_jax.data import pipeline
  from meddiff_jax.data.spec import DataSpec

  config = pretrain.get_config("paper").data
  config.update(prepared_dir=str(store_dir), worker_count=0)
  base = dataclasses.replace(
    DataSpec.from_config(config), decode_on_device=decode != "host", resize_on_device=decode == "device_resize"
  )
  rows = []
  for latency in latencies:
    for n in threads:
      data = dataclasses.replace(base, num_threads=n, prefetch=n)
      latent = latent_store(store_dir, latency / 1e3)
      it = iter(pipeline.make_dataset(latent, data, batch_size=1, seed=n))
      for _ in range(max(n, 2)):  # warm-up: TensorStore handles, threads, page cache
        next(it)
      c0, w0, s0 = time.process_time(), time.perf_counter(), latent.waited[0]
      for _ in range(samples):
        next(it)
      wall, cpu, slept = time.perf_counter() - w0, time.process_time() - c0, latent.waited[0] - s0
      row = {
        "latency_ms": latency,
        "threads": n,
        "samples_per_s": samples / wall,
        "cpu_s_per_sample": cpu / samples,
        # request rounds a sample waits for one after another (its reads that start together count once)
        "rounds_per_sample": slept / samples / (latency / 1e3) if latency else 0.0,
      }
      rows.append(row)
      print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
      del it
  return rows


HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "TPU v5p": 2.76e12, "TPU v5 lite": 0.82e12}  # datasheets


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
  p.add_argument("--chunk", type=int, default=0, help="re-encode the zarr copy with chunks of this edge (with --codec)")
  p.add_argument("--decode", default="device", choices=("device", "device_resize", "host"), help="module docstring")
  p.add_argument("--latency_ms", default="", help="bucket mode: e.g. 0,20,50 ms per request round")
  p.add_argument("--threads", default="1,2,4,8", help="bucket mode: samples in flight (Grain read threads)")
  p.add_argument("--latency_samples", type=int, default=24, help="bucket mode: timed samples per setting")
  p.add_argument(
    "--numpy_huge_pages", default="preset", choices=("preset", "0", "1"), help="the paper preset's data setting"
  )
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline_margin.json"))
  args = p.parse_args()
  import input_pipeline

  from meddiff_jax.configs import pretrain
  from meddiff_jax.data import store, workers

  # as the pipeline's processes run (data/workers.numpy_huge_pages); numpy reads its own default at import
  preset = args.numpy_huge_pages == "preset"
  huge_pages = pretrain.get_config("paper").data.numpy_huge_pages if preset else args.numpy_huge_pages == "1"
  workers.numpy_huge_pages(huge_pages)

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
    formats = args.formats.split(",") if not args.latency_ms else ["zarr"]
    npy_dir = input_pipeline.npy_copy(store_dir, tmp / "store_npy") if "npy" in formats else None
    if args.codec:
      for path in sorted(store_dir.glob("*.zarr")):
        array = np.asarray(store.open_array(str(path)))
        store.write_array(str(path), array, "zarr", chunk=args.chunk or None, codec=args.codec)
    for d in (store_dir, npy_dir):
      if whole_sizes and d is not None:
        store.add_whole_levels(str(d), whole_sizes, args.codec or store.DEFAULT_CODEC)
    latency_rows = []
    if args.latency_ms:
      latencies = [float(v) for v in args.latency_ms.split(",")]
      threads = [int(v) for v in args.threads.split(",")]
      latency_rows = bucket_latency(store_dir, latencies, threads, args.latency_samples, args.decode)
      formats = []
    for fmt, d in (("zarr", store_dir), ("npy", npy_dir)):
      if fmt not in formats:
        continue
      spec = paper_sample_spec(bool(args.pack_structures), args.decode)
      measured, made = cpu_seconds_per_sample(d, args.patches, spec, need["samples_per_step"])
      row = {
        "format": fmt,
        "codec": (args.codec or "as stored") if fmt == "zarr" else None,
        "chunk": (args.chunk or "as stored") if fmt == "zarr" else None,
        "whole_sizes": list(whole_sizes),
        "pack_structures": bool(args.pack_structures),
        "decode": args.decode,
        "numpy_huge_pages": huge_pages,
        **measured,
        **device_work(made, spec, need["samples_per_step"], args.gpus_per_host, args.device_kind, args.mfu),
      }
      del made
      # the device's decode lengthens the step: demand falls by as much (nothing is hidden by moving work there)
      samples_per_s = need["samples_per_step"] / (need["step_s"] + row["decode_device_s"])
      per_core = 1.0 / row["mixed_cpu_s"]
      row["samples_per_s_per_host"] = samples_per_s
      row["samples_per_core_s"] = per_core
      row["cores_for_1x"] = samples_per_s / per_core
      row["cores_for_5x"] = 5 * samples_per_s / per_core
      row["cores_for_5x_sample_only"] = 5 * samples_per_s * row["sample_cpu_s"]  # #12's count: making samples
      rows.append(row)
      print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  result = {"command": " ".join(sys.argv), "demand": need, "rows": rows}
  if latency_rows:
    result["latency_rows"] = latency_rows
  out.write_text(json.dumps(result, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
