"""Run one task on one case through the task's public entry point (RUN: the task's `run(config)`).

The only things relied on are each task's config file (configs/<task>.py: its keys and defaults) and its
`run` writing `config.output` on the input's grid, so the task algorithms can change underneath. Options
shared with the task commands (checkpoint / controlnet, region, method, sampler, num_steps, windows, seed)
are copied when the task has them and they are not 'task' (the task's default); `--config.task="KEY=VALUE;KEY=VALUE"`
reaches any other task key. The task config is checked by its spec (TASK_SPECS) and the task runs on that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meddiff_jax import config_files
from meddiff_jax.protocols.spec import TASK_DEFAULT, EvaluateSpec
from meddiff_jax.tasks import anomaly, common, controlled, denoise, synthesis

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
# A protocol's datasets are one region (Mayo 2016, BMAD liver, MSD liver: abdomen; RPLHR-CT, MSD lung: chest):
# its cases run as that region (paper.py's metric windows and model-free references use the same), not estimated.
PROTOCOL_REGION = {"super_resolution": "chest"}
TASK_SPECS: dict[str, type[common.TaskSpec]] = {  # each task's typed config
  "denoise": denoise.DenoiseSpec,
  "anomaly": anomaly.AnomalySpec,
  "synthesis": synthesis.SynthesisSpec,
  "super_resolution": controlled.SuperResolutionSpec,
  "lesion": controlled.LesionSpec,
}
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


def task_config(protocol: str, evaluate: EvaluateSpec, **case_keys: Any):
  """The task's own default config, with the evaluation's shared options (those not 'task') and the case's
  paths set; checked by the task's spec (TASK_SPECS) before it runs."""
  cfg = config_files.load(TASK[protocol])  # the shipped config, by name (as --config=denoise loads it)
  for key in SHARED:
    value = getattr(evaluate, key)
    if key in cfg and value != TASK_DEFAULT:
      cfg[key] = type(cfg[key])(value) if not isinstance(cfg[key], (tuple, list)) else value
  if protocol in FIXED_METHOD:
    cfg.method = FIXED_METHOD[protocol]
  if evaluate.region == TASK_DEFAULT and "region" in cfg:  # the region the protocol's metrics and references use
    cfg.region = PROTOCOL_REGION.get(protocol, "abdomen")
  if "overwrite" in cfg:  # outputs in the evaluation's own workdir: a re-run replaces them
    cfg.overwrite = True
  for key, value in parse_task_options(evaluate.task).items():
    if key not in cfg:
      raise ValueError(f"--config.task.{key}: configs/{TASK[protocol]}.py has no key {key!r}")
    cfg[key] = value
  for key, value in case_keys.items():
    if key not in cfg:  # a task rewritten without this key: say so instead of running something else
      raise ValueError(f"configs/{TASK[protocol]}.py has no key {key!r}, which the {protocol} protocol sets")
    cfg[key] = value
  return cfg


def run_task(protocol: str, evaluate: EvaluateSpec, **case_keys: Any) -> dict[str, Any]:
  name = TASK[protocol]
  return RUN[name](TASK_SPECS[name].from_config(task_config(protocol, evaluate, **case_keys)))
