"""Orbax checkpoints holding train state (params, EMA, optimizer, rng, counters), the data stream's position
and the config together, written asynchronously.

Orbax commits a step atomically (temporary directory, then rename) and the preservation policy removes old
steps only after a newer one has been committed, so a crash at any moment leaves at least one complete
checkpoint. Restoring (`resume`, what the training loop calls) never loses a run:
  - every process tries the same steps (process 0's listing) newest first and takes a step only when all of
    them restored it (a collective), so a corrupt newest step falls back to the previous one everywhere
    alike, with a warning;
  - a step saved with another model (a differing architecture key of the stored config) is not restored: it
    would not fit, or would fit and mean something else;
  - a workdir whose checkpoints none restores is a one-line UnrestorableError naming the newest step and
    why, unless config.checkpoint.on_unrestorable='start_fresh', which moves them aside (nothing is
    deleted) and starts from step 0. A run that did not restore never saves into a directory holding
    another run's steps, so the retention policy cannot delete them.

The state is restored into the *current* mesh's shardings (a checkpoint from 8 devices restores onto 1
or 16). The stream position (data/pipeline.GlobalBatches.state) is the same on every process, so any process
count continues the same stream; checkpoints written before it existed held per-process Grain iterator states
(item 'data', not read: `Restored.stream` is None and the caller derives the position from the step).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from meddiff_jax import storage

# config.checkpoint.on_unrestorable: what a run does with a workdir whose checkpoints none restores
ON_UNRESTORABLE = ("fail", "start_fresh")
# Config sections that define the network: a checkpoint saved under other values is another model, even where
# its arrays happen to fit (model.num_head_channels, model.norm_groups). The keys in NOT_ARCHITECTURE only change
# how the same params compute or train, and may differ on resume.
ARCHITECTURE_SECTIONS = ("model", "controlnet")
NOT_ARCHITECTURE = (
  "model.dtype",
  "model.param_dtype",
  "model.remat",
  "model.conv_impl",
  "model.dropout",
  "controlnet.conditioning_scale",
)


class UnrestorableError(ValueError):
  """The checkpoint directory holds steps and none of them restores into this run (one line: why)."""


def abstract_target(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the *current* shardings: the restore target that reshards onto this mesh."""
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


