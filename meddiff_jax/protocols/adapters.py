"""Run one task on one case through the task's public entry point (RUN: the task's `run(config)`).

The only things relied on are each task's config file (configs/<task>.py: its keys and defaults) and its
`run` writing `config.output` on the input's grid, so the task algorithms can change underneath. Options
shared with the task commands (checkpoint / controlnet, region, method, sampler, num_steps, windows, seed)
are copied when the task has them; `--config.task="KEY=VALUE;KEY=VALUE"` reaches any other task key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meddiff_jax import config_files
from meddiff_jax.tasks import anomaly, controlled, denoise, synthesis

TASK = {
  "denoising": "denoise",
  "anomaly": "anomaly",
  "synthesis": "synthesis",
  "super_resolution": "super_resolution",
  "lesion": "lesion",
  "inpainting": "lesion",
}
SHARED = (
  "checkpoint",
  "controlnet",
  "region",
  "sampler",
  "num_steps",
  "overlap",
  "window_batch",
  "seed",
  "method",
  "inference_dtype",
)
FIXED_METHOD = {"lesion": "generate", "inpainting": "inpaint"}
RUN: dict[str, Callable[[Any], dict[str, Any]]] = {
  "denoise": denoise.run,
  "anomaly": anomaly.run,
  "synthesis": synthesis.run,
  "super_resolution": controlled.run_super_resolution,
  "lesion": controlled.run_lesion,
}


def parse_task_options(text: str) -> dict[str, Any]:
  """'lam=10;noise_t=950;spacing=(1.,1.,1.)' -> {'lam': 10, ...} (values as Python literals, else strings)."""
  import ast

  out = {}
  for item in filter(None, (p.strip() for p in (text or "").split(";"))):
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"--config.task={text!r}: expected KEY=VALUE items separated by ';', got {item!r}")
    try:
      out[key.strip()] = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = raw.strip()
  return out


def task_config(protocol: str, config: Any, **case_keys: Any):
  """The task's own default config, with the evaluation's shared options and the case's paths set."""
  cfg = config_files.load(TASK[protocol])  # the shipped config, by name (as --config=denoise loads it)
  for key in SHARED:
    value = config[key]
    unset = (
      value is None
      or value == ""
      or (isinstance(value, (int, float)) and value < (1 if key in ("num_steps", "window_batch") else 0))
    )  # '' / -1 (0 steps / windows): the task config's default
    if key in cfg and not unset:
      cfg[key] = type(cfg[key])(value) if not isinstance(cfg[key], (tuple, list)) else value
  if protocol in FIXED_METHOD:
    cfg.method = FIXED_METHOD[protocol]
  for key, value in parse_task_options(config.task).items():
    if key not in cfg:
      raise ValueError(f"--config.task.{key}: configs/{TASK[protocol]}.py has no key {key!r}")
    cfg[key] = value
  for key, value in case_keys.items():
    if key not in cfg:  # a task rewritten without this key: say so instead of running something else
      raise ValueError(f"configs/{TASK[protocol]}.py has no key {key!r}, which the {protocol} protocol sets")
    cfg[key] = value
  return cfg


def run_task(protocol: str, config: Any, **case_keys: Any) -> dict[str, Any]:
  cfg = task_config(protocol, config, **case_keys)
  return RUN[TASK[protocol]](cfg)
