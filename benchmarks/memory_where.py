"""Where a command's memory peaks: RSS sampled while it runs, with the code that was running at each new high.

python benchmarks/memory_where.py [--interval_ms=20] -- --config=denoise --config.input=... [main's flags]

Runs `python -m meddiff_jax.main ARGS` in this process (one CPU device) with a thread that reads the resident set
every interval and, whenever it passes the previous high by more than 1%, records the main thread's stack (the
frames in meddiff_jax/). Prints, as JSON lines: the resident set before the command and at its peak (getrusage,
exact), a timeline (the innermost project functions running, with the highest resident set seen in
each phase) and, per project function on the stack, the highest resident set seen while it ran (the sampled peak can
miss a spike shorter than the interval). Pairs with benchmarks/memory_big_volume.py, which measures whole
processes as a user runs them.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import runpy
import sys
import threading
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * PAGE


def project_frames(frame) -> list[str]:
  """'module.py:line function' for the frames of meddiff_jax on `frame`'s stack, outermost first."""
  rows = []
  for summary in traceback.extract_stack(frame):
    if "/meddiff_jax/" in summary.filename:
      rows.append(f"{summary.filename.split('/meddiff_jax/')[-1]}:{summary.lineno} {summary.name}")
  return rows


def main() -> None:
  argv = sys.argv[1:]
  interval = 0.02
  if argv and argv[0].startswith("--interval_ms="):
    interval = float(argv.pop(0).split("=", 1)[1]) / 1e3
  if argv and argv[0] == "--":
    argv.pop(0)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main_thread = threading.main_thread().ident
  highs: list[tuple[float, int, list[str]]] = []  # (seconds, rss, stack) at each new high
  by_function: dict[str, int] = {}
  timeline: list[list] = []  # [first s, last s, innermost project function, its highest rss]
  done = threading.Event()
  start = time.perf_counter()
  base = rss_bytes()

  def sample() -> None:
    high = 0
    while not done.wait(interval):
      rss = rss_bytes()
      frame = sys._current_frames().get(main_thread)
      stack = project_frames(frame) if frame is not None else []
      names = [row.split(" ", 1)[1] + " (" + row.split(":", 1)[0] + ")" for row in stack]
      for name in names:
        by_function[name] = max(by_function.get(name, 0), rss)
      now, inner = time.perf_counter() - start, " < ".join(reversed(names[-2:])) or "(outside meddiff_jax)"
      if timeline and timeline[-1][2] == inner:
        timeline[-1][1], timeline[-1][3] = now, max(timeline[-1][3], rss)
      else:
        timeline.append([now, now, inner, rss])
      if rss > high * 1.01:
        high = rss
        highs.append((time.perf_counter() - start, rss, stack))

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  sys.argv = ["meddiff_jax.main", *argv]
  status = 0
  try:
    runpy.run_module("meddiff_jax.main", run_name="__main__", alter_sys=True)
  except SystemExit as e:
    status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  finally:
    done.set()
    thread.join()
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  gb = lambda b: round(b / 1e9, 3)
  print(json.dumps({"rc": status, "rss_before_gb": gb(base), "peak_rss_gb": gb(peak)}))
  for seconds, rss, stack in highs[-6:]:
    print(json.dumps({"at_s": round(seconds, 1), "rss_gb": gb(rss), "stack": stack[-6:]}))
  for first, last, inner, rss in timeline:
    if last - first >= 1.0 or rss >= 0.9 * peak:  # phases of a second or more, and whatever ran near the peak
      print(json.dumps({"from_s": round(first, 1), "to_s": round(last, 1), "in": inner, "max_rss_gb": gb(rss)}))
  for name, rss in sorted(by_function.items(), key=lambda kv: -kv[1])[:25]:
    print(json.dumps({"function": name, "max_rss_gb": gb(rss)}))


if __name__ == "__main__":
  main()
