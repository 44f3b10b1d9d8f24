"""The launchers: what they generate (dry runs, fast) and what the generated scripts do, run end to end against
fake `gcloud` / `uv` / `sbatch` / `srun` / `scontrol` (small scripts on PATH that record their calls and
simulate the cluster, a preemption and a time limit included; slow: they train the tiny preset)."""

import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest
from conftest import REPO, free_port

sys.path.insert(0, str(REPO / "launch"))
import slurm  # noqa: E402
import tpu_vm  # noqa: E402

TINY = [
  "--config.training.log_every=1",
  "--config.data.patch_size=8",
  "--config.data.phantom.shape=(24,24,24)",
  "--config.data.phantom.num_volumes=4",
  "--config.eval.every_steps=0",
  "--config.eval.sample_every_steps=0",
]


def run(*args, env=None, timeout=60):
  """`args` in the repository; `env`: the whole environment (default: this one)."""
  return subprocess.run(list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


# ------------------------------------------------------------------------------------------ TPU VM, generated


@pytest.mark.parametrize(
  "accelerator,runtime",
  [
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-16", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
  ],
)
def test_runtime_version_follows_the_accelerator(accelerator, runtime):
  a = tpu_vm.parse(["--name=n", "--zone=z", "--project=p", f"--accelerator={accelerator}", "--config=c", "--workdir=w"])
  assert a.runtime == runtime
  assert f"--runtime-version {runtime}" in " ".join(tpu_vm.create_command(a))


def test_unknown_accelerator_is_refused():
  with pytest.raises(SystemExit, match="v9x-8: unknown TPU generation"):
    tpu_vm.parse(["--name=n", "--zone=z", "--project=p", "--accelerator=v9x-8", "--config=c", "--workdir=w"])


def test_tpu_vm_dry_run():
  proc = run(
    sys.executable,
    "launch/tpu_vm.py",
    "--name=md",
    "--zone=us-east5-a",
    "--project=p",
    "--accelerator=v5p-16",
    "--create",
    "--spot",
    "--config=configs/pretrain.py:paper",
    "--workdir=gs://b/run",
    "--dry-run",
    "--",
    "--config.mesh.fsdp=8",
  )
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if l.startswith("+ ")]
  assert lines[0].startswith(
    "+ gcloud compute tpus queued-resources create md --node-id md --accelerator-type v5p-16 "
    "--runtime-version v2-alpha-tpuv5 --zone us-east5-a --project p --spot"
  )
  scp, setup, start = lines[-3:]
  assert "tpu-vm scp meddiff_jax.tar.gz md:meddiff_jax.tar.gz --worker=all" in scp
  assert "--worker=all" in setup and "meddiff_jax/launch/tpu_worker.sh setup gcp" in setup  # gs:// -> [gcp]
  assert "--worker=all" in start and (
    "meddiff_jax/launch/tpu_worker.sh start gs://b/run --config=configs/pretrain.py:paper --config.mesh.fsdp=8" in start
  )
  assert "queued-resources describe md" in proc.stdout and "tpu_worker.sh status gs://b/run" in proc.stdout


def test_the_shipped_tree_is_the_working_tree(tmp_path):
  """Tracked (also modified) and untracked-not-ignored files go; ignored and deleted files do not."""
  git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
  git("init", "-q")
  (tmp_path / ".gitignore").write_text("runs/\n*.log\n")
  for name in ("tracked.py", "gone.py", "configs/mine.py", "runs/ckpt", "train.log", "new.py"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text(name)
  git("add", ".gitignore", "tracked.py", "gone.py")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
  (tmp_path / "gone.py").unlink()
  (tmp_path / "tracked.py").write_text("edited")
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "configs").symlink_to("../configs")  # as meddiff_jax/configs -> ../configs
  expected = [".gitignore", "configs/mine.py", "new.py", "pkg/configs", "tracked.py"]
  assert tpu_vm.working_tree_files(str(tmp_path)) == expected
  n = tpu_vm.pack_tree(str(tmp_path / "t.tar.gz"), str(tmp_path))
  with tarfile.open(tmp_path / "t.tar.gz") as tar:
    assert n == 5 and tar.extractfile("tracked.py").read() == b"edited"
    link = tar.getmember("pkg/configs")
    assert link.issym() and link.linkname == "../configs"


