"""Pretraining loop: mesh -> data -> sharded state -> AOT-compiled step -> logged steps."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from meddiff_jax.data import pipeline
from meddiff_jax.diffusion import schedules
from meddiff_jax.models import unet3d
from meddiff_jax.train import sharding
from meddiff_jax.train import state as state_lib
from meddiff_jax.train import step as step_lib


class NonFiniteError(FloatingPointError):
  """Raised after `max_consecutive_nan` updates in a row were skipped for NaN/inf."""


def build_model(config: ml_collections.ConfigDict) -> tuple[unet3d.UNet3D, unet3d.UNetSpec]:
  spec = unet3d.UNetSpec.from_config(config.model)
  return unet3d.UNet3D(spec), spec


def dummy_inputs(spec: unet3d.UNetSpec, patch: int, batch: int = 1) -> tuple[jax.Array, jax.Array, dict]:
  x = jnp.zeros((batch, patch, patch, patch, 1), jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  cond = {"pos_box": jnp.tile(jnp.array([[-1.0, 1.0]], jnp.float32), (batch, 3, 1)),
          "region": jnp.zeros((batch,), jnp.int32)}
  if spec.structure_channels:
    cond["structures"] = jnp.zeros((batch, patch, patch, patch, spec.structure_channels), jnp.uint8)
  return x, t, cond


def init_params_fn(model: unet3d.UNet3D, spec: unet3d.UNetSpec, patch: int):
  x, t, cond = dummy_inputs(spec, patch)
  return lambda key: model.init(key, x, t, cond)["params"]


def validate(config: ml_collections.ConfigDict) -> None:
  """Catch inconsistent configs before anything is compiled, with one-line messages."""
  data, model, train = config.data, config.model, config.training
  expected = pipeline.structure_lut(data)[1] + 1 if data.use_structures else 0
  if model.structure_channels != expected:
    raise ValueError(f"config.model.structure_channels={model.structure_channels} but the data gives {expected} "
                     f"structure channels (data.use_structures={data.use_structures})")
  factor = 2 ** (len(model.channel_mult) - 1)
  if data.patch_size % factor:
    raise ValueError(f"config.data.patch_size={data.patch_size} must be divisible by {factor} "
                     f"(2^(levels-1) for channel_mult={tuple(model.channel_mult)})")
  if train.batch_size % train.grad_accum_steps:
    raise ValueError(f"config.training.batch_size={train.batch_size} must be divisible by "
                     f"grad_accum_steps={train.grad_accum_steps}")
  if data.source == "prepared" and not data.prepared_dir:
    raise ValueError("config.data.source='prepared' needs --config.data.prepared_dir=DIR "
                     "(make one with configs/prepare.py), or use --config.data.source=phantom")


class MetricsLog:
  """Appends one JSON line per logged step to WORKDIR/metrics.jsonl (process 0 only)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **values}) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs pretraining; returns the last logged metrics."""
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(dict(config.mesh))
  rules = sharding.rules_from_config(config.sharding.rules)
  logging.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())

  model, spec = build_model(config)
  schedule = schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  tx = state_lib.make_optimizer(config.optimizer)
  lr_schedule = state_lib.learning_rate_schedule(config.optimizer)
  init_fn = init_params_fn(model, spec, config.data.patch_size)
  train_state, state_shardings = state_lib.create(init_fn, tx, config.seed, mesh, rules,
                                                  config.sharding.min_shard_size)
  logging.info("model: %s params", f"{unet3d.count_params(train_state.params):,}")

  store = pipeline.make_store(config.data)
  batch_sharding = pipeline.batch_sharding(mesh, sharding.batch_axes(rules))
  dataset = pipeline.make_dataset(store, config.data, batch_size=config.training.batch_size, seed=config.seed,
                                  process_index=jax.process_index(), process_count=jax.process_count())
  batches = pipeline.GlobalBatches(dataset, batch_sharding)

  step_fn = step_lib.make_train_step(model.apply, schedule, tx, lr_schedule, config, rules)
  train_step = step_lib.jit_train_step(step_fn, state_shardings, batch_sharding, mesh)

  log = MetricsLog(workdir)
  last: dict[str, float] = {}
  with sharding.activate(mesh, rules):
    first_batch = next(batches)
    t0 = time.perf_counter()
    compiled = train_step.lower(train_state, first_batch).compile()
    logging.info("compiled train step in %.1f s; %s", time.perf_counter() - t0, _memory_summary(compiled))
    batch = first_batch
    start = int(train_state.step)
    t_log, steps_since = time.perf_counter(), 0
    pending = None
    for step in range(start, config.training.num_steps):
      train_state, metrics = compiled(train_state, batch)
      steps_since += 1
      if pending is not None:  # check the previous step's counters: keeps one step in flight
        _check_finite(pending, step - 1, config.training.max_consecutive_nan)
      pending = metrics
      is_last = step + 1 == config.training.num_steps
      if (step + 1) % config.training.log_every == 0 or is_last:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - t_log
        host["steps_per_sec"] = steps_since / elapsed
        host["voxels_per_sec"] = host["steps_per_sec"] * config.training.batch_size * config.data.patch_size ** 3
        log.write(step + 1, host)
        logging.info("step %d: %s", step + 1, " ".join(f"{k}={v:.4g}" for k, v in host.items()))
        last = host
        t_log, steps_since = time.perf_counter(), 0
      if not is_last:
        batch = next(batches)
    if pending is not None:
      _check_finite(pending, config.training.num_steps - 1, config.training.max_consecutive_nan)
  return last


def _check_finite(metrics: dict[str, jax.Array], step: int, limit: int) -> None:
  consecutive = int(metrics["consecutive_nan"])
  if consecutive:
    logging.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d total)",
                    step + 1, consecutive, int(metrics["nan_skips"]))
  if consecutive >= limit:
    raise NonFiniteError(
        f"{consecutive} consecutive training steps had a NaN/inf loss or gradient (last at step {step + 1}); "
        f"stopping. Lower config.optimizer.learning_rate, enable grad_clip_norm, or check the data.")


def _memory_summary(compiled: Any) -> str:
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pragma: no cover - not every backend reports it
    return "memory analysis unavailable"
  if mem is None:
    return "memory analysis unavailable"
  total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  return f"per-device memory {total / 2**20:.1f} MiB (temp {mem.temp_size_in_bytes / 2**20:.1f} MiB)"

