"""Metric writing: event files TensorBoard itself reads back, metrics.jsonl, the closing summary, and a
training run whose stdout is ours (no library INFO logs) and whose workdir has no stray folders."""

import json
import os
import pathlib

import ml_collections
import numpy as np
import pytest
from conftest import run_main
from tensorboard.backend.event_processing import event_accumulator

from meddiff_jax import storage
from meddiff_jax.train import writer as writer_lib


def read_events(path: pathlib.Path) -> event_accumulator.EventAccumulator:
  acc = event_accumulator.EventAccumulator(
    str(path), size_guidance={event_accumulator.IMAGES: 0, event_accumulator.TENSORS: 0}
  )
  acc.Reload()
  return acc


def write_some(workdir: str) -> None:
  w = writer_lib.MetricWriter(workdir, enabled=True, flush_interval_s=3600)
  w.config(ml_collections.ConfigDict({"training": {"num_steps": 3}}))
  for step, loss in [(1, 0.5), (2, 0.25), (3, 0.125)]:
    w.scalars(step, {"loss": loss, "grad_norm": 10 * loss}, prefix="train/")
  image = np.zeros((6, 9, 3), np.uint8)
  image[2:4, 3:7] = 200
  w.images(3, {"samples/generated_over_real": image})
  w.close()


def check_events(acc: event_accumulator.EventAccumulator) -> None:
  loss = acc.Scalars("train/loss")
  assert [(e.step, e.value) for e in loss] == [(1, 0.5), (2, 0.25), (3, 0.125)]
  assert [e.value for e in acc.Scalars("train/grad_norm")] == [5.0, 2.5, 1.25]
  (img,) = acc.Images("samples/generated_over_real")
  assert (img.step, img.width, img.height) == (3, 9, 6)
  import io

  from PIL import Image

  decoded = np.asarray(Image.open(io.BytesIO(img.encoded_image_string)))
  assert decoded[2:4, 3:7].min() == 200 and decoded.sum() == 200 * 8 * 3
  text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
  assert '"num_steps": 3' in text


def test_events_and_jsonl_read_back_with_tensorboard(tmp_path):
  write_some(str(tmp_path))
  (events,) = tmp_path.glob("events.out.tfevents.*")
  check_events(read_events(events))
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows == [
    {"step": 1, "loss": 0.5, "grad_norm": 5.0},
    {"step": 2, "loss": 0.25, "grad_norm": 2.5},
    {"step": 3, "loss": 0.125, "grad_norm": 1.25},
  ]
  assert {p.name for p in tmp_path.iterdir()} == {"metrics.jsonl", events.name}  # no hparams sub-run


def test_writer_on_an_object_store_url(tmp_path):
  """memory:// stands in for gs://: the same bytes arrive through fsspec, nothing lands on local disk."""
  url = "memory://bucket/run-writer"
  cwd = os.getcwd()
  write_some(url)
  (events,) = storage.glob(storage.join(url, "events.out.tfevents.*"))
  local = tmp_path / pathlib.PurePosixPath(events).name
  local.write_bytes(storage.read_bytes(events))
  check_events(read_events(local))
  assert [json.loads(l)["step"] for l in storage.read_text(storage.join(url, "metrics.jsonl")).splitlines()] == [
    1,
    2,
    3,
  ]
  assert not os.path.exists(os.path.join(cwd, "memory:")) and not os.path.exists("memory:")


def test_disabled_writer_writes_nothing(tmp_path):
  w = writer_lib.MetricWriter(str(tmp_path), enabled=False)
  w.scalars(1, {"loss": 1.0})
  w.close()
  assert list(tmp_path.iterdir()) == []


def test_object_store_appender_resumes_and_batches_uploads():
  url = "memory://bucket/appender/metrics.jsonl"
  a = storage.Appender(url, min_interval_s=3600)
  a.write(b"1\n")
  a.flush(force=True)
  a.write(b"2\n")
  a.flush()  # within the interval: not uploaded yet
  assert storage.read_text(url) == "1\n"
  a.close()
  assert storage.read_text(url) == "1\n2\n"
  b = storage.Appender(url)  # a resumed run keeps what was there
  b.write(b"3\n")
  b.close()
  assert storage.read_text(url) == "1\n2\n3\n"


def test_closing_summary_names_everything():
  text = writer_lib.closing_summary(
    kind="pretraining",
    workdir="gs://b/run",
    step=60,
    num_steps=60,
    last={"loss": 0.123456, "grad_norm": 0.5},
    last_val={"val/loss": 0.2},
    checkpoints=[40, 50, 60],
    preempted=False,
    seconds=61.2,
    samples=True,
  )
  assert text.splitlines()[0] == "pretraining finished at step 60/60 in 61 s."
  assert "loss 0.1235" in text and "val/loss 0.2" in text
  assert "gs://b/run/checkpoints (steps [40, 50, 60])" in text
  assert "tensorboard --logdir gs://b/run" in text and "samples:     gs://b/run/samples" in text
  assert "preempted at step 7/60" in writer_lib.closing_summary(
    kind="pretraining",
    workdir="w",
    step=7,
    num_steps=60,
    last={},
    last_val={},
    checkpoints=[7],
    preempted=True,
    seconds=1,
  )


@pytest.mark.slow
def test_training_run_prints_progress_and_a_summary_and_leaves_no_stray_folders(tmp_path):
  workdir = tmp_path / "run"
  proc = run_main(
    "--config=configs/pretrain.py:tiny",
    f"--workdir={workdir}",
    "--config.training.num_steps=2",
    "--config.training.log_every=1",
    "--config.data.patch_size=8",
    "--config.data.phantom.shape=(24,24,24)",
    "--config.data.phantom.num_volumes=3",
    "--config.eval.every_steps=0",
    "--config.eval.sample_every_steps=0",
    "--config.checkpoint.every_steps=1",
    timeout=1200,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout.splitlines()
  assert any(l.startswith("step 2/2  loss ") for l in out), proc.stdout
  summary = out[out.index(next(l for l in out if l.startswith("pretraining finished at step 2/2"))) :]
  assert summary[-1] == f"  events:      {workdir} (tensorboard --logdir {workdir})", proc.stdout
  assert f"  checkpoints: {workdir / 'checkpoints'} (steps [1, 2])" in summary
  # library INFO lines (absl format "I1129 ...") stay off unless --verbosity asks
  assert not [l for l in proc.stderr.splitlines() if l[:1] == "I" and l[1:5].isdigit()], proc.stderr[-2000:]
  assert len(out) + len(proc.stderr.splitlines()) < 40, proc.stdout + proc.stderr
  names = {p.name for p in workdir.iterdir()}
  events = {n for n in names if n.startswith("events.out.tfevents.")}
  assert len(events) == 1 and names - events == {"checkpoints", "metrics.jsonl"}, names
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]


def test_profiler_traces_the_requested_steps_only(tmp_path):
  import jax
  import jax.numpy as jnp

  from meddiff_jax.train import loop

  prof = loop.Profiler(str(tmp_path), start_step=10, num_steps=2)
  f = jax.jit(lambda x: x * 2)
  for step in range(11, 16):
    f(jnp.ones(3)).block_until_ready()
    prof.step(step)
    assert prof.active == (11 <= step < 13), step
  prof.close()
  traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
