"""The path layer (meddiff_jax/storage.py) and a workdir on object storage, offline.

Stand-ins: fsspec's memory:// filesystem for the path layer, and an in-process GCS emulator
(gcp-storage-emulator, the `gcs` fixture in conftest.py) for gs:// end to end: gcsfs (metrics, events, samples,
Orbax metadata through etils.epath) and TensorStore's own gcs driver (Orbax's arrays) both talk to it.
"""

import json
import os

import jax
import numpy as np
import pytest
from conftest import tiny

from meddiff_jax import checkpoint, storage


def test_join_keeps_url_schemes():
  assert storage.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
  assert storage.join("/tmp/run", "a", "b") == os.path.join("/tmp/run", "a", "b")
  assert storage.scheme("s3://b/x") == "s3" and storage.is_local("runs/x") and not storage.is_local("memory://x")


def test_memory_round_trip_and_glob():
  storage.write_text("memory://bkt/store/a.json", '{"x": 1}')
  storage.write_bytes("memory://bkt/store/b.json", b"{}")
  storage.write_bytes("memory://bkt/store/c.bin", b"\0")
  assert storage.glob("memory://bkt/store/*.json") == ["memory:///bkt/store/a.json", "memory:///bkt/store/b.json"]
  assert json.loads(storage.read_text("memory://bkt/store/a.json")) == {"x": 1}
  assert storage.exists("memory://bkt/store/c.bin") and not storage.exists("memory://bkt/store/d.bin")


def test_local_write_is_atomic_and_leaves_no_temporaries(tmp_path):
  storage.write_text(str(tmp_path / "sub" / "a.txt"), "one")
  storage.write_text(str(tmp_path / "sub" / "a.txt"), "two")
  assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.txt"] and (
    tmp_path / "sub" / "a.txt"
  ).read_text() == "two"


def test_write_probe_and_temporaries_are_unique_per_host_and_process(monkeypatch):
  """Every host of a job probes the shared workdir at once, often with equal PIDs (one process per container):
  the probe (and the tmp of an atomic local write) is named by host, process and a random part, and removed."""
  seen = set()
  for host in ("worker-0", "worker-1"):
    monkeypatch.setattr(storage.socket, "gethostname", lambda host=host: host)
    name = storage.unique_name()
    assert name.startswith(f"{host}.{os.getpid()}.")
    seen.add(name)
  assert len(seen) == 2 and storage.unique_name() != storage.unique_name()  # the same process twice, too
  storage.check_writable("memory://probe/run")
  assert storage.listdir("memory://probe/run") == []  # nothing left behind


def test_move_and_listdir(tmp_path):
  """move: a directory with its contents, the destination's parents created (checkpoints set aside)."""
  storage.write_text(str(tmp_path / "a" / "7" / "x"), "7")
  storage.move(str(tmp_path / "a" / "7"), str(tmp_path / "aside" / "deep" / "7"))
  assert storage.listdir(str(tmp_path / "a")) == [] and (tmp_path / "aside" / "deep" / "7" / "x").read_text() == "7"
  storage.write_text("memory://mv/src/.hidden", "h")
  storage.move("memory://mv/src", "memory://mv/dst/src")
  assert storage.listdir("memory://mv/dst/src") == [".hidden"] and storage.listdir("memory://mv/src") == []


def test_checkpoint_urls_orbax_cannot_write_are_refused_in_one_line():
  with pytest.raises(
    ValueError,
    match=r"memory://x/checkpoints: Orbax checkpoints go to a local directory, gs:// "
    r"or s3://",
  ):
    storage.checkpoint_path("memory://x/checkpoints")
  assert storage.checkpoint_path("runs/x") == os.path.abspath("runs/x")


def test_missing_cloud_library_names_the_extra(monkeypatch):
  import fsspec

  def no_backend(url, **kwargs):
    raise ImportError("Install gcsfs to access Google Storage")

  monkeypatch.setattr(fsspec.core, "url_to_fs", no_backend)
  with pytest.raises(storage.MissingBackendError) as e:
    storage.makedirs("gs://bucket/run")
  assert str(e.value) == (
    "gs://bucket/run: gs:// needs gcsfs; install it with pip install -e '.[gcp]' (or pip install gcsfs)"
  )


def test_orbax_checkpoint_round_trip_on_gcs_emulator(gcs):
  state = {
    "w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "step": np.int32(7),
    **{f"b{i}": np.full((4, 8), i, np.float32) for i in range(40)},
  }  # many arrays: OCDBT commits concurrently
  import ml_collections

  ck = checkpoint.Checkpointer("gs://bucket/unit/checkpoints", keep=2)
  for step in (1, 2, 3):
    ck.save(step, jax.tree_util.tree_map(lambda x: x + step, state), None, ml_collections.ConfigDict({"a": step}))
  ck.close()
  assert ck.directory == "gs://bucket/unit/checkpoints"
  fresh = checkpoint.Checkpointer("gs://bucket/unit/checkpoints")
  assert fresh.all_steps() == [2, 3]
  restored = fresh.restore_latest(jax.tree_util.tree_map(np.zeros_like, state))
  assert restored.step == 3 and restored.config == {"a": 3}
  np.testing.assert_array_equal(restored.state["w"], state["w"] + 3)
  fresh.close()
  assert gcs.exists("bucket/unit/checkpoints/3/state") and not os.path.exists("gs:")


