"""Launch meddiff_jax on a Cloud TPU VM / pod slice.

  python launch/tpu_vm.py --name=meddiff --zone=us-east5-a --project=P --accelerator=v5p-64 \
      --create --config=configs/pretrain.py:paper --workdir=gs://BUCKET/runs/paper \
      -- --config.data.prepared_dir=/mnt/data/prepared
  (add --dry-run to print the exact commands without running them)

Steps: [create a queued resource and wait until ACTIVE] -> copy this checkout (git archive) to every worker
-> install (pip, with jax[tpu]) -> run `python -m meddiff_jax.main` on all workers at once (--worker=all),
streaming the logs; the first failing step stops the launch with its exit code.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", required=True)
  p.add_argument("--zone", required=True)
  p.add_argument("--project", required=True)
  p.add_argument("--accelerator", default="v5p-8")
  p.add_argument("--runtime", default="v2-alpha-tpuv5")
  p.add_argument("--create", action="store_true", help="create a queued resource first")
  p.add_argument("--spot", action="store_true")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--remote_dir", default="~/meddiff_jax")
  p.add_argument("--dry-run", action="store_true")
  p.add_argument("overrides", nargs="*", help="extra --config.key=value flags (after --)")
  return p.parse_args(argv)


def commands(a) -> list[list[str]]:
  loc = ["--zone", a.zone, "--project", a.project]
  tpu = ["gcloud", "compute", "tpus"]
  cmds = []
  if a.create:
    create = (
      tpu
      + [
        "queued-resources",
        "create",
        a.name,
        "--node-id",
        a.name,
        "--accelerator-type",
        a.accelerator,
        "--runtime-version",
        a.runtime,
      ]
      + loc
    )
    cmds.append(create + (["--spot"] if a.spot else []))
    cmds.append(["WAIT_ACTIVE", a.name] + loc)
  cmds.append(["git", "archive", "--format=tar.gz", "-o", "/tmp/meddiff_jax.tar.gz", "HEAD"])
  cmds.append(tpu + ["tpu-vm", "scp", "/tmp/meddiff_jax.tar.gz", f"{a.name}:/tmp/", "--worker=all"] + loc)
  install = (
    f"mkdir -p {a.remote_dir} && tar -xzf /tmp/meddiff_jax.tar.gz -C {a.remote_dir} && cd {a.remote_dir} && "
    "pip install -q -e . 'jax[tpu]>=0.10.2,<0.11'"
  )
  cmds.append(tpu + ["tpu-vm", "ssh", a.name, "--worker=all", f"--command={install}"] + loc)
  run = " ".join(
    [
      "cd",
      a.remote_dir,
      "&&",
      "python",
      "-m",
      "meddiff_jax.main",
      shlex.quote(f"--config={a.config}"),
      shlex.quote(f"--workdir={a.workdir}"),
      *map(shlex.quote, a.overrides),
    ]
  )
  cmds.append(tpu + ["tpu-vm", "ssh", a.name, "--worker=all", f"--command={run}"] + loc)
  return cmds


def wait_active(name: str, loc: list[str], timeout_s: float = 3600) -> None:
  t0 = time.time()
  while time.time() - t0 < timeout_s:
    state = subprocess.run(
      ["gcloud", "compute", "tpus", "queued-resources", "describe", name, *loc, "--format=value(state.state)"],
      capture_output=True,
      text=True,
    ).stdout.strip()
    print(f"queued resource {name}: {state or 'unknown'}", flush=True)
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED"):
      sys.exit(f"queued resource {name} is {state}")
    time.sleep(30)
  sys.exit(f"queued resource {name} not ACTIVE after {timeout_s} s")


def main(argv=None) -> int:
  a = parse(argv)
  for cmd in commands(a):
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if a.dry_run:
      continue
    if cmd[0] == "WAIT_ACTIVE":
      wait_active(cmd[1], cmd[2:])
      continue
    rc = subprocess.run(cmd).returncode  # inherits stdout/stderr: logs stream live
    if rc:
      print(f"step failed with exit code {rc}; stopping", file=sys.stderr)
      return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