@dataclasses.dataclass
class Restored:
  state: Any
  step: int
  config: dict[str, Any] | None
  stream: dict[str, int] | None  # the data stream's position; None: a checkpoint from before it was saved


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with items state / data / config."""

  def __init__(self, directory: str, *, keep: int = 3, asynchronous: bool = True):
    """`directory`: local, gs:// or s3:// (Orbax writes arrays with TensorStore, metadata with etils.epath)."""
    self.directory = storage.checkpoint_path(directory)
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(n=max(keep, 1)),
      enable_async_checkpointing=asynchronous,
      create=True,
    )
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "stream": ocp.JsonCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
      },
    )

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_config(self) -> dict[str, Any]:
    """The config JSON saved with the newest step (enough to rebuild the model before restoring it)."""
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"{self.directory}: no checkpoints")
    return self.manager.restore(steps[-1], args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def read_state_fields(self, targets: dict[str, Any]) -> dict[str, Any]:
    """Only the named fields of the newest step's train state (e.g. {'ema_params': abstract tree}),
    restored against ShapeDtypeStruct targets: nothing else (optimizer moments) is read or allocated."""
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"{self.directory}: no checkpoints")
    path = storage.join(self.directory, str(steps[-1]), "state")
    with ocp.PyTreeCheckpointer() as reader:
      return reader.restore(
        path,
        args=ocp.args.PyTreeRestore(
          item=targets, restore_args=ocp.checkpoint_utils.construct_restore_args(targets), partial_restore=True
        ),
      )

  def save(self, step: int, state: Any, stream: dict[str, int] | None, config: Any) -> None:
    """`stream`: the data stream's position (data/pipeline.GlobalBatches.state), the same on every process."""
    items = {
      "state": ocp.args.StandardSave(state),
      "config": ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
    }
    if stream is not None:
      items["stream"] = ocp.args.JsonSave(stream)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def agreed_steps(self) -> list[int]:
    """The committed steps as process 0 lists them (an object store may list late on another host)."""
    steps = self.all_steps()
    if jax.process_count() == 1:
      return steps
    from jax.experimental import multihost_utils

    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
    mine = np.asarray(steps if jax.process_index() == 0 else [0] * n, np.int32)
    return [int(s) for s in multihost_utils.broadcast_one_to_all(mine)] if n else []

  def restore_latest(self, abstract_state: Any, config: Any | None = None) -> Restored | None:
    """The newest step every process restores, or None when the directory has no steps. Steps newer than
    it (they did not restore) are moved aside, so that this run's saves cannot collide with them. Raises
    UnrestorableError when none restores. `config` (this run's): a step whose stored config has other
    architecture keys is refused, key by key, before its arrays are read. The stream position comes with it
    (the same on every process)."""
    steps = self.agreed_steps()
    failures: list[tuple[int, str]] = []
    for step in reversed(steps):
      state, stored, why = self._restore_step(step, abstract_state, config)
      if _on_every_process(why is None):
        if failures:
          aside = self.set_aside([s for s, _ in failures])
          logging.warning(
            "%s: newest step %d does not restore (%s); resumed from step %d; the steps %s that did not restore "
            "were moved to %s",
            self.directory,
            *failures[0],
            step,
            [s for s, _ in failures],
            aside,
          )
        if config is not None and stored is not None:
          changes = config_changes(stored, config)
          if changes:
            logging.warning("resuming step %d with config changes: %s", step, "; ".join(changes))
        return Restored(state=state, step=step, config=stored, stream=self.read_stream(step))
      why = why or "restored here but not on every process (their logs say why)"
      logging.warning("checkpoint step %d in %s %s; trying an earlier step", step, self.directory, why)
      failures.append((step, why))
    if not failures:
      return None
    newest, why = failures[0]
    raise UnrestorableError(
      f"{self.directory}: none of the checkpointed steps {steps} restores into this run; the newest, step "
      f"{newest}, {why}"
    )

  def _restore_step(self, step: int, abstract_state: Any, config: Any | None) -> tuple[Any, Any, str | None]:
    """(state, stored config, None), or (None, None, why not). Orbax's handlers directly, not the manager's
    restore: that ends in a barrier only the processes that succeeded would reach."""
    step_dir = epath.Path(self.directory) / str(step)
    try:
      stored = ocp.JsonCheckpointHandler().restore(step_dir / "config", args=ocp.args.JsonRestore())
    except Exception as e:  # a truncated / unreadable step
      return None, None, f"has no readable config ({_first_line(e)})"
    if config is not None:
      changed = architecture_changes(stored, config)
      if changed:
        return None, None, f"was saved with another model: {changed}"
    try:
      state = ocp.StandardCheckpointHandler().restore(step_dir / "state", args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # corrupt or truncated arrays, or a state tree of another shape
      return None, None, f"does not restore into this run's state ({_first_line(e)})"
    return state, stored, None

  def set_aside(self, steps: list[int]) -> str:
    """Moves these steps to DIRECTORY.set_aside.TIME/STEP (nothing is deleted); returns that directory."""
    self.manager.wait_until_finished()
    stamp = int(time.time())
    if jax.process_count() > 1:  # one name on every process
      from jax.experimental import multihost_utils

      stamp = int(multihost_utils.broadcast_one_to_all(np.int32(stamp)))  # seconds fit int32 until 2038
    aside = f"{self.directory.rstrip('/')}.set_aside.{time.strftime('%Y%m%d-%H%M%S', time.gmtime(stamp))}"
    if jax.process_index() == 0:
      for step in steps:
        storage.move(storage.join(self.directory, str(step)), storage.join(aside, str(step)))
    _barrier("meddiff_checkpoint_set_aside")
    self.manager.reload()
    return aside

  def read_stream(self, step: int) -> dict[str, int] | None:
    """The data stream position saved with `step`, or None when it has none (written before it was saved).
    Orbax's handler directly, not the manager's restore (no barrier: every process reads the same file)."""
    path = storage.join(self.directory, str(step), "stream")
    if not storage.exists(path):
      return None
    return ocp.JsonCheckpointHandler().restore(epath.Path(path), args=ocp.args.JsonRestore())

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def resume(
  ckpt: Checkpointer,
  abstract_state: Any,
  config: Any,
  *,
  restore: bool,
  on_unrestorable: str,
) -> Restored | None:
  """A training run's restore, the same on every process: the newest step that restores (config.restore),
  None when there is nothing to restore; UnrestorableError when the directory holds steps this run would
  not restore (none restores, or config.restore=False), unless config.checkpoint.on_unrestorable is
  'start_fresh': then they are moved aside and the run starts from step 0. `config`: the ConfigDict saved with
  this run's checkpoints (compared key by key with the stored ones)."""
  if restore:
    try:
      return ckpt.restore_latest(abstract_state, config)
    except UnrestorableError as e:
      problem = str(e)
  else:
    steps = ckpt.agreed_steps()
    if not steps:
      return None
    problem = f"{ckpt.directory}: config.restore=False, and it holds the steps {steps} of another run"
  if on_unrestorable != "start_fresh":
    raise UnrestorableError(
      f"{problem}. Nothing was changed: use another --workdir, or --config.checkpoint.on_unrestorable=start_fresh "
      "to move these checkpoints aside and start from step 0"
    )
  aside = ckpt.set_aside(ckpt.agreed_steps())
  logging.warning("%s; moved to %s (checkpoint.on_unrestorable=start_fresh); starting from step 0", problem, aside)
  return None


def architecture_changes(stored: dict[str, Any], config: Any) -> str:
  """'model.base_channels 8 -> 16; ...' for the architecture keys in which a stored config (JSON) differs
  from `config`; '' when none does. Keys the stored config predates are not compared."""
  saved, current = _flat(stored), _flat(json.loads(config.to_json_best_effort()))
  changed = [
    f"{k} {saved[k]!r} -> {current[k]!r}"
    for k in sorted(saved.keys() & current.keys())
    if k.split(".")[0] in ARCHITECTURE_SECTIONS and k not in NOT_ARCHITECTURE and saved[k] != current[k]
  ]
  return "; ".join(changed)


def config_changes(stored: dict[str, Any], config: Any) -> list[str]:
  """Every key in which `config` differs from a stored config ('training.num_steps 20 -> 40')."""
  saved, current = _flat(stored), _flat(json.loads(config.to_json_best_effort()))
  return [
    f"{k} {saved.get(k)!r} -> {current.get(k)!r}"
    for k in sorted(saved.keys() | current.keys())
    if saved.get(k) != current.get(k)
  ]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _first_line(e: BaseException) -> str:
  """The exception in one short line (TensorStore's messages run on with a spec dump)."""
  text = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
  return f"{type(e).__name__}: {text[:240]}"


def _on_every_process(ok: bool) -> bool:
  """True when `ok` holds on every process (a collective every process must reach)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
