"""Launch meddiff_jax on a Cloud TPU slice and keep it training until the configured last step.

  python launch/tpu_vm.py --name=meddiff --zone=us-east5-a --project=P --accelerator=v5p-16 --create --spot \
      --config=configs/pretrain.py:paper --workdir=gs://BUCKET/runs/paper \
      -- --config.data.prepared_dir=/mnt/data/prepared
  (--dry-run prints the commands of one deployment without running anything)

Steps:
  1. (--create) a queued resource with the runtime version of the accelerator (RUNTIMES); wait until ACTIVE.
  2. Ship the working tree: the files git tracks plus the untracked ones it does not ignore (uncommitted
     configs included), to every worker (scp --worker=all).
  3. On every worker (launch/tpu_worker.sh setup): a Python 3.11 venv made with uv, this tree installed into it
     with jax[tpu], and the [gcp] extra when a gs:// path is used.
  4. Start training on every worker at once, detached from ssh (tpu_worker.sh start): it survives this launcher
     and your laptop; the log of each worker is WORKDIR/logs/HOST.log.
  5. Supervise, every --poll_s: a preempted slice (queued resource SUSPENDED / FAILED / gone) is deleted and
     created again, then 2-4 (training resumes from WORKDIR/checkpoints); training that stopped before the
     last step on a live slice is started again (at most --max_restarts times in all; a run that fails twice
     without a new checkpoint in between stops the launcher: a bug or a config error, see the logs). It ends
     when the checkpoint of the last step (config.training.num_steps) is written, and deletes the slice
     (--keep: not).
Run it where it can keep running (tmux, Cloud Shell, a small VM). Stopping it leaves training running; the same
command again re-attaches (nothing is created or started twice). A multi-host slice needs a workdir every host
sees (gs://, or a shared file system).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# runtime version (TPU software version) per TPU generation, from the accelerator type's prefix
# (https://cloud.google.com/tpu/docs/runtimes: v4 and older / v5e / v5p / v6e Trillium)
RUNTIMES = {
  "v2": "tpu-ubuntu2204-base",
  "v3": "tpu-ubuntu2204-base",
  "v4": "tpu-ubuntu2204-base",
  "v5litepod": "v2-alpha-tpuv5-lite",
  "v5e": "v2-alpha-tpuv5-lite",
  "v5p": "v2-alpha-tpuv5",
  "v6e": "v2-alpha-tpuv6e",
}
PREEMPTED = ("SUSPENDED", "FAILED", "")  # queued-resource states to delete and create again ('': gone)
TARBALL = "meddiff_jax.tar.gz"  # in each worker's home directory


def runtime_for(accelerator: str) -> str:
  """'v5p-16' -> 'v2-alpha-tpuv5'; an unknown generation is an error naming the known ones."""
  generation = accelerator.split("-", 1)[0]
  if generation not in RUNTIMES:
    raise SystemExit(f"--accelerator={accelerator}: unknown TPU generation; known: {sorted(RUNTIMES)} (or --runtime)")
  return RUNTIMES[generation]


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", required=True, help="queued resource and TPU node name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", required=True)
  p.add_argument("--accelerator", default="v5p-8", help="e.g. v4-32, v5litepod-16, v5p-16, v6e-8")
  p.add_argument("--runtime", default="", help="TPU software version (default: from --accelerator)")
  p.add_argument("--create", action="store_true", help="create the queued resource (and again after preemption)")
  p.add_argument("--spot", action="store_true", help="spot capacity (preemptible; re-created until done)")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True, help="gs://... or a path every host sees")
  p.add_argument("--remote_dir", default="meddiff_jax", help="where the tree goes on the workers (under $HOME)")
  p.add_argument("--poll_s", type=float, default=60.0, help="seconds between supervision checks")
  p.add_argument("--max_restarts", type=int, default=50, help="re-creations + restarts before giving up")
  p.add_argument("--keep", action="store_true", help="keep the slice when training is done")
  p.add_argument("--dry-run", action="store_true")
  p.add_argument("overrides", nargs="*", help="extra --config.key=value flags (after --)")
  a = p.parse_args(argv)
  a.runtime = a.runtime or runtime_for(a.accelerator)
  return a


# ------------------------------------------------------------------------------------------- the commands


def _loc(a) -> list[str]:
  return ["--zone", a.zone, "--project", a.project]


def _tpus(*args: str) -> list[str]:
  return ["gcloud", "compute", "tpus", *args]


def create_command(a) -> list[str]:
  cmd = _tpus("queued-resources", "create", a.name, "--node-id", a.name, "--accelerator-type", a.accelerator)
  return cmd + ["--runtime-version", a.runtime, *_loc(a)] + (["--spot"] if a.spot else [])


def delete_command(a) -> list[str]:
  return _tpus("queued-resources", "delete", a.name, "--force", "--quiet", *_loc(a))


def describe_command(a) -> list[str]:
  return _tpus("queued-resources", "describe", a.name, *_loc(a), "--format=value(state.state)")


def ssh_command(a, command: str, worker: str = "all") -> list[str]:
  return _tpus("tpu-vm", "ssh", a.name, f"--worker={worker}", f"--command={command}", *_loc(a))


def scp_command(a, tarball: str) -> list[str]:
  return _tpus("tpu-vm", "scp", tarball, f"{a.name}:{TARBALL}", "--worker=all", *_loc(a))


def extras(a) -> str:
  """The pyproject extras the workers need: gcp when the workdir or a config value is a gs:// URL."""
  return "gcp" if any(s.startswith("gs://") or "=gs://" in s for s in [a.workdir, *a.overrides]) else ""


