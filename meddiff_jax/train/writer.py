"""Metric writing: TensorBoard event files and WORKDIR/metrics.jsonl, on process 0, through
`meddiff_jax.storage` (so the workdir may be local, gs://, s3:// or memory://).

Summaries are built with tensorboardX's proto helpers and framed as TFRecords exactly as its
EventFileWriter does; the file itself goes through our path layer rather than tensorboardX's (local or
google-cloud-storage / boto3 only). No `add_hparams`: it writes a sub-run folder named by a float
timestamp; the config goes in as a text summary instead.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from meddiff_jax import storage


def _tensorboardx():
  """tensorboardX's (summary, event_pb2, masked_crc32c), imported when a writer first needs them: importing
  tensorboardX imports torch when it is installed (seconds), which every command would pay at start-up."""
  from tensorboardX import summary
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c

  return summary, event_pb2, masked_crc32c


def _record(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC32C, payload, its masked CRC32C (little-endian)."""
  masked_crc32c = _tensorboardx()[2]
  header = struct.pack("<Q", len(data))
  return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class EventFile:
  """A TensorBoard event file `events.out.tfevents.<time>.<host>.<ns>` in `logdir`."""

  def __init__(self, logdir: str, *, flush_interval_s: float = 30.0):
    now = time.time_ns()  # the sub-second suffix keeps two writers started in one second apart
    name = f"events.out.tfevents.{now // 10**9:010d}.{socket.gethostname()}.{now % 10**9:09d}"
    self.path = storage.join(logdir, name)
    self._out = storage.Appender(self.path, min_interval_s=flush_interval_s)
    self._event = _tensorboardx()[1].Event
    self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event: Any) -> None:
    self._out.write(_record(event.SerializeToString()))

  def add(self, step: int, summary: Any) -> None:
    self._write(self._event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self) -> None:
    self._out.flush()

  def close(self) -> None:
    self._out.close()


class MetricWriter:
  """Scalars to TensorBoard and metrics.jsonl, images to TensorBoard, the config as text; process 0 only.

  metrics.jsonl gets one JSON line per `scalars` call. After a resume, re-run steps are appended again:
  the last line for a step is the one that counts.
  """

  def __init__(self, workdir: str, *, enabled: bool | None = None, flush_interval_s: float = 30.0):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.jsonl_path = storage.join(workdir, "metrics.jsonl")
    self.events: EventFile | None = None
    self._jsonl: storage.Appender | None = None
    if self.enabled:
      self.events = EventFile(workdir, flush_interval_s=flush_interval_s)
      self._jsonl = storage.Appender(self.jsonl_path, min_interval_s=flush_interval_s)

  def scalars(self, step: int, values: Mapping[str, float], *, prefix: str = "") -> None:
    """TensorBoard tags get `prefix`; the JSONL line keeps the bare keys (what notebooks/tests read)."""
    if not self.enabled:
      return
    for key, value in values.items():
      self.events.add(step, _tensorboardx()[0].scalar(prefix + key, float(value)))
    self._jsonl.write((json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n").encode())
    self._jsonl.flush()  # local: visible at once; object store: at most every flush_interval_s

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """(H, W, 3) uint8 images."""
    if not self.enabled:
      return
    for key, value in images.items():
      self.events.add(step, _tensorboardx()[0].image(key, np.asarray(value), dataformats="HWC"))

  def text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self.events.add(step, _tensorboardx()[0].text(tag, text))

  def config(self, config: Any) -> None:
    """The run's config as a TensorBoard text summary (markdown code block)."""
    self.text(0, "config", "```\n" + config.to_json_best_effort(indent=1) + "\n```")

  def flush(self) -> None:
    if self.enabled:
      self.events.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.events.close()
      self._jsonl.close()
      self.enabled = False


def progress(message: str) -> None:
  """Our own progress line (stdout, process 0); library logs stay at WARNING unless --verbosity asks."""
  if jax.process_index() == 0:
    print(message, flush=True)


def format_scalars(values: Mapping[str, float], keys: tuple[str, ...]) -> str:
  return "  ".join(f"{k} {values[k]:.4g}" for k in keys if k in values)


def closing_summary(
  *,
  kind: str,
  workdir: str,
  step: int,
  num_steps: int,
  last: Mapping[str, float],
  last_val: Mapping[str, float],
  checkpoints: list[int],
  preempted: bool,
  seconds: float,
  samples: bool = False,
) -> str:
  """The lines a run ends on: what ran, final losses, where everything is, how to look at it."""
  state = "preempted at" if preempted else "finished at"
  lines = [f"{kind} {state} step {step}/{num_steps} in {seconds:.0f} s."]
  finals = format_scalars(last, ("loss", "loss_std", "grad_norm"))
  if finals:
    lines.append(f"  final train: {finals}")
  if "val/loss" in last_val:
    lines.append(f"  final val/loss {last_val['val/loss']:.4g}")
  lines.append(f"  checkpoints: {storage.join(workdir, 'checkpoints')} (steps {checkpoints})")
  if samples:
    lines.append(f"  samples:     {storage.join(workdir, 'samples')}")
  lines.append(f"  metrics:     {storage.join(workdir, 'metrics.jsonl')}")
  lines.append(f"  events:      {workdir} (tensorboard --logdir {workdir})")
  return "\n".join(lines)