def test_the_gcp_extra_only_for_gs_paths():
  base = ["--name=n", "--zone=z", "--project=p", "--config=c"]
  assert tpu_vm.extras(tpu_vm.parse([*base, "--workdir=gs://b/w"])) == "gcp"
  assert tpu_vm.extras(tpu_vm.parse([*base, "--workdir=/mnt/w", "--", "--config.data.prepared_dir=gs://b/p"])) == "gcp"
  assert tpu_vm.extras(tpu_vm.parse([*base, "--workdir=/mnt/w"])) == ""


def test_target_step_from_the_overrides_or_the_config():
  base = ["--name=n", "--zone=z", "--project=p", "--workdir=w"]
  assert tpu_vm.target_step(tpu_vm.parse([*base, "--config=configs/pretrain.py:paper"])) == 181_000
  assert tpu_vm.target_step(tpu_vm.parse([*base, "--config=configs/pretrain.py:tiny"])) == 20
  assert tpu_vm.target_step(tpu_vm.parse([*base, "--config=pretrain:tiny"])) == 20  # a shipped name
  a = tpu_vm.parse([*base, "--config=configs/pretrain.py:paper", "--", "--config.training.num_steps=7"])
  assert tpu_vm.target_step(a) == 7


def supervised(monkeypatch, states, statuses, *flags):
  """tpu_vm.supervise against scripted queued-resource states and worker statuses; the gcloud steps it runs."""
  a = tpu_vm.parse(["--name=md", "--zone=z", "--project=p", "--config=c", "--workdir=w", "--poll_s=0", *flags])
  states, statuses, steps = iter(states), iter(statuses), []
  monkeypatch.setattr(tpu_vm, "queue_state", lambda a: next(states))
  monkeypatch.setattr(tpu_vm, "worker_status", lambda a: next(statuses))
  monkeypatch.setattr(tpu_vm, "call", lambda cmd: steps.append(" ".join(cmd[3:5])))
  return tpu_vm.supervise(a, "tree.tar.gz", 10, sleep=lambda s: None), steps