def _worker(a, *args: str) -> str:
  return " ".join(["bash", f"{a.remote_dir}/launch/tpu_worker.sh", *map(shlex.quote, args)])


def setup_command(a) -> list[str]:
  """Unpack the shipped tree in place of the previous one, then the venv and install (tpu_worker.sh setup)."""
  d = a.remote_dir
  unpack = f"rm -rf {d}.new && mkdir -p {d}.new && tar -xzf {TARBALL} -C {d}.new && rm -rf {d} && mv {d}.new {d}"
  return ssh_command(a, f"set -e; cd ~ && {unpack} && {_worker(a, 'setup', extras(a))}")


def start_command(a) -> list[str]:
  args = [f"--config={a.config}", *a.overrides]
  return ssh_command(a, f"cd ~ && {_worker(a, 'start', a.workdir, *args)}")


def status_command(a) -> list[str]:
  return ssh_command(a, f"cd ~ && {_worker(a, 'status', a.workdir)}")


# ------------------------------------------------------------------------------------------- the tree


def working_tree_files(repo: str = REPO) -> list[str]:
  """Tracked files plus untracked files git does not ignore (what `git status` would let you commit), that
  exist (a deleted tracked file is not shipped); symlinks as links."""
  out = subprocess.run(
    ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
    cwd=repo,
    capture_output=True,
    check=True,
  ).stdout
  names = sorted({n for n in out.decode().split("\0") if n})
  exists = lambda n: os.path.isfile(os.path.join(repo, n)) or os.path.islink(os.path.join(repo, n))
  return [n for n in names if exists(n)]  # a symlink (meddiff_jax/configs) goes as a link


def pack_tree(path: str, repo: str = REPO) -> int:
  """The working tree as a .tar.gz at `path`; returns the number of files."""
  files = working_tree_files(repo)
  with tarfile.open(path, "w:gz") as tar:
    for name in files:
      tar.add(os.path.join(repo, name), arcname=name)
  return len(files)


# ------------------------------------------------------------------------------------------- target step


def target_step(a) -> int:
  """config.training.num_steps of the run: from the overrides, else from the config (a shipped name or a path
  in this checkout, loaded here as main.py loads it)."""
  for flag in reversed(a.overrides):
    m = re.fullmatch(r"--config\.training\.num_steps=(\d+)", flag)
    if m:
      return int(m.group(1))
  target, colon, arg = a.config.partition(":")
  spec = os.path.join(REPO, target) + colon + arg if os.path.isfile(os.path.join(REPO, target)) else a.config
  sys.path.insert(0, REPO)
  try:
    from meddiff_jax import config_files

    return int(config_files.load(spec).training.num_steps)
  except Exception as e:  # the config needs packages this machine lacks, or names no training run
    raise SystemExit(
      f"cannot read config.training.num_steps from --config={a.config} here ({type(e).__name__}: {e}); "
      "pass it after --, e.g. -- --config.training.num_steps=N"
    ) from None
  finally:
    sys.path.remove(REPO)


# ------------------------------------------------------------------------------------------- running


def show(cmd: list[str]) -> None:
  print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)


def call(cmd: list[str]) -> None:
  """Run a step with its output streaming; a failing step stops the launcher with that step's exit code."""
  show(cmd)
  rc = subprocess.run(cmd).returncode
  if rc:
    raise SystemExit(rc)


