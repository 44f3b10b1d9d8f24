"""The training loop (pretraining and ControlNet fine-tuning): `setup` (mesh, sharded state, data) ->
`restore` -> `jit_steps` / `compile_train_step` (AOT) -> steps with `TrainLog` metrics, eval, samples,
checkpoints; SIGTERM (preemption) saves and exits cleanly.

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
import optax
from absl import logging

from meddiff_jax import checkpoint, pretrained, sharding, storage
from meddiff_jax.data import pipeline, workers
from meddiff_jax.diffusion import schedules
from meddiff_jax.evaluation import montage
from meddiff_jax.models import conditions, trainable, unet3d
from meddiff_jax.train import state as state_lib
from meddiff_jax.train import step as step_lib
from meddiff_jax.train import throughput, validation
from meddiff_jax.train import writer as writer_lib
from meddiff_jax.train.metrics import TrainMetrics
from meddiff_jax.train.spec import PretrainConfig

# jax's persistent cache keeps compiles that took at least this long (trivial jits would cost an object-store
# round trip each); every size of entry is kept. jax's defaults, which maxtext / maxdiffusion run with.
CACHE_MIN_COMPILE_TIME_S = 1.0
CACHE_MIN_ENTRY_SIZE_BYTES = 0


def configure_compilation_cache(setting: str, workdir: str | None) -> str | None:
  """Point jax's persistent compilation cache at `setting` (config.compilation_cache_dir): 'auto' is
  WORKDIR/compilation_cache on accelerators (a restarted or preempted job loads its compiled steps back) and
  off on CPU; '' is off. Returns the directory in use, or None."""
  if setting == "auto":
    setting = storage.join(workdir, "compilation_cache") if workdir and jax.default_backend() != "cpu" else ""
  if not setting:
    return None
  jax.config.update("jax_compilation_cache_dir", setting)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_TIME_S)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", CACHE_MIN_ENTRY_SIZE_BYTES)
  return setting


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


def pretraining(config: PretrainConfig) -> Trainee:
  model = unet3d.UNet3D(config.model)
  init_fn = pretrained.init_params_fn(model, config.model, config.data.patch_size)
  return Trainee(model.apply, init_fn, config.diffusion.make_schedule())


def itstime(step: int, every: int, total: int, stopping: bool = False) -> bool:
  """A periodic action is due after `step`: every `every` steps, at the last step, and (when `stopping`
  is passed) before a preempted run exits. every=0 switches the action off."""
  return bool(every) and (step % every == 0 or step == total or stopping)


def init_state(
  config: PretrainConfig, trainee: Trainee, mesh: jax.sharding.Mesh, rules: Any
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


@dataclasses.dataclass
class Run:
  """A training run set up (`setup`): the mesh, the state's layout and optimizer, the data (the state itself is
  not held here: restoring replaces it, and the fresh one must be freed then)."""

  config: PretrainConfig
  workdir: str
  trainee: Trainee
  mesh: jax.sharding.Mesh
  rules: tuple
  shardings: state_lib.TrainState
  labels: dict  # trainable / frozen per leaf (models/trainable.py)
  tx: optax.GradientTransformation
  train_store: pipeline.VolumeStore
  val_store: pipeline.VolumeStore
  batch_layout: dict[str, jax.ShapeDtypeStruct]  # the global batch: shapes, dtypes, shardings (volumes by depth too)
  batch_sharding: dict[str, Any]  # batch_layout's shardings
  stored_config: ml_collections.ConfigDict  # saved with every checkpoint: config.stored(training spacing)
  flops_per_step: float  # model FLOPs by which parts train

  def batches(self, first_sample: int = 0) -> pipeline.GlobalBatches:
    """The training stream (config.seed) from global sample `first_sample` on, as global sharded arrays of which
    this process loads its part."""
    return pipeline.GlobalBatches(
      self.train_store, self.config.data, self.batch_layout, seed=self.config.seed, first_sample=first_sample
    )

  def checkpointed(self, tree: Any) -> Any:
    """A state (or its shardings) as checkpoints hold it: without the frozen params loaded from elsewhere
    (the ControlNet base)."""
    return tree.replace(params=state_lib.checkpoint_split(tree.params, self.labels, self.trainee.external)[0])

  def eval_params(self, tree: Any) -> Any:
    """What validation and previews run: the EMA of the trained leaves with the frozen leaves as they are."""
    return trainable.merge(trainable.split(tree.params, self.labels)[1], tree.ema_params)


def setup(config: PretrainConfig, workdir: str, trainee: Trainee | None = None) -> tuple[Run, state_lib.TrainState]:
  """(the run: mesh, trainee (default: pretraining), shardings, stores, batch layout for `config` in `workdir`;
  the freshly initialised sharded state)."""
  storage.makedirs(workdir)
  mesh = sharding.make_mesh(config.mesh.sizes)
  rules = config.sharding.logical_rules
  trainee = trainee or pretraining(config)
  state, shardings, labels, tx = init_state(config, trainee, mesh, rules)
  writer_lib.progress(
    f"model {unet3d.count_params(state.params):,} params ({unet3d.count_params(state.ema_params):,} trained); "
    f"mesh {dict(mesh.shape)} on {jax.device_count()} devices ({jax.process_count()} processes); workdir {workdir}"
  )
  # model FLOPs by which parts train (a ControlNet's config.model is its base's: train/controlnet.derive_config)
  flops_per_step = throughput.flops_for_config(config, labels)
  logging.info("%.3g model FLOPs per step; %s", flops_per_step, throughput.describe_peak(jax.devices()[0].device_kind))
  store = pipeline.make_store(config.data)
  stored_config = ml_collections.ConfigDict(config.stored(config.data.training_spacing(store.records)))
  train_store, val_store = pipeline.split_train_val(store, config.data.val_fraction)
  config = dataclasses.replace(config, data=size_pipeline(config, train_store, flops_per_step))
  # the shipped batch (data.decode_on_device: HU and label codes, finished inside the jitted steps)
  batch_layout = sharding.input_layout(mesh, rules, step_lib.batch_spec(config))  # volumes: also by depth
  run = Run(
    config,
    workdir,
    trainee,
    mesh,
    rules,
    shardings,
    labels,
    tx,
    train_store,
    val_store,
    batch_layout,
    {k: x.sharding for k, x in batch_layout.items()},
    stored_config,
    flops_per_step,
  )
  return run, state


def size_pipeline(config: PretrainConfig, train_store: pipeline.VolumeStore, flops_per_step: float) -> Any:
  """config.data with its 'auto' workers / threads / read-ahead resolved for this process (data/workers.py: the
  cores it may use, the processes on its host, the store's place, memory), said once with the samples/s to expect
  (sample CPU measured on a few samples here) against what the step consumes at 40% MFU (known device kinds)."""
  data = config.data
  per_process = config.training.batch_size // jax.process_count()
  read = workers.plan(
    data,
    workers.batch_bytes(data.sample_spec(), per_process),
    processes_per_host=workers.processes_on_this_host(),
  )
  cpu_s = workers.cpu_seconds_per_sample(pipeline.MultiLevelSample(train_store, data.sample_spec()), len(train_store))
  step_s = throughput.projected_step_s(flops_per_step, jax.device_count(), jax.devices()[0].device_kind)
  consumed = config.training.batch_size / step_s / jax.process_count() if step_s else None
  writer_lib.progress(read.describe(cpu_s, consumed))
  return dataclasses.replace(data, worker_count=read.worker_count, num_threads=read.num_threads, prefetch=read.prefetch)


def restore(
  run: Run, ckpt: checkpoint.Checkpointer, train_state: state_lib.TrainState
) -> tuple[state_lib.TrainState, int]:
  """The newest checkpoint of `ckpt` that restores on every process, if any (checkpoint.resume: a workdir whose
  checkpoints none restores is an error unless config.checkpoint.on_unrestorable='start_fresh'): its state (with
  the frozen params loaded from elsewhere) and the data stream's position there (the first global sample of the
  next batch; 0 without a checkpoint)."""
  restored = checkpoint.resume(
    ckpt,
    checkpoint.abstract_target(run.checkpointed(train_state), run.checkpointed(run.shardings)),
    run.stored_config,
    restore=run.config.restore,
    on_unrestorable=run.config.checkpoint.on_unrestorable,
  )
  if restored is None:
    return train_state, 0
  left_out = state_lib.checkpoint_split(train_state.params, run.labels, run.trainee.external)[1]
  train_state = restored.state.replace(params=trainable.merge(restored.state.params, left_out))
  writer_lib.progress(f"resumed from step {restored.step} in {ckpt.directory}")
  return train_state, stream_position(restored, run.config.training.batch_size)


def stream_position(restored: checkpoint.Restored, batch_size: int) -> int:
  """Where the data stream continues after `restored`: the position it saved (the same for any process count),
  or, for a checkpoint written before positions were saved (per-process Grain iterator states, which cannot be
  mapped onto this stream), the samples consumed so far: step x its batch size (default `batch_size`)."""
  if restored.stream is not None:
    return int(restored.stream["next_sample"])
  batch_size = int(((restored.config or {}).get("training") or {}).get("batch_size", batch_size))
  logging.warning(
    "checkpoint step %d has no data stream position (written by an older version, with per-process Grain "
    "iterator states): the stream continues at sample %d (step x batch size %d)",
    restored.step,
    restored.step * batch_size,
    batch_size,
  )
  return restored.step * batch_size


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted functions of a run: the train step (state donated), validation loss, preview sampler
  (`compile_steps` replaces them by their compiled versions), and the shipped batch -> the model's batch
  (data.decode_on_device; the train and validation steps do it inside)."""

  train: Any
  eval: Any
  preview: Any
  decode: Any


