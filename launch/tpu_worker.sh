#!/usr/bin/env bash
# What launch/tpu_vm.py runs on every worker of a TPU slice (shipped with the tree, run over ssh --worker=all):
#   tpu_worker.sh setup EXTRAS   a Python 3.11 venv made with uv (stock TPU images have an older Python) and this
#                                tree installed into it with jax[tpu] (+ EXTRAS, e.g. gcp for a gs:// workdir)
#   tpu_worker.sh start WORKDIR MAIN_FLAGS...
#                                training, detached from the ssh session (setsid nohup): it outlives the launcher;
#                                its log is WORKDIR/logs/HOST.log (a gs:// workdir: uploaded every minute)
#   tpu_worker.sh status WORKDIR one line: MEDDIFF_STATUS HOST running|exited|idle RC NEWEST_CHECKPOINT_STEP
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="$HOME/meddiff_run"
VENV="${MEDDIFF_VENV:-$HOME/meddiff_venv}"
HOST="$(hostname)"
mkdir -p "$RUN"
command="$1"
shift

running() { [ -f "$RUN/pid" ] && kill -0 "$(cat "$RUN/pid")" 2>/dev/null; }

case "$command" in
setup)
  extras="$1"
  export PATH="$HOME/.local/bin:$PATH"
  command -v uv >/dev/null 2>&1 || curl -LsSf https://astral.sh/uv/install.sh | sh
  [ -x "$VENV/bin/python" ] || uv venv --python 3.11 "$VENV"
  uv pip install --python "$VENV/bin/python" -e "$ROOT${extras:+[$extras]}" 'jax[tpu]>=0.10.2,<0.11'
  ;;
start)
  if running; then
    echo "$HOST: training already running (pid $(cat "$RUN/pid"))"
    exit 0
  fi
  rm -f "$RUN/rc"
  cd "$ROOT"
  setsid nohup bash "$ROOT/launch/tpu_worker.sh" train "$@" >"$RUN/worker.log" 2>&1 </dev/null &
  for _ in $(seq 50); do  # the detached script writes its pid first
    running && break
    sleep 0.1
  done
  echo "$HOST: training started (pid $(cat "$RUN/pid"))"
  ;;
train)  # the detached part of `start`
  echo $$ >"$RUN/pid"
  workdir="$1"
  shift
  case "$workdir" in
  *://*) log="$RUN/train.log" ;;
  *) mkdir -p "$workdir/logs" && log="$workdir/logs/$HOST.log" ;;
  esac
  upload() {  # a URL workdir: the log goes up whole (object stores have no append)
    "$VENV/bin/python" -c 'import sys; from meddiff_jax import storage; storage.write_bytes(sys.argv[2], open(sys.argv[1], "rb").read())' \
      "$log" "$workdir/logs/$HOST.log" || true
  }
  "$VENV/bin/python" -m meddiff_jax.main --workdir="$workdir" "$@" >>"$log" 2>&1 &
  child=$!
  trap 'kill -TERM $child 2>/dev/null' TERM INT
  if [ "$log" = "$RUN/train.log" ]; then
    (while kill -0 $child 2>/dev/null; do sleep 60; upload; done) &
  fi
  while true; do  # wait returns early when a trapped signal arrives; wait again until the child is gone
    set +e
    wait $child
    rc=$?
    set -e
    kill -0 $child 2>/dev/null || break
  done
  [ "$log" = "$RUN/train.log" ] && upload
  echo "$rc" >"$RUN/rc"
  ;;
status)
  workdir="$1"
  cd "$ROOT"
  if running; then
    state=running rc=-
  elif [ -f "$RUN/rc" ]; then
    state=exited rc="$(cat "$RUN/rc")"
  else
    state=idle rc=-
  fi
  step=$("$VENV/bin/python" -c '
import sys
from meddiff_jax import storage
d = storage.join(sys.argv[1], "checkpoints")
names = [p.rstrip("/").rsplit("/", 1)[-1] for p in storage.glob(storage.join(d, "*"))] if storage.exists(d) else []
print(max([int(n) for n in names if n.isdigit()], default=0))' "$workdir" 2>/dev/null || echo 0)
  echo "MEDDIFF_STATUS $HOST $state $rc $step"
  ;;
*)
  echo "usage: $0 setup EXTRAS | start WORKDIR FLAGS... | status WORKDIR" >&2
  exit 2
  ;;
esac