@pytest.mark.slow
def test_tiny_training_on_gs_workdir_writes_everything_there_and_resumes(gcs, tmp_path, monkeypatch):
  """2 steps, then a resume to 3: checkpoints, metrics.jsonl, events and samples all in the bucket."""
  from meddiff_jax.train import loop

  monkeypatch.chdir(tmp_path)  # whatever lands on local disk by mistake would land here
  workdir = "gs://bucket/run"
  cfg = tiny(
    **{
      "training.num_steps": 2,
      "eval.every_steps": 0,
      "eval.sample_every_steps": 2,
      "eval.sample_steps": 2,
      "checkpoint.every_steps": 1,
    }
  )
  first = loop.train_and_evaluate(cfg, workdir)
  names = {p.rsplit("/", 1)[-1] for p in gcs.ls("bucket/run")}
  assert {"checkpoints", "metrics.jsonl", "samples"} <= names and any(n.startswith("events.out") for n in names)
  assert gcs.exists("bucket/run/samples/step_00000002.png")
  assert checkpoint.Checkpointer(storage.join(workdir, "checkpoints")).all_steps() == [1, 2]

  cfg = tiny(
    **{"training.num_steps": 3, "eval.every_steps": 0, "eval.sample_every_steps": 0, "checkpoint.every_steps": 1}
  )
  loop.train_and_evaluate(cfg, workdir)
  rows = [json.loads(l) for l in gcs.cat("bucket/run/metrics.jsonl").decode().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # resumed at 2: step 3 only was run again
  assert rows[1]["loss"] == first["loss"]
  assert checkpoint.Checkpointer(storage.join(workdir, "checkpoints")).all_steps() == [1, 2, 3]
  assert len([n for n in gcs.ls("bucket/run") if "events.out" in n]) == 2
  assert os.listdir(tmp_path) == []  # no local folder named "gs:" (the old bug)


@pytest.mark.slow
def test_main_names_the_missing_extra_in_one_line(tmp_path):
  """What a user without the cloud extra sees (s3fs is not in the test extra; skipped where installed)."""
  import importlib.util

  from conftest import REPO, run_main

  if importlib.util.find_spec("s3fs") is not None:
    pytest.skip("s3fs is installed")
  for args in (
    ["--workdir=s3://bucket/run"],
    [f"--workdir={tmp_path}", "--config.data.source=prepared", "--config.data.prepared_dir=s3://b/prep"],
  ):
    proc = run_main("--config=configs/pretrain.py:tiny", *args, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "s3:// needs s3fs; install it with pip install -e '.[s3]'" in proc.stderr.strip().splitlines()[-1]
  assert not os.path.exists(os.path.join(REPO, "s3:"))


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y), strict=True), a, b)


def test_export_to_an_object_store_url_loads_back_bitwise(tmp_path, monkeypatch):
  """pretrained.export / load / read_config through the path layer: an export on memory:// is the builtin's."""
  from meddiff_jax import pretrained

  monkeypatch.chdir(tmp_path)  # a path layer bypassed would leave a local folder named "memory:" here
  ref = pretrained.load("tiny_phantom")
  out = "memory://bkt/exports/tiny"
  assert pretrained.export("tiny_phantom", out) == out
  assert storage.read_bytes(storage.join(out, "params.msgpack")) == storage.read_bytes(
    os.path.join(pretrained.BUILTIN["tiny_phantom"], "params.msgpack")
  )
  loaded = pretrained.load(out)
  _assert_trees_equal(loaded.params, ref.params)
  assert pretrained.read_config(out).to_dict() == loaded.config.to_dict() == ref.config.to_dict()
  assert os.listdir(tmp_path) == []
  with pytest.raises(FileNotFoundError, match="memory://bkt/nothing' does not exist"):
    pretrained.load("memory://bkt/nothing")


def test_ema_params_load_from_a_gs_training_workdir_and_export_to_gs(gcs, tmp_path, monkeypatch):
  """A pretraining workdir in a bucket: load() restores the EMA (not the raw params) against an eval_shape
  target; export() writes gs:// -> gs://; both bitwise; nothing lands on local disk."""
  from meddiff_jax import pretrained

  monkeypatch.chdir(tmp_path)
  ref = pretrained.load("tiny_phantom")
  params = jax.tree_util.tree_map(np.asarray, ref.params)
  ema = jax.tree_util.tree_map(lambda p: (p * 0.5 + 0.25).astype(p.dtype), params)  # EMA != params
  ck = checkpoint.Checkpointer("gs://bucket/pre/checkpoints")
  ck.save(5, {"step": np.int32(5), "params": params, "ema_params": ema}, None, ref.config)
  ck.close()

  loaded = pretrained.load("gs://bucket/pre")
  _assert_trees_equal(loaded.params, ema)
  assert pretrained.read_config("gs://bucket/pre").to_dict() == ref.config.to_dict()
  pretrained.export("gs://bucket/pre", "gs://bucket/exported")
  assert gcs.exists("bucket/exported/params.msgpack") and gcs.exists("bucket/exported/config.json")
  _assert_trees_equal(pretrained.load("gs://bucket/exported").params, ema)
  assert os.listdir(tmp_path) == []