def jit_steps(run: Run) -> Steps:
  config, trainee = run.config, run.trainee
  step_fn = step_lib.make_train_step(trainee.apply_fn, trainee.schedule, run.tx, config, run.rules, run.labels)
  train_step = step_lib.jit_train_step(step_fn, run.shardings, run.batch_sharding, run.mesh, run.labels)
  finish = step_lib.decode_inputs(config, run.rules)
  eval_step = jax.jit(
    validation.make_eval_step(
      trainee.apply_fn, trainee.schedule, config.diffusion, config.eval.num_buckets, finish=finish
    ),
    in_shardings=(run.eval_params(run.shardings), run.batch_sharding, None),
    out_shardings=sharding.replicated(run.mesh),  # read back on every process
  )
  preview = jax.jit(
    validation.make_preview_sampler(
      trainee.apply_fn, trainee.schedule, config.diffusion, config.data.patch_size, config.eval.sample_steps
    )
  )
  return Steps(train_step, eval_step, preview, jax.jit(finish, in_shardings=(run.batch_sharding,)))


def compile_steps(run: Run, steps: Steps, train_state: state_lib.TrainState, batch: dict) -> tuple[Steps, Any]:
  """`steps` compiled ahead of time for this state and the batch layout (validation and preview only when the
  config runs them), so that no step time in the log includes a compile; and XLA's FLOPs per train step. Inside
  `sharding.activate`."""
  train, xla_flops = compile_train_step(run, steps.train, train_state, batch)
  eval_step, preview = steps.eval, steps.preview
  t0 = time.perf_counter()
  params = run.eval_params(train_state)
  key = jax.random.key(0)
  if run.config.eval.every_steps:
    eval_step = eval_step.lower(params, run.batch_layout, key).compile()
  if run.config.eval.sample_every_steps:
    decoded = steps.decode(batch)  # the model's batch (its layout is the preview's: write_samples decodes alike)
    cond = {k: decoded[k] for k in conditions.COND_KEYS if k in decoded}
    preview = preview.lower(params, key, cond).compile()
  if run.config.eval.every_steps or run.config.eval.sample_every_steps:
    writer_lib.progress(f"compiled validation and preview in {time.perf_counter() - t0:.1f} s")
  return Steps(train, eval_step, preview, steps.decode), xla_flops


