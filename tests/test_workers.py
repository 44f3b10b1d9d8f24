"""#24: the input pipeline's parallelism sized from the machine ('auto'), and the loop's data-wait share."""

import dataclasses
import time
import types

import pytest
from conftest import tiny

from meddiff_jax import sections
from meddiff_jax.data import workers
from meddiff_jax.data.spec import DataSpec
from meddiff_jax.train import loop

GIB = 1 << 30


def data(**kw):
  return dataclasses.replace(tiny().data, **kw)


def test_auto_sizes_workers_threads_and_read_ahead_from_the_machine():
  auto = data(worker_count="auto", num_threads="auto", prefetch="auto")
  plan = lambda **kw: workers.plan(auto, 64 << 20, memory_bytes=64 * GIB, **kw)
  # a small box: threads in this process, one per core
  p = plan(cores=2, machine_cores=2)
  assert (p.worker_count, p.num_threads, p.prefetch) == (0, 2, 2)
  # a GPU host to itself: one worker per core, the loop keeps two
  p = plan(cores=112, machine_cores=112)
  assert (p.worker_count, p.num_threads, p.prefetch) == (64, 1, 1)  # capped at MAX_WORKERS
  p = plan(cores=32, machine_cores=32)
  assert (p.worker_count, p.num_threads, p.prefetch, p.compute_cores) == (30, 1, 1, 30)
  # 8 processes on that host, not pinned by the launcher: they share it; pinned (affinity narrowed): their own
  assert plan(cores=112, machine_cores=112, processes_per_host=8).worker_count == 12
  assert plan(cores=14, machine_cores=112, processes_per_host=8).worker_count == 12
  # a bucket: reads in flight per worker hide its latency
  gs = dataclasses.replace(auto, source="prepared", prepared_dir="gs://b/store")
  p = workers.plan(gs, 64 << 20, cores=32, machine_cores=32, memory_bytes=64 * GIB)
  assert p.remote and (p.worker_count, p.num_threads, p.prefetch) == (
    30,
    workers.READS_PER_CORE,
    workers.READS_PER_CORE,
  )
  # batches in flight stay within a quarter of the memory
  p = workers.plan(gs, 1 * GIB, cores=32, machine_cores=32, memory_bytes=64 * GIB)
  assert p.prefetch * p.worker_count * 1 * GIB <= 0.25 * 64 * GIB and p.num_threads == p.prefetch
  # what the config says explicitly stays
  fixed = data(worker_count=3, num_threads=5, prefetch=7)
  p = workers.plan(fixed, 64 << 20, cores=112, machine_cores=112, memory_bytes=GIB)
  assert (p.worker_count, p.num_threads, p.prefetch) == (3, 5, 7)
  line = plan(cores=32, machine_cores=32).describe(0.01, 341.0)
  assert "30 worker processes" in line and "~3,000 samples/s expected" in line and "(8.8x)" in line


def test_auto_is_the_presets_default_and_anything_else_is_refused():
  from meddiff_jax.configs import pretrain

  for preset in ("tiny", "base", "paper", "paper256"):
    c = pretrain.get_config(preset).data
    assert (c.num_threads, c.prefetch, c.worker_count) == ("auto", "auto", "auto")
  c = pretrain.get_config("tiny").data
  c.num_threads = "many"
  with pytest.raises(sections.ConfigError, match=r"config.data.num_threads='many'.*or one of \('auto',\)"):
    DataSpec.from_config(c)


def test_the_log_says_which_share_of_an_interval_waited_for_data():
  written = []
  writer = types.SimpleNamespace(scalars=lambda step, scalars, prefix: written.append(scalars))
  config = tiny()
  run = types.SimpleNamespace(config=config, flops_per_step=1e9, trainee=types.SimpleNamespace(metric_prefix="t"))
  log = loop.TrainLog(run, writer, None)
  log.add({k: 0.0 for k in ("loss", "grad_norm", "param_norm", "learning_rate", "finite", "nan_skips")})
  log.t_log, log.data_wait_s = time.perf_counter() - 2.0, 0.5
  out = log.write(1)  # one step in the interval: steps_per_sec = 1 / its length
  assert 0 < out["data_wait_fraction"] < 0.25 and out["data_wait_fraction"] == pytest.approx(0.5 * out["steps_per_sec"])
  assert log.data_wait_s == 0.0  # a fresh interval


def test_batches_are_made_without_numpy_huge_pages_unless_asked(monkeypatch):
  """config.data.numpy_huge_pages (off in every preset) is set in the process that iterates a dataset and, through
  Grain's worker_init_fn, in each worker process: numpy's own setting returned by the next call shows it."""
  from meddiff_jax.configs import pretrain
  from meddiff_jax.data import pipeline

  assert all(not pretrain.get_config(p).data.numpy_huge_pages for p in ("tiny", "base", "paper", "paper256"))
  inits = []
  monkeypatch.setattr(
    pipeline.grain.IterDataset, "mp_prefetch", lambda self, options, worker_init_fn: inits.append(worker_init_fn)
  )
  config = tiny(**{"data.source": "phantom"})
  store = pipeline.make_store(config.data)
  numpy_default = workers.numpy_huge_pages(True)
  try:
    for wanted in (False, True):
      workers.numpy_huge_pages(not wanted)
      spec = dataclasses.replace(config.data, numpy_huge_pages=wanted, worker_count=2, num_threads=1, prefetch=1)
      pipeline.make_dataset(store, spec, batch_size=2, seed=0)
      assert workers.numpy_huge_pages(not wanted) is wanted  # this process
      inits.pop()(0, 2)  # what a worker runs first
      assert workers.numpy_huge_pages(not wanted) is wanted
  finally:
    workers.numpy_huge_pages(numpy_default)
