"""Orbax checkpoints holding train state (params, EMA, optimizer, rng, counters), the Grain iterator
state and the config together, written asynchronously.

Restore goes to the newest step that restores cleanly: a truncated or corrupt latest step is reported
and the previous one is used. Orbax commits a step atomically (temporary directory, then rename) and the
preservation policy removes old steps only after a newer one has been committed, so a crash at any
moment leaves at least one complete checkpoint.

The state is restored into the *current* mesh's shardings (a checkpoint from 8 devices restores onto 1
or 16). The Grain iterator state is per process; when the process count changed it cannot be mapped, and
the caller gets `data_restored=False` (see `loop.py`: it then reseeds the data by step).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from meddiff_jax import storage


def abstract_target(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the *current* shardings: the restore target that reshards onto this mesh."""
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


@dataclasses.dataclass
class Restored:
  state: Any
  step: int
  data_restored: bool
  config: dict[str, Any] | None


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
        "data": grain.checkpoint.CheckpointHandler(),
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

  def save(self, step: int, state: Any, data_iterator: Any | None, config: Any) -> None:
    items = {
      "state": ocp.args.StandardSave(state),
      "config": ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
    }
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore_latest(self, abstract_state: Any, data_iterator: Any | None) -> Restored | None:
    """Newest restorable step, or None when the directory has none."""
    for step in reversed(self.all_steps()):
      try:
        restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore())
        )
      except Exception as e:  # a truncated/corrupt step: fall back to the previous one
        logging.warning(
          "checkpoint step %d in %s does not restore (%s: %s); trying an earlier step",
          step,
          self.directory,
          type(e).__name__,
          e,
        )
        continue
      data_ok = False
      if data_iterator is not None:
        try:
          self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
          data_ok = True
        except Exception as e:  # e.g. a different number of processes than when saved
          logging.warning(
            "data iterator state of step %d not restored (%s: %s); the data stream is reseeded by step instead",
            step,
            type(e).__name__,
            e,
          )
      return Restored(state=restored["state"], step=step, data_restored=data_ok, config=restored["config"])
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
