"""How many Grain worker processes and read threads one training process uses, and what they should deliver.

config.data.worker_count / num_threads / prefetch = 'auto' (the presets' default) resolve here, from the cores
this process may run on (`os.sched_getaffinity`), the processes sharing its host, where the store lives (a
bucket needs reads in flight to hide its latency) and host memory (every batch in flight is held in RAM):

  usable cores   C = cores / processes on this host (unless the launcher already gave each process its own
                 cores: affinity narrower than the machine), minus one (two above 8) for the training loop,
                 which dispatches steps and copies batches to the devices;
  workers        C worker processes (one per core: samples are numpy / TensorStore work with Python around it,
                 so processes, not threads, scale), none on <= 2 usable cores (threads in this process);
  threads        per worker (or in this process without workers): 1 per core from local disk, READS_PER_CORE
                 for gs:// / s3:// stores; Grain runs one batch per thread, so `prefetch` = threads;
  capped         at MAX_WORKERS, MAX_THREADS, and batches in flight at a quarter of the memory available.

Grain's read-ahead (`prefetch`) holds batches, not samples; a thread reads a batch's samples one after another.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from meddiff_jax import storage
from meddiff_jax.data import multilevel

AUTO = "auto"
MAX_WORKERS = 64
MAX_THREADS = 32
# Samples in flight per core that keep the rate from a bucket (one thread per core suffices locally): a sample
# waits ~1 round of requests (its reads overlap), so a core needs 1 + latency / (s per sample) of them: 4 covers
# 20 ms down to ~7 ms per sample and 50 ms down to ~17 ms; more threads per process cost CPU per sample
# (benchmarks/pipeline_margin.py --latency_ms, benchmarks/RESULTS.md "#24 bucket latency"). Slower buckets:
# data.num_threads.
READS_PER_CORE = 4
MEMORY_SHARE = 0.25  # at most this share of available memory held by batches in flight


@dataclasses.dataclass(frozen=True)
class ReadPlan:
  """The resolved pipeline parallelism of one process, and what it was resolved from."""

  worker_count: int
  num_threads: int
  prefetch: int
  cores: int  # cores this process may run on
  processes_per_host: int
  remote: bool  # the store is in a bucket

  @property
  def compute_cores(self) -> int:
    """Cores making samples: the workers, or the threads of this process (at most its usable cores)."""
    return self.worker_count or max(1, min(self.num_threads, usable_cores(self.cores)))

  def describe(self, cpu_s_per_sample: float | None = None, consumed_per_s: float | None = None) -> str:
    parts = [
      f"input pipeline: {self.worker_count} worker processes x {self.num_threads} read threads, prefetch "
      f"{self.prefetch} batches ({self.cores} cores available to this process, {self.processes_per_host} "
      f"process(es) on this host{', store in a bucket' if self.remote else ''})"
    ]
    if cpu_s_per_sample:
      rate = self.compute_cores / cpu_s_per_sample
      parts.append(f"~{cpu_s_per_sample * 1e3:.1f} ms CPU per sample measured -> ~{rate:,.0f} samples/s expected")
      if consumed_per_s:
        parts.append(f"the step consumes ~{consumed_per_s:,.0f} samples/s at 40% MFU ({rate / consumed_per_s:.1f}x)")
    return "; ".join(parts)


def numpy_huge_pages(enabled: bool) -> bool:
  """Whether numpy asks the kernel for transparent huge pages (madvise) for the arrays of >= 4 MB this process makes
  from now on: NumPy's NUMPY_MADVISE_HUGEPAGE, which numpy reads at import, set after it. config.data.numpy_huge_pages
  (off by default) in every process that makes batches (`init_worker`, and the process iterating a dataset):
  there each batch is fresh memory, and huge-page faults made stacking and copying it 3-5x dearer after zarr reads
  (benchmarks/RESULTS.md "#24"). Returns the previous setting."""
  from numpy._core import multiarray

  return bool(multiarray._set_madvise_hugepage(bool(enabled)))


def init_worker(huge_pages: bool, worker_index: int, worker_count: int) -> None:
  """A Grain worker process's start (mp_prefetch's worker_init_fn, with config.data.numpy_huge_pages bound): a
  spawned worker imports numpy afresh, so the setting is made there too."""
  del worker_index, worker_count
  numpy_huge_pages(huge_pages)


def available_cores() -> int:
  """Cores this process may run on (its CPU affinity: what a launcher or container gave it)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def processes_on_this_host() -> int:
  """JAX processes sharing this machine (an all-gather of host names: every process must call it)."""
  import jax

  if jax.process_count() == 1:
    return 1
  import socket
  import zlib

  from jax.experimental import multihost_utils

  mine = zlib.crc32(socket.gethostname().encode())
  hosts = np.asarray(multihost_utils.process_allgather(np.uint32(mine)))
  return int(np.sum(hosts == mine))


