"""The training loop (pretraining and ControlNet fine-tuning): mesh -> data -> sharded state -> restore ->
AOT-compiled step -> metrics, eval, samples, checkpoints; SIGTERM (preemption) saves and exits cleanly.

What differs between the two is a `Trainee` (the model's apply / init and which params come from
elsewhere); which params train is config.optimizer.trainable (models/trainable.py labels).
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from meddiff_jax import checkpoint, pretrained, sections, sharding, storage
from meddiff_jax.data import pipeline
from meddiff_jax.diffusion import schedules
from meddiff_jax.evaluation import montage
from meddiff_jax.models import conditions, trainable, unet3d
from meddiff_jax.train import state as state_lib
from meddiff_jax.train import step as step_lib
from meddiff_jax.train import throughput, validation
from meddiff_jax.train import writer as writer_lib
from meddiff_jax.train.metrics import TrainMetrics


class NonFiniteError(FloatingPointError):
  """Raised after `max_consecutive_nan` updates in a row were skipped for NaN/inf."""


@dataclasses.dataclass(frozen=True)
class Trainee:
  """What the loop trains.

  apply_fn: linen-style (variables {'params': whole tree}, x_t, t, cond, train=, rngs=) -> model output.
  init_params_fn: (rng, *init_args) -> boxed whole param tree.
  external: top-level param keys whose frozen leaves are loaded from elsewhere (the pretrained base),
    so checkpoints do not store them again.
  metric_prefix: TensorBoard namespace of the training scalars.
  """

  apply_fn: Callable[..., jax.Array]
  init_params_fn: Callable[..., Any]
  schedule: schedules.Schedule
  init_args: tuple = ()
  external: tuple[str, ...] = ()
  metric_prefix: str = "train"


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
  """config.training, typed (the loop keeps reading the ConfigDict; the batch against the mesh is
  sharding.check_plan's, in checks.py)."""

  batch_size: int
  grad_accum_steps: int
  num_steps: int
  ema_decay: float
  log_every: int  # 0: off (itstime)
  max_consecutive_nan: int
  profile_steps: int

  def __post_init__(self):
    key = "config.training."
    sections.count(key + "batch_size", self.batch_size)
    sections.count(key + "grad_accum_steps", self.grad_accum_steps)
    sections.count(key + "num_steps", self.num_steps)
    sections.fraction(key + "ema_decay", self.ema_decay)
    sections.count(key + "log_every", self.log_every, 0)
    sections.count(key + "max_consecutive_nan", self.max_consecutive_nan)
    sections.count(key + "profile_steps", self.profile_steps, 0)

  @classmethod
  def from_config(cls, section: Any) -> TrainingSpec:
    return sections.from_config(cls, section, "config.training")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """config.eval, typed (against the diffusion steps: checks.py)."""

  every_steps: int  # 0: off
  num_batches: int
  num_buckets: int
  sample_every_steps: int  # 0: off
  sample_steps: int

  def __post_init__(self):
    key = "config.eval."
    sections.count(key + "every_steps", self.every_steps, 0)
    sections.count(key + "num_batches", self.num_batches)
    sections.count(key + "num_buckets", self.num_buckets)
    sections.count(key + "sample_every_steps", self.sample_every_steps, 0)
    sections.count(key + "sample_steps", self.sample_steps)

  @classmethod
  def from_config(cls, section: Any) -> EvalSpec:
    return sections.from_config(cls, section, "config.eval")


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
  """config.checkpoint, typed."""

  every_steps: int  # 0: off (itstime)
  keep: int
  asynchronous: bool
  on_unrestorable: str  # checkpoint.ON_UNRESTORABLE

  def __post_init__(self):
    key = "config.checkpoint."
    sections.count(key + "every_steps", self.every_steps, 0)
    sections.count(key + "keep", self.keep)
    sections.flag(key + "asynchronous", self.asynchronous)
    sections.choice(key + "on_unrestorable", self.on_unrestorable, checkpoint.ON_UNRESTORABLE)

  @classmethod
  def from_config(cls, section: Any) -> CheckpointSpec:
    return sections.from_config(cls, section, "config.checkpoint")


def pretraining(config: ml_collections.ConfigDict) -> Trainee:
  model, spec = pretrained.build_model(config)
  schedule = schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  return Trainee(model.apply, pretrained.init_params_fn(model, spec, config.data.patch_size), schedule)


def itstime(step: int, every: int, total: int, stopping: bool = False) -> bool:
  """A periodic action is due after `step`: every `every` steps, at the last step, and (when `stopping`
  is passed) before a preempted run exits. every=0 switches the action off."""
  return bool(every) and (step % every == 0 or step == total or stopping)


def init_state(
  config: ml_collections.ConfigDict, trainee: Trainee, mesh: jax.sharding.Mesh, rules: Any
) -> tuple[state_lib.TrainState, state_lib.TrainState, dict, Any]:
  """(state, its shardings, trainable/frozen labels, optimizer); the labels are computed once, here."""
  with sharding.activate(mesh, rules):
    abstract = jax.eval_shape(trainee.init_params_fn, state_lib.init_key(config.seed), *trainee.init_args)
  labels = trainable.labels(sharding.strip_boxes(abstract), config.optimizer.trainable)
  tx = state_lib.make_optimizer(config.optimizer, labels)
  state, shardings = state_lib.create(
    trainee.init_params_fn, tx, config.seed, mesh, rules, config.sharding.min_shard_size, labels, trainee.init_args
  )
  return state, shardings, labels, tx


class PreemptionWatcher:
  """Decides the step at which a preempted run saves and exits, the same step on every process.

  With the distributed runtime (every multi-process job, and every TPU VM: main.maybe_initialize_distributed)
  JAX's preemption service catches SIGTERM on any host and `reached_preemption_sync_point`, called every
  step, turns true on all hosts at the same step (the anchors' way; no collective of ours in the loop). A
  single process without it: a SIGTERM handler sets a flag, checked every step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self.distributed = jax.distributed.is_initialized()
    # the preemption service installed its own SIGTERM handler: a Python one would take the signal from it
    if not self.distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def close(self) -> None:
    """Give SIGTERM back (a notebook kernel that trained must still stop when asked to)."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping after this step")
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Called once per step, with the step just run, by every process."""
    if not self.distributed:
      return self.requested
    from jax.experimental import multihost_utils

    if multihost_utils.reached_preemption_sync_point(step):
      logging.warning("preemption notice: every process saves step %d and exits", step)
      return True
    return False


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, trainee: Trainee | None = None
) -> dict[str, float]:
  """Runs (or resumes) training, pretraining unless a trainee is given; returns the last logged metrics.

  `config` was checked once by the entry point (checks.pretrain / checks.controlnet); not again here."""
  t_start = time.perf_counter()
  storage.makedirs(workdir)
  mesh = sharding.make_mesh(dict(config.mesh))
  rules = sharding.rules_from_config(config.sharding.rules)

  trainee = trainee or pretraining(config)
  schedule = trainee.schedule
  train_state, state_shardings, labels, tx = init_state(config, trainee, mesh, rules)
  lr_schedule = state_lib.learning_rate_schedule(config.optimizer)
  writer_lib.progress(
    f"model {unet3d.count_params(train_state.params):,} params "
    f"({unet3d.count_params(train_state.ema_params):,} trained); mesh {dict(mesh.shape)} on "
    f"{jax.device_count()} devices ({jax.process_count()} processes); workdir {workdir}"
  )
  # model FLOPs by which parts train (a ControlNet's config.model is its base's: train/controlnet.derive_config)
  flops_per_step = throughput.flops_for_config(config, pretrained.build_model(config)[1], labels)
  xla_flops_per_step = None
  device_kind = jax.devices()[0].device_kind
  logging.info("%.3g model FLOPs per step; %s", flops_per_step, throughput.describe_peak(device_kind))
  # checkpoints hold the state without the frozen params loaded from elsewhere (the ControlNet base)
  stored = lambda st: st.replace(params=state_lib.checkpoint_split(st.params, labels, trainee.external)[0])

  store = pipeline.make_store(config.data)
  config.data.spacing = pipeline.training_spacing(config.data, store) or ()  # saved with every checkpoint
  train_store, val_store = pipeline.split_train_val(store, config.data)
  batch_sharding = sharding.input_shardings(mesh, rules, step_lib.batch_spec(config))  # volumes: also by depth
  make_batches = lambda seed: pipeline.GlobalBatches(
    pipeline.make_dataset(
      train_store,
      config.data,
      batch_size=config.training.batch_size,
      seed=seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    ),
    batch_sharding,
  )
  batches = make_batches(config.seed)

  ckpt = checkpoint.Checkpointer(
    storage.join(workdir, "checkpoints"), keep=config.checkpoint.keep, asynchronous=config.checkpoint.asynchronous
  )
  restored = checkpoint.resume(
    ckpt, checkpoint.abstract_target(stored(train_state), stored(state_shardings)), batches.iterator, config
  )
  if restored is not None:
    left_out = state_lib.checkpoint_split(train_state.params, labels, trainee.external)[1]
    train_state = restored.state.replace(params=trainable.merge(restored.state.params, left_out))
    writer_lib.progress(f"resumed from step {restored.step} in {ckpt.directory}")
    if not restored.data_restored:  # do not replay the same samples from the start
      batches = make_batches(config.seed + restored.step)

  step_fn = step_lib.make_train_step(trainee.apply_fn, schedule, tx, lr_schedule, config, rules, labels)
  train_step = step_lib.jit_train_step(step_fn, state_shardings, batch_sharding, mesh, labels)
  # eval and previews use the EMA of the trained leaves with the frozen leaves as they are
  eval_params = lambda st: trainable.merge(trainable.split(st.params, labels)[1], st.ema_params)
  eval_step = jax.jit(
    validation.make_eval_step(trainee.apply_fn, schedule, config, config.eval.num_buckets),
    in_shardings=(eval_params(state_shardings), batch_sharding, None),
  )
  preview = jax.jit(validation.make_preview_sampler(trainee.apply_fn, schedule, config, config.eval.sample_steps))

  writer = writer_lib.MetricWriter(workdir)
  num_steps = config.training.num_steps
  preemption = PreemptionWatcher()
  start = int(train_state.step)
  profiler = Profiler(workdir, start, config.training.profile_steps)
  if start == 0:
    writer.config(config)
  last: dict[str, float] = {}
  last_val: dict[str, float] = {}
  stopping = False
  try:
    with sharding.activate(mesh, rules):
      batch = next(batches) if start < num_steps else None
      if batch is not None:
        t0 = time.perf_counter()
        compiled = train_step.lower(train_state, batch).compile()
        writer_lib.progress(f"compiled the train step in {time.perf_counter() - t0:.1f} s; {_memory_summary(compiled)}")
        xla_flops_per_step = _executed_flops(compiled, config)
      accumulated, pending = None, None
      t_log, steps_since = time.perf_counter(), 0
      step = start
      while step < num_steps:
        if batch is None:
          batch = next(batches)
        train_state, step_metrics = compiled(train_state, batch)
        batch = None
        step += 1
        steps_since += 1
        if pending is not None:  # previous step's NaN counters: keeps one step in flight
          _check_finite(pending, step - 1, config.training.max_consecutive_nan)
        pending = step_metrics
        single = TrainMetrics.single_from_model_output(**step_metrics)
        accumulated = single if accumulated is None else accumulated.merge(single)
        profiler.step(step)
        stopping = preemption.should_stop(step)
        if itstime(step, config.training.log_every, num_steps, stopping):
          scalars = {k: float(v) for k, v in accumulated.compute().items()}
          elapsed = time.perf_counter() - t_log
          scalars["steps_per_sec"] = steps_since / elapsed
          scalars["voxels_per_sec"] = scalars["steps_per_sec"] * config.training.batch_size * config.data.patch_size**3
          scalars.update(
            throughput.step_metrics(
              scalars["steps_per_sec"], flops_per_step, config.training.batch_size, jax.device_count(), device_kind
            )
          )
          scalars["flops_per_step"] = flops_per_step
          if xla_flops_per_step is not None:
            scalars["xla_flops_per_step"] = xla_flops_per_step
          writer.scalars(step, scalars, prefix=f"{trainee.metric_prefix}/")
          writer_lib.progress(
            f"step {step}/{num_steps}  " + writer_lib.format_scalars(scalars, ("loss", "grad_norm", "steps_per_sec"))
          )
          last, accumulated = scalars, None
          t_log, steps_since = time.perf_counter(), 0
        if itstime(step, config.eval.every_steps, num_steps):
          val = run_eval(eval_step, eval_params(train_state), val_store, config, batch_sharding, schedule.num_timesteps)
          writer.scalars(step, val)
          last_val = val
          writer_lib.progress(f"step {step}/{num_steps}  val/loss {val['val/loss']:.4g}")
        if itstime(step, config.eval.sample_every_steps, num_steps):
          write_samples(preview, eval_params(train_state), val_store, config, batch_sharding, writer, workdir, step)
        if itstime(step, config.checkpoint.every_steps, num_steps, stopping):
          ckpt.save(step, stored(train_state), batches.iterator, config)
        if stopping:
          logging.warning("preempted: checkpoint for step %d saved, exiting", step)
          break
      if pending is not None:
        _check_finite(pending, step, config.training.max_consecutive_nan)
  finally:
    profiler.close()
    preemption.close()
    ckpt.close()
    writer.close()
  writer_lib.progress(
    writer_lib.closing_summary(
      kind="ControlNet fine-tuning" if trainee.external else "pretraining",
      workdir=workdir,
      step=int(train_state.step),
      num_steps=num_steps,
      last=last,
      last_val=last_val,
      checkpoints=ckpt.all_steps(),
      preempted=stopping,
      seconds=time.perf_counter() - t_start,
      samples=bool(config.eval.sample_every_steps),
    )
  )
  return last


def run_eval(eval_step, params, val_store, config, batch_sharding, num_timesteps) -> dict[str, float]:
  """Mean per-bucket validation loss over a fixed set of batches (the same batches every time)."""
  ds = pipeline.make_dataset(
    val_store,
    config.data,
    batch_size=config.training.batch_size,
    seed=12345,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_batches=config.eval.num_batches,
  )
  batches = pipeline.GlobalBatches(ds, batch_sharding)
  total = None
  for i in range(config.eval.num_batches):
    losses = eval_step(params, next(batches), jax.random.key(i))
    total = losses if total is None else total + losses
  values = np.asarray(jax.device_get(total)) / config.eval.num_batches
  out = dict(zip(validation.bucket_names(config.eval.num_buckets, num_timesteps), map(float, values)))
  out["val/loss"] = float(values.mean())
  return out


def write_samples(preview, params, val_store, config, batch_sharding, writer, workdir, step) -> None:
  """Montage (axial/coronal/sagittal) of a generated volume above the real one whose conditions it used.

  Reads one sample per process (the montage shows global sample 0), repeated to the batch the sampler
  is sharded for: the model treats samples independently, so sample 0 is what a full batch would give."""
  per_process = config.training.batch_size // jax.process_count()
  ds = pipeline.make_dataset(
    val_store,
    config.data,
    batch_size=jax.process_count(),
    seed=777,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_batches=1,
  )
  ds = ds.map(lambda b: {k: np.repeat(v, per_process, axis=0) for k, v in b.items()})
  batch = next(pipeline.GlobalBatches(ds, batch_sharding))
  cond = {k: batch[k] for k in conditions.COND_KEYS if k in batch}
  generated = preview(params, jax.random.key(step), cond)
  gen, real = (_to_host(a)[0] for a in (generated, batch[conditions.IMAGE]))
  if jax.process_index() != 0:
    return
  image = montage.slice_montage([gen, real])
  writer.images(step, {"samples/generated_over_real": image})
  montage.save_png(image, storage.join(workdir, "samples", f"step_{step:08d}.png"))


class Profiler:
  """jax.profiler trace of `num_steps` steps into WORKDIR/profile (TensorBoard's profile tab), process 0.

  Starts one step after the first step of this run, so compilation and the first dispatch stay out.
  """

  def __init__(self, workdir: str, start_step: int, num_steps: int):
    self.logdir = storage.join(workdir, "profile")
    self.first, self.last = start_step + 1, start_step + 1 + num_steps
    self.enabled = num_steps > 0 and jax.process_index() == 0
    self.active = False

  def step(self, step: int) -> None:
    """Called after `step` was dispatched."""
    if not self.enabled:
      return
    if step == self.first and not self.active:
      jax.profiler.start_trace(self.logdir)
      self.active = True
    elif step == self.last and self.active:
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      writer_lib.progress(f"profile written to {self.logdir}")


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _check_finite(step_metrics: dict[str, jax.Array], step: int, limit: int) -> None:
  consecutive = int(step_metrics["consecutive_nan"])
  if consecutive:
    logging.warning(
      "step %d: non-finite loss or gradient, update skipped (%d in a row, %d total)",
      step,
      consecutive,
      int(step_metrics["nan_skips"]),
    )
  if consecutive >= limit:
    raise NonFiniteError(
      f"{consecutive} consecutive training steps had a NaN/inf loss or gradient (last at step {step}); "
      f"stopping. Lower config.optimizer.learning_rate, enable grad_clip_norm, or check the data."
    )


def _executed_flops(compiled: Any, config: ml_collections.ConfigDict) -> float | None:
  """XLA's count for the whole step over all devices: the per-device program x devices x accumulation
  steps (the scan body counts once). Remat recompute included, so above `flops_per_step` when remat is on."""
  flops = throughput.xla_flops(compiled)
  return flops * jax.device_count() * config.training.grad_accum_steps if flops is not None else None


def _memory_summary(compiled: Any) -> str:
  try:
    mem = compiled.memory_analysis()
  except Exception:  # not every backend reports it
    mem = None
  if mem is None:
    return "memory analysis unavailable"
  total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  return f"per-device memory {total / 2**20:.1f} MiB (temp {mem.temp_size_in_bytes / 2**20:.1f} MiB)"