def query(cmd: list[str]) -> str:
  return subprocess.run(cmd, capture_output=True, text=True).stdout


def queue_state(a) -> str:
  """The queued resource's state ('' when it does not exist)."""
  return query(describe_command(a)).strip()


def worker_status(a) -> list[tuple[str, str, str, int]]:
  """(host, running|exited|idle, rc, newest checkpoint step) per worker that answered."""
  rows = []
  for line in query(status_command(a)).splitlines():
    parts = line.split()
    if len(parts) == 5 and parts[0] == "MEDDIFF_STATUS":
      rows.append((parts[1], parts[2], parts[3], int(parts[4])))
  return rows


def recreate(a, state: str) -> None:
  """Delete the queued resource (unless it is gone) and create it again."""
  if state:
    call(delete_command(a))
  call(create_command(a))


def deploy(a, tarball: str) -> None:
  """Steps 2-4 on the slice as it is now."""
  call(scp_command(a, tarball))
  call(setup_command(a))
  call(start_command(a))


def supervise(a, tarball: str, target: int, sleep: Callable[[float], None] = time.sleep) -> int:
  """Steps 1-5 until the last step is checkpointed (returns 0), or --max_restarts creations or deployments
  beyond the first (returns 1)."""
  creations = deployments = 0
  deployed_at = None  # the newest checkpoint step when training was last started: no progress twice -> give up
  failures_without_progress = 0

  def attempt(kind: str, count: int, action: Callable[[], None]) -> int:
    if count > a.max_restarts:
      raise SystemExit(f"giving up: {kind} {count} times (--max_restarts={a.max_restarts})")
    try:
      action()
    except SystemExit as e:  # a failing gcloud step (ssh not up yet, capacity): tried again at the next check
      print(f"{kind} failed (exit code {e.code}); trying again in {a.poll_s:.0f} s", file=sys.stderr, flush=True)
    return count + 1

  while True:
    state = queue_state(a) if a.create else "ACTIVE"
    if a.create and state in PREEMPTED:
      print(f"queued resource {a.name}: {state or 'not found'}; creating it", flush=True)
      creations = attempt("created the slice", creations, lambda: recreate(a, state))
    elif state == "ACTIVE":
      rows = worker_status(a)
      newest = max((r[3] for r in rows), default=0)
      running = [r for r in rows if r[1] == "running"]
      if newest >= target and not running:
        print(f"done: checkpoint of step {newest} (of {target}) in {a.workdir}", flush=True)
        if a.create and not a.keep:
          call(delete_command(a))
        return 0
      if running:
        print(f"training: newest checkpoint step {newest} of {target} ({len(running)} workers running)", flush=True)
      else:  # never started here, a new slice, or stopped early (a crash, a maintenance restart, a lost host)
        failed = any(r[1] == "exited" and r[2] != "0" for r in rows)
        failures_without_progress = failures_without_progress + 1 if failed and newest == deployed_at else 0
        if failures_without_progress >= 2:
          print(
            f"training failed twice at checkpoint step {newest} without progress; stopping (the slice is kept): "
            f"see {a.workdir}/logs",
            file=sys.stderr,
          )
          return 1
        print(f"training not running (newest checkpoint step {newest} of {target}; {rows}): deploying", flush=True)
        deployments = attempt("deployed", deployments, lambda: deploy(a, tarball))
        deployed_at = newest
    else:
      print(f"queued resource {a.name}: {state}", flush=True)
    sleep(a.poll_s)


def main(argv=None) -> int:
  a = parse(argv)
  if a.dry_run:
    if a.create:
      show(create_command(a))
      print(f"# wait until `{shlex.join(describe_command(a))}` prints ACTIVE")
    show(
      [
        "tar",
        "-czf",
        TARBALL,
        f"<{len(working_tree_files())} files: git ls-files --cached --others --exclude-standard>",
      ]
    )
    for cmd in (scp_command(a, TARBALL), setup_command(a), start_command(a)):
      show(cmd)
    print(f"# then every {a.poll_s:.0f} s: {shlex.join(status_command(a))}; re-create when preempted")
    return 0
  target = target_step(a)
  with tempfile.TemporaryDirectory() as tmp:
    tarball = os.path.join(tmp, TARBALL)
    print(f"shipping {pack_tree(tarball)} files of {REPO}; training to step {target}", flush=True)
    return supervise(a, tarball, target)


if __name__ == "__main__":
  sys.exit(main())