def compile_train_step(run: Run, train_step: Any, train_state: state_lib.TrainState, batch: dict) -> tuple[Any, Any]:
  """(the compiled step, XLA's FLOPs per step) for this state and batch layout; says how long and how much
  memory. Inside `sharding.activate`."""
  t0 = time.perf_counter()
  compiled = train_step.lower(train_state, batch).compile()
  writer_lib.progress(f"compiled the train step in {time.perf_counter() - t0:.1f} s; {_memory_summary(compiled)}")
  return compiled, _executed_flops(compiled, run.config)


class TrainLog:
  """The training scalars: accumulated over the steps between log points, then written (TensorBoard,
  metrics.jsonl) with the throughput of the interval, and printed as one progress line."""

  def __init__(self, run: Run, writer: writer_lib.MetricWriter, xla_flops_per_step: float | None):
    self.run, self.writer, self.xla_flops_per_step = run, writer, xla_flops_per_step
    self.device_kind = jax.devices()[0].device_kind
    self.accumulated: TrainMetrics | None = None
    self.t_log, self.steps_since = time.perf_counter(), 0
    self.data_wait_s = 0.0  # time the loop waited for batches since the last log (train_and_evaluate adds to it)
    self.last: dict[str, float] = {}

  def add(self, step_metrics: dict[str, jax.Array]) -> None:
    single = TrainMetrics.single_from_model_output(**step_metrics)
    self.accumulated = single if self.accumulated is None else self.accumulated.merge(single)
    self.steps_since += 1

  def write(self, step: int) -> dict[str, float]:
    config, flops = self.run.config, self.run.flops_per_step
    scalars = {k: float(v) for k, v in self.accumulated.compute().items()}
    elapsed = time.perf_counter() - self.t_log
    scalars["steps_per_sec"] = self.steps_since / elapsed
    # the share of the interval the loop waited for input: near 1, the devices starve (more data.worker_count)
    scalars["data_wait_fraction"] = min(1.0, self.data_wait_s / elapsed)
    scalars["voxels_per_sec"] = scalars["steps_per_sec"] * config.training.batch_size * config.data.patch_size**3
    scalars.update(
      throughput.step_metrics(
        scalars["steps_per_sec"], flops, config.training.batch_size, jax.device_count(), self.device_kind
      )
    )
    scalars["flops_per_step"] = flops
    if self.xla_flops_per_step is not None:
      scalars["xla_flops_per_step"] = self.xla_flops_per_step
    self.writer.scalars(step, scalars, prefix=f"{self.run.trainee.metric_prefix}/")
    writer_lib.progress(
      f"step {step}/{config.training.num_steps}  "
      + writer_lib.format_scalars(scalars, ("loss", "grad_norm", "steps_per_sec", "data_wait_fraction"))
    )
    self.last, self.accumulated = scalars, None
    self.t_log, self.steps_since, self.data_wait_s = time.perf_counter(), 0, 0.0
    return scalars


