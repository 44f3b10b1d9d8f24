"""Dry run: compile the training step for the devices present on synthetic inputs, print its cost, exit.

`python -m meddiff_jax.main --config=configs/pretrain.py:PRESET --workdir=W --config.dry_run=True`

Nothing is allocated or read: the state and the batch are ShapeDtypeStructs with their shardings, the
step is lowered and compiled ahead of time, and XLA's memory and cost analyses are read back. One JSON
line answers "will it fit, and how long will a step take" before a slice is paid for. On XLA:CPU (fake
devices) memory figures are indicative only: CPU convolutions are scheduled and fused differently.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax

from meddiff_jax import pretrained, sharding
from meddiff_jax.models import unet3d
from meddiff_jax.train import state as state_lib
from meddiff_jax.train import step as step_lib
from meddiff_jax.train import throughput
from meddiff_jax.train.spec import PretrainConfig

GIB = 2.0**30


def lower_train_step(config: PretrainConfig, devices: list[jax.Device] | None = None) -> tuple[Any, dict]:
  """(jax Lowered train step, facts) for the config's mesh on `devices` (default: all; the batch plan was
  checked against them by checks.pretrain)."""
  devices = list(devices if devices is not None else jax.devices())
  mesh_sizes = sharding.resolve_mesh_sizes(config.mesh.sizes, len(devices))
  rules = config.sharding.logical_rules
  mesh = sharding.make_mesh(config.mesh.sizes, devices)
  spec = config.model
  model = unet3d.UNet3D(spec)
  tx = state_lib.make_optimizer(config.optimizer)
  init_fn = pretrained.init_params_fn(model, spec, config.data.patch_size)
  state, state_shardings = state_lib.abstract(init_fn, tx, config.seed, mesh, rules, config.sharding.min_shard_size)
  batch = step_lib.batch_spec(config)
  batch_shardings = sharding.input_shardings(mesh, rules, batch)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k]) for k, v in batch.items()}
  step_fn = step_lib.make_train_step(model.apply, config.diffusion.make_schedule(), tx, config, rules)
  jitted = step_lib.jit_train_step(step_fn, state_shardings, batch_shardings, mesh)
  with sharding.activate(mesh, rules):
    lowered = jitted.lower(state, batch)
  facts = {
    "spec": spec,
    "mesh": mesh_sizes,
    "num_devices": len(devices),
    "device_kind": devices[0].device_kind,
    "params": unet3d.count_params(state.params),
  }
  return lowered, facts


def run(config: PretrainConfig) -> dict[str, Any]:
  """Compile, analyse, print one JSON line, return it as a dict (`config` checked by checks.pretrain)."""
  t0 = time.perf_counter()
  lowered, facts = lower_train_step(config)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t1
  spec, n, kind = facts["spec"], facts["num_devices"], facts["device_kind"]
  flops = throughput.flops_for_config(config)
  result: dict[str, Any] = {
    "preset": config.preset,
    "patch_size": config.data.patch_size,
    "batch_size": config.training.batch_size,
    "grad_accum_steps": config.training.grad_accum_steps,
    "remat": spec.remat,
    "dtype": str(spec.dtype),
    "mesh": facts["mesh"],
    "device_kind": kind,
    "num_devices": n,
    "params": facts["params"],
    "flops_per_step": flops,
    "flops_per_device": flops / n,
  }
  result.update(_memory(compiled))
  result["xla_flops_per_device"] = throughput.xla_flops(compiled)  # the samples' decoding included (below)
  result["decode_flops_per_step"] = decode_flops(config)
  result["lower_s"] = round(t1 - t0, 2)
  result["compile_s"] = round(compile_s, 2)
  result["projected_step_s_at_40pct_mfu"] = throughput.projected_step_s(flops, n, kind)
  if result["projected_step_s_at_40pct_mfu"] is None:
    result["note"] = throughput.describe_peak(kind)
  result["projected_step_s_at_40pct_mfu_by_kind"] = {
    k: throughput.projected_step_s(flops, n, k) for k in throughput.PLANNING_KINDS
  }
  print(json.dumps(result), flush=True)
  return result


def decode_flops(config: PretrainConfig) -> float | None:
  """XLA's FLOPs for finishing one step's shipped samples on the device (data.decode_on_device: data/decode.py,
  inside the step; 0 when the host finishes them): what moving the resize to the accelerator adds to the step."""
  if not config.data.decode_on_device:
    return 0.0
  batch = step_lib.batch_spec(config)
  return throughput.xla_flops(jax.jit(step_lib.decode_inputs(config)).lower(batch).compile())


def _memory(compiled: Any) -> dict[str, Any]:
  """Per-device bytes from XLA: arguments + outputs + temp (donated outputs alias arguments: counted once)."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    mem = None
  if mem is None:
    return {"memory_per_device_gib": None}
  args, out, temp = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
  alias = mem.alias_size_in_bytes
  return {
    "memory_per_device_gib": round((args + out + temp - alias) / GIB, 3),
    "arguments_gib": round(args / GIB, 3),
    "outputs_gib": round(out / GIB, 3),
    "temp_gib": round(temp / GIB, 3),
    "aliased_gib": round(alias / GIB, 3),
  }