def usable_cores(cores: int) -> int:
  """Cores left for samples after the training loop's own (one; two above 8 cores)."""
  return max(1, cores - (2 if cores > 8 else 1 if cores > 2 else 0))


def plan(
  data: Any,
  batch_bytes: int,
  *,
  cores: int | None = None,
  processes_per_host: int = 1,
  memory_bytes: int | None = None,
  machine_cores: int | None = None,
) -> ReadPlan:
  """data (data/spec.DataSpec) with its 'auto' worker_count / num_threads / prefetch resolved (module docstring);
  batch_bytes: the bytes of one per-process batch (`batch_bytes`). cores / memory_bytes / machine_cores: what
  this process may use, available memory, the machine's cores (default: asked of the OS)."""
  total = machine_cores or os.cpu_count() or 1
  cores = available_cores() if cores is None else cores
  shared = cores >= total and processes_per_host > 1  # affinity not narrowed per process: share the machine
  mine = max(1, cores // processes_per_host) if shared else cores
  usable = usable_cores(mine)
  remote = data.source == "prepared" and not storage.is_local(data.prepared_dir)
  per_core = READS_PER_CORE if remote else 1
  memory = available_memory() if memory_bytes is None else memory_bytes
  in_flight = max(1, int(MEMORY_SHARE * memory / max(batch_bytes, 1)))  # batches the memory share holds
  workers = data.worker_count
  if workers == AUTO:
    workers = 0 if usable <= 2 else min(usable, MAX_WORKERS, in_flight)
  threads = data.num_threads
  if threads == AUTO:
    threads = min(MAX_THREADS, per_core * (1 if workers else usable))
  prefetch = data.prefetch
  if prefetch == AUTO:  # one batch per thread (Grain runs one batch per thread), within the memory share
    prefetch = max(1, min(threads, in_flight // max(workers, 1)))
  if data.num_threads == AUTO:  # no more threads than batches they may run ahead
    threads = min(threads, prefetch)
  return ReadPlan(int(workers), int(threads), int(prefetch), cores, processes_per_host, remote)


def batch_bytes(spec: multilevel.SampleSpec, batch_size: int) -> int:
  """Bytes of a batch of `batch_size` samples of layout `spec`, as shipped (either path: the larger layout)."""
  p = spec.patch
  if spec.decode_on_device:
    per_sample = sum(
      int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in multilevel.shipped_layout(spec).values()
    )
  else:  # image float32, structures (packed: 1 uint8 channel; else K + 1), hint float32
    channels = 0 if spec.lut is None else (1 if spec.pack_structures or spec.structure_labels else spec.num_groups + 1)
    per_sample = p**3 * (4 + channels + (4 if spec.hint else 0))
  return per_sample * batch_size


def available_memory() -> int:
  """The host's available memory in bytes (/proc/meminfo MemAvailable; 8 GiB when it cannot be read)."""
  try:
    with open("/proc/meminfo") as f:
      info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info.get("MemTotal", 8 << 30))
  except OSError:
    return 8 << 30


def cpu_seconds_per_sample(sample_fn: Any, num_volumes: int, samples: int = 6, seed: int = 0) -> float:
  """Process CPU seconds per sample of `sample_fn` (a MultiLevelSample: (index, rng) -> sample), over `samples`
  samples of different volumes after one warm-up: what the start-up line's expected rate divides cores by."""
  rng = np.random.default_rng(seed)
  sample_fn(0, rng)
  c0 = time.process_time()
  for i in range(samples):
    sample_fn((i + 1) % max(num_volumes, 1), rng)
  return (time.process_time() - c0) / samples