def train_and_evaluate(config: PretrainConfig, workdir: str, trainee: Trainee | None = None) -> dict[str, float]:
  """Runs (or resumes) training, pretraining unless a trainee is given; returns the last logged metrics.

  `config` is checked and typed by the entry point (checks.pretrain / checks.controlnet); not again here."""
  t_start = time.perf_counter()
  run, train_state = setup(config, workdir, trainee)
  config, trainee = run.config, run.trainee  # the data section's 'auto' parallelism resolved
  ckpt = checkpoint.Checkpointer(
    storage.join(workdir, "checkpoints"), keep=config.checkpoint.keep, asynchronous=config.checkpoint.asynchronous
  )
  train_state, first_sample = restore(run, ckpt, train_state)
  batches = run.batches(first_sample)
  steps = jit_steps(run)

  writer = writer_lib.MetricWriter(workdir)
  num_steps = config.training.num_steps
  preemption = PreemptionWatcher()
  start = int(train_state.step)
  profiler = Profiler(workdir, start, config.training.profile_steps)
  if start == 0:
    writer.config(run.stored_config)
  log = TrainLog(run, writer, None)
  last_val: dict[str, float] = {}
  stopping = False
  try:
    with sharding.activate(run.mesh, run.rules):
      batch = next(batches) if start < num_steps else None
      if batch is not None:
        steps, log.xla_flops_per_step = compile_steps(run, steps, train_state, batch)
      log.t_log, log.data_wait_s, pending = time.perf_counter(), 0.0, None
      step = start
      while step < num_steps:
        if batch is None:
          t_wait = time.perf_counter()
          batch = next(batches)  # the host's next batch, on the devices (the previous step runs meanwhile)
          log.data_wait_s += time.perf_counter() - t_wait
        train_state, step_metrics = steps.train(train_state, batch)
        batch = None
        step += 1
        if pending is not None:  # previous step's NaN counters: keeps one step in flight
          _check_finite(pending, step - 1, config.training.max_consecutive_nan)
        pending = step_metrics
        log.add(step_metrics)
        profiler.step(step)
        stopping = preemption.should_stop(step)
        if itstime(step, config.training.log_every, num_steps, stopping):
          log.write(step)
        if itstime(step, config.eval.every_steps, num_steps):
          params = run.eval_params(train_state)
          val = run_eval(steps.eval, params, run.val_store, config, run.batch_layout, trainee.schedule.num_timesteps)
          writer.scalars(step, val)
          last_val = val
          writer_lib.progress(f"step {step}/{num_steps}  val/loss {val['val/loss']:.4g}")
        if itstime(step, config.eval.sample_every_steps, num_steps):
          params = run.eval_params(train_state)
          write_samples(
            steps.preview, steps.decode, params, run.val_store, config, run.batch_layout, writer, workdir, step
          )
        if itstime(step, config.checkpoint.every_steps, num_steps, stopping):
          ckpt.save(step, run.checkpointed(train_state), batches.state(), run.stored_config)
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
      last=log.last,
      last_val=last_val,
      checkpoints=ckpt.all_steps(),
      preempted=stopping,
      seconds=time.perf_counter() - t_start,
      samples=bool(config.eval.sample_every_steps),
    )
  )
  return log.last


