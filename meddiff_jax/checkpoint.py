"""Orbax checkpoints holding train state (params, EMA, optimizer, rng, counters), the data stream's position
and the config together, written asynchronously.

Restore goes to the newest step that restores cleanly: a truncated or corrupt latest step is reported
and the previous one is used. Orbax commits a step atomically (temporary directory, then rename) and the
preservation policy removes old steps only after a newer one has been committed, so a crash at any
moment leaves at least one complete checkpoint.

The state is restored into the *current* mesh's shardings (a checkpoint from 8 devices restores onto 1
or 16). The stream position (data/pipeline.GlobalBatches.state) is the same on every process, so any process
count continues the same stream; checkpoints written before it existed held per-process Grain iterator states
(item 'data', not read: `Restored.stream` is None and the caller derives the position from the step).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

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

  def restore_latest(self, abstract_state: Any) -> Restored | None:
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
      return Restored(state=restored["state"], step=step, config=restored["config"], stream=self.read_stream(step))
    return None

  def read_stream(self, step: int) -> dict[str, int] | None:
    """The data stream position saved with `step`, or None when it has none (written before it was saved)."""
    if not storage.exists(storage.join(self.directory, str(step), "stream")):
      return None
    return self.manager.restore(step, args=ocp.args.Composite(stream=ocp.args.JsonRestore()))["stream"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