def test_supervisor_recreates_a_preempted_slice_and_stops_when_done(monkeypatch):
  running, exited = [("w0", "running", "-", 5), ("w1", "running", "-", 5)], [("w0", "exited", "0", 10)] * 2
  rc, steps = supervised(
    monkeypatch,
    ["", "ACTIVE", "ACTIVE", "SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE", "ACTIVE", "ACTIVE"],
    [[], running, [], running, exited],
    "--create",
  )
  deploy = ["tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
  assert rc == 0 and steps == [
    "queued-resources create",
    *deploy,
    "queued-resources delete",  # preempted
    "queued-resources create",
    *deploy,  # a new slice: shipped, installed and started again
    "queued-resources delete",  # done
  ]


def test_supervisor_gives_up_on_a_run_that_fails_without_progress(monkeypatch):
  failed = [("w0", "exited", "1", 0), ("w1", "exited", "1", 0)]
  rc, steps = supervised(monkeypatch, ["ACTIVE"] * 3, [failed] * 3, "--create")
  assert rc == 1 and steps.count("tpu-vm scp") == 2 and "queued-resources delete" not in steps  # slice kept


# ------------------------------------------------------------------------------------------ SLURM, generated


def test_slurm_dry_run():
  proc = run(
    sys.executable,
    "launch/slurm.py",
    "--nodes=2",
    "--gpus_per_node=8",
    "--partition=gpu",
    "--config=configs/pretrain.py:paper",
    "--workdir=/shared/run",
    "--dry-run",
    "--",
    "--config.mesh.fsdp=8",
  )
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  for line in (
    "#SBATCH --nodes=2",
    "#SBATCH --ntasks-per-node=1",
    "#SBATCH --gpus-per-node=8",
    "#SBATCH --partition=gpu",
    "#SBATCH --cpus-per-task=96",  # 12 per GPU: the input pipeline's workers (docs/scaling.md)
    "#SBATCH --signal=B:USR1@300",
    "#SBATCH --requeue",
    "#SBATCH --output=/shared/run/logs/%x-%j.out",
  ):
    assert line in out.splitlines(), line
  assert 'JAX_NUM_PROCESSES="$SLURM_NTASKS"' in out and "JAX_PROCESS_ID=$SLURM_PROCID" in out
  assert (
    "python -m meddiff_jax.main --config=configs/pretrain.py:paper --workdir=/shared/run --config.mesh.fsdp=8 "
    "--config.data.worker_count=88" in out
  )
  assert "trap 'on_signal USR1' USR1" in out and 'scontrol requeue "$SLURM_JOB_ID"' in out
  bash = subprocess.run(["bash", "-n"], input=out, capture_output=True, text=True)
  assert bash.returncode == 0, bash.stderr  # the script parses
  mine = slurm.render(slurm.parse(["--config=c", "--workdir=w", "--", "--config.data.worker_count=4"]))
  assert "--config.data.worker_count=4" in mine and "worker_count=88" not in mine  # the user's choice wins


def test_multinode_dry_run():
  proc = run(
    "bash",
    "launch/multinode.sh",
    "10.0.0.1:1234",
    "2",
    "1",
    "--",
    "--config=configs/demo.py",
    "--workdir=/tmp/x",
    env=dict(os.environ, DRY_RUN="1"),
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == (
    "JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 "
    "python -m meddiff_jax.main --config=configs/demo.py --workdir=/tmp/x"
  )
  bad = run("bash", "launch/multinode.sh", "x")
  assert bad.returncode == 2 and "usage" in bad.stderr


# ------------------------------------------------------------------------------------------ end to end, faked


def metric_steps(workdir):
  """step -> loss, the last line for a step winning (re-run steps after a resume are appended)."""
  path = workdir / "metrics.jsonl"
  rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def checkpoint_steps(workdir):
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def fake_env(tmp_path, shims: dict[str, str]) -> dict:
  """PATH with the shims first; the child environment of a training run on the fake machines."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in shims.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  env = dict(
    os.environ,
    PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    FAKE=str(tmp_path / "fake"),
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
  )
  env.pop("XLA_FLAGS", None)
  (tmp_path / "fake").mkdir()
  return env


FAKE_GCLOUD = textwrap.dedent(
  """\
  #!{python}
  # gcloud compute tpus ...: one queued resource whose worker is this machine, in $FAKE/vm/home. The first slice
  # is preempted: a watcher started with it SIGTERMs the training (a spot VM's notice) once the run has logged
  # step $PREEMPT_AFTER_STEP, waits for it to exit, and turns the queued resource SUSPENDED. `delete` wipes the
  # VM's disk.
  import json, os, pathlib, shutil, subprocess, sys
  fake = pathlib.Path(os.environ["FAKE"])
  with open(fake / "gcloud_calls.jsonl", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
  state_file, home = fake / "qr_state", fake / "vm" / "home"
  state = state_file.read_text() if state_file.exists() else ""
  args = sys.argv[1:]  # compute tpus GROUP VERB ...
  group, verb = args[2], args[3]
  if group == "queued-resources" and verb == "create":
    home.mkdir(parents=True)
    state_file.write_text("PROVISIONING")
    if not (fake / "watcher_started").exists():
      (fake / "watcher_started").touch()
      subprocess.Popen([sys.executable, str(fake / "preempt.py")], start_new_session=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  elif group == "queued-resources" and verb == "describe":
    if state == "PROVISIONING":
      state = "ACTIVE"
      state_file.write_text(state)
    print(state)
  elif group == "queued-resources" and verb == "delete":
    shutil.rmtree(fake / "vm", ignore_errors=True)
    state_file.write_text("")
  elif verb == "scp":
    src, dest = args[4], args[5].split(":", 1)[1]
    shutil.copy(src, home / dest)
  elif verb == "ssh":
    command = [a for a in args if a.startswith("--command=")][0].split("=", 1)[1]
    env = dict(os.environ, HOME=str(home))
    sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode)
  else:
    sys.exit(f"fake gcloud: unexpected {{sys.argv[1:]}}")
  """
)

PREEMPT = textwrap.dedent(
  """\
  import json, os, pathlib, signal, time
  fake, workdir = pathlib.Path(os.environ["FAKE"]), pathlib.Path(os.environ["WORKDIR"])
  run, metrics = fake / "vm" / "home" / "meddiff_run", workdir / "metrics.jsonl"
  t0 = time.time()
  while time.time() - t0 < 1200:
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()] if metrics.exists() else []
    if max(steps, default=0) >= int(os.environ["PREEMPT_AFTER_STEP"]) and (run / "pid").exists():
      os.killpg(os.getpgid(int((run / "pid").read_text())), signal.SIGTERM)
      while not (run / "rc").exists() and time.time() - t0 < 1200:
        time.sleep(0.05)
      (fake / "preempted").write_text(str(max(steps)))
      (fake / "qr_state").write_text("SUSPENDED")
      break
    time.sleep(0.05)
  """
)

FAKE_UV = textwrap.dedent(
  """\
  #!/bin/bash
  # uv: `venv DIR` makes DIR/bin/python run this test's interpreter (which has every dependency); `pip` records.
  echo "uv $*" >> "$FAKE/uv_calls"
  if [ "$1" = venv ]; then
    mkdir -p "$4/bin" && printf '#!/bin/bash\\nexec {python} "$@"\\n' > "$4/bin/python" && chmod +x "$4/bin/python"
  fi
  """
)


@pytest.mark.slow
def test_tpu_launcher_reaches_the_last_step_through_a_preemption(tmp_path):
  """A spot v5e slice preempted mid-run: deleted, created again, re-shipped, re-installed, resumed, finished."""
  workdir = tmp_path / "run"
  env = fake_env(
    tmp_path,
    {"gcloud": FAKE_GCLOUD.format(python=sys.executable), "uv": FAKE_UV.format(python=sys.executable)},
  )
  env.update(WORKDIR=str(workdir), PREEMPT_AFTER_STEP="2")
  (tmp_path / "fake" / "preempt.py").write_text(PREEMPT)
  proc = run(
    sys.executable,
    "launch/tpu_vm.py",
    "--name=md",
    "--zone=z",
    "--project=p",
    "--accelerator=v5litepod-8",
    "--create",
    "--spot",
    "--poll_s=1",
    "--config=configs/pretrain.py:tiny",
    f"--workdir={workdir}",
    "--",
    *TINY,
    "--config.training.num_steps=20",
    "--config.checkpoint.every_steps=10",
    f"--config.compilation_cache_dir={tmp_path / 'cache'}",
    env=env,
    timeout=1800,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  calls = [json.loads(l) for l in (tmp_path / "fake" / "gcloud_calls.jsonl").read_text().splitlines()]
  verbs = [" ".join(c[2:4]) for c in calls]
  creates = [c for c in calls if c[2:4] == ["queued-resources", "create"]]
  assert len(creates) == 2 and all("--spot" in c and "v2-alpha-tpuv5-lite" in c for c in creates)
  assert verbs.count("queued-resources delete") == 2  # the preempted slice, and the finished one
  assert verbs.count("tpu-vm scp") == 2  # shipped to each new slice
  ssh = [next(a for a in c if a.startswith("--command=")) for c in calls if c[2:4] == ["tpu-vm", "ssh"]]
  assert sum("tpu_worker.sh setup" in s for s in ssh) == 2 and sum("tpu_worker.sh start" in s for s in ssh) == 2
  uv = (tmp_path / "fake" / "uv_calls").read_text().splitlines()
  assert sum(l.startswith("uv venv --python 3.11") for l in uv) == 2  # each new VM: a fresh Python 3.11 venv
  assert any(l.startswith("uv pip install") and "jax[tpu]" in l for l in uv)

  (log,) = (workdir / "logs").glob("*.log")  # the workers' log is in the workdir, across both slices
  text = log.read_text()
  preempted_at = int(text.split("pretraining preempted at step ")[1].split("/")[0])  # saved, then exited 0
  assert 2 <= preempted_at < 20 and f"resumed from step {preempted_at}" in text
  assert preempted_at in checkpoint_steps(workdir) and checkpoint_steps(workdir)[-1] == 20
  assert sorted(metric_steps(workdir)) == list(range(1, 21)) and text.count("finished at step 20/20") == 1
  assert "done: checkpoint of step 20" in proc.stdout


FAKE_SBATCH = textwrap.dedent(
  """\
  #!{python}
  # sbatch SCRIPT: runs the job here (one node); once the run has logged step $LIMIT_AFTER_STEP, the time limit
  # is near: SIGUSR1 to the batch shell (#SBATCH --signal=B:USR1@...). A requeue (scontrol) runs it again.
  import json, os, pathlib, signal, subprocess, sys, time
  fake = pathlib.Path(os.environ["FAKE"])
  with open(fake / "calls", "a") as f:
    f.write("sbatch " + " ".join(sys.argv[1:]) + "\\n")
  script = sys.argv[-1]
  lines = open(script).read().splitlines()
  directive = lambda key: next(l.split("=", 1)[1] for l in lines if l.startswith(f"#SBATCH --{{key}}="))
  out = directive("output").replace("%x", directive("job-name")).replace("%j", "4242")
  metrics = pathlib.Path(os.environ["WORKDIR"]) / "metrics.jsonl"
  for restart in range(3):
    env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_JOB_NODELIST="node1",
               SLURM_RESTART_COUNT=str(restart), SLURM_CPUS_PER_TASK=directive("cpus-per-task"))
    with open(out, "a") as log:
      job = subprocess.Popen(["bash", script], env=env, cwd=directive("chdir"), stdout=log, stderr=subprocess.STDOUT)
    signalled = False
    while job.poll() is None:
      steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()] if metrics.exists() else []
      if restart == 0 and not signalled and max(steps, default=0) >= int(os.environ["LIMIT_AFTER_STEP"]):
        job.send_signal(signal.SIGUSR1)
        signalled = True
        (fake / "signalled_at").write_text(str(max(steps)))
      time.sleep(0.2)
    requeued = fake / "requeued"
    if not requeued.exists():
      sys.exit(job.returncode)
    requeued.unlink()
  sys.exit("fake sbatch: requeued too often")
  """
)

FAKE_SRUN = textwrap.dedent(
  """\
  #!/bin/bash
  # srun [options] COMMAND...: one task (SLURM_PROCID=0); signals to srun are forwarded to the task
  echo "srun $*" >> "$FAKE/calls"
  while [[ "$1" == --* ]]; do shift; done
  SLURM_PROCID=0 "$@" &
  task=$!
  trap 'kill -TERM $task' TERM
  while true; do wait $task; rc=$?; kill -0 $task 2>/dev/null || break; done
  exit $rc
  """
)

FAKE_SCONTROL = textwrap.dedent(
  """\
  #!/bin/bash
  echo "scontrol $*" >> "$FAKE/calls"
  case "$1 $2" in
    "show hostnames") echo localhost ;;
    "requeue $SLURM_JOB_ID") touch "$FAKE/requeued" ;;
    *) echo "fake scontrol: unexpected $*" >&2; exit 1 ;;
  esac
  """
)


@pytest.mark.slow
def test_slurm_job_saves_and_requeues_at_the_time_limit_then_finishes(tmp_path):
  """The generated job under fake sbatch / srun / scontrol: USR1 ahead of the time limit -> the tasks save a
  checkpoint and exit 0 -> the job requeues itself -> the requeued job resumes and reaches the last step."""
  workdir = tmp_path / "run"
  env = fake_env(
    tmp_path,
    {"sbatch": FAKE_SBATCH.format(python=sys.executable), "srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL},
  )
  env.update(WORKDIR=str(workdir), LIMIT_AFTER_STEP="3")
  proc = run(
    sys.executable,
    "launch/slurm.py",
    "--nodes=1",
    "--gpus_per_node=1",
    "--cpus_per_gpu=2",
    "--reserved_cpus=2",
    f"--port={free_port()}",
    f"--python={sys.executable}",
    "--config=configs/pretrain.py:tiny",
    f"--workdir={workdir}",
    "--",
    *TINY,
    "--config.training.num_steps=40",  # JAX notices SIGTERM within ~1 s: steps left to reach the sync point
    "--config.checkpoint.every_steps=20",
    f"--config.compilation_cache_dir={tmp_path / 'cache'}",
    env=env,
    timeout=1800,
  )
  (log,) = (workdir / "logs").glob("meddiff-4242.out")
  text = log.read_text()
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + text[-4000:]
  calls = (tmp_path / "fake" / "calls").read_text().splitlines()
  (script,) = (workdir / "logs").glob("meddiff-*.sbatch")  # the job script, kept beside its log
  assert calls[0] == f"sbatch {script}"
  assert sum(c.startswith("sbatch ") for c in calls) == 1 and calls.count("scontrol requeue 4242") == 1
  assert sum(c.startswith("srun --kill-on-bad-exit=1 bash -c") for c in calls) == 2  # the job, and its requeue
  signalled_at = int((tmp_path / "fake" / "signalled_at").read_text())
  assert "USR1 received" in text and "requeueing job 4242" in text
  assert "process 0 of 1: 1 local / 1 global cpu devices" in text  # jax.distributed ran: the preemption service
  assert "preemption notice: every process saves step" in text
  saved = int(text.split("preemption notice: every process saves step ")[1].split()[0])
  assert signalled_at <= saved < 40 and f"resumed from step {saved}" in text
  assert checkpoint_steps(workdir)[-1] == 40 and sorted(metric_steps(workdir)) == list(range(1, 41))
  assert text.count("pretraining finished at step 40/40") == 1


def test_fake_shims_are_valid_scripts():
  """The shims parse (a broken shim would make the slow tests fail for the wrong reason)."""
  for text in (FAKE_UV.format(python=sys.executable), FAKE_SRUN, FAKE_SCONTROL):
    assert subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True).returncode == 0
  for text in (FAKE_GCLOUD.format(python=sys.executable), FAKE_SBATCH.format(python=sys.executable), PREEMPT):
    compile(text, "shim", "exec")


def documented_launches():
  """The launch commands of docs/pretraining.md section 5, as argv lists."""
  import shlex

  text = (REPO / "docs" / "pretraining.md").read_text().split("## 5.")[1]
  blocks = [b.split("```", 1)[0] for b in text.split("```bash\n")[1:]]
  commands = [c for b in blocks for c in b.replace("\\\n", " ").splitlines() if c.startswith("python launch/")]
  return [shlex.split(c) for c in commands]


@pytest.mark.parametrize("devices", [8, 16], ids=["v5p-16", "2x8-gpu"])
def test_the_documented_launches_run_and_their_plans_fit(devices):
  """docs/pretraining.md's v5p-16 (8 chips) and 2 x 8-GPU commands: the launcher's dry run works, and the config
  they run passes the entry point's checks on that many devices (the batch splits over the mesh)."""
  import ast

  from conftest import override

  from configs import pretrain
  from meddiff_jax import checks

  (argv,) = [c for c in documented_launches() if ("v5p-16" in " ".join(c)) == (devices == 8)]
  split = argv.index("--")
  proc = run(sys.executable, *argv[1:split], "--dry-run", *argv[split:])
  assert proc.returncode == 0, proc.stderr
  preset = next(a for a in argv if a.startswith("--config=configs/pretrain.py:")).split(":", 1)[1]
  config = pretrain.get_config(preset)
  for flag in argv[split + 1 :]:
    key, value = flag.removeprefix("--config.").split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    override(config, **{key: value})
  checks.pretrain(config, num_devices=devices)