VALIDATION_SEED = 12345  # the validation batches' stream (the same batches every time)
PREVIEW_SEED = 777  # the previews' stream: its sample 0 is what every preview shows


def run_eval(
  eval_step: Any,
  params: Any,
  val_store: pipeline.VolumeStore,
  config: PretrainConfig,
  batch_layout: dict[str, jax.ShapeDtypeStruct],
  num_timesteps: int,
) -> dict[str, float]:
  """Mean per-bucket validation loss over a fixed set of batches (the same batches every time, whatever the
  process layout; each process loads its part of them)."""
  batches = pipeline.GlobalBatches(
    val_store, config.data, batch_layout, seed=VALIDATION_SEED, num_batches=config.eval.num_batches
  )
  total = None
  for i in range(config.eval.num_batches):
    losses = eval_step(params, next(batches), jax.random.key(i))
    total = losses if total is None else total + losses
  values = np.asarray(jax.device_get(total)) / config.eval.num_batches
  out = dict(zip(validation.bucket_names(config.eval.num_buckets, num_timesteps), map(float, values)))
  out["val/loss"] = float(values.mean())
  return out


def write_samples(
  preview: Any,
  decode: Any,
  params: Any,
  val_store: pipeline.VolumeStore,
  config: PretrainConfig,
  batch_layout: dict[str, jax.ShapeDtypeStruct],
  writer: writer_lib.MetricWriter,
  workdir: str,
  step: int,
) -> None:
  """Montage (axial/coronal/sagittal) of a generated volume above the real one whose conditions it used.

  The montage shows sample 0 of the preview stream, repeated to the batch the sampler is laid out for (the
  model treats samples independently, so sample 0 is what a full batch would give); each process reads it
  once, and keeps the slabs its devices hold."""
  batch = next(
    pipeline.GlobalBatches(
      val_store, config.data, batch_layout, seed=PREVIEW_SEED, repeat=config.training.batch_size, num_batches=1
    )
  )
  batch = decode(batch)
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


def _executed_flops(compiled: Any, config: PretrainConfig) -> float | None:
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
