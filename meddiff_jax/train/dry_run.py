"""Dry run: compile the training step for the devices present on synthetic inputs, print its cost, exit.

`python -m meddiff_jax.main --config=configs/pretrain.py:PRESET --workdir=W --config.dry_run=True`

Nothing is allocated or read: the state and the batch are ShapeDtypeStructs with their shardings, the
step is lowered and compiled ahead of time, and XLA's memory and cost analyses are read back. One JSON
line answers "will it fit, and how long will a step take" before a slice is paid for. On XLA:CPU (fake
devices) memory figures are indicative only: CPU convolutions are scheduled and fused differently.

`--config.dry_run_topology=v5p:4x4x4` (any name jax.experimental.topologies accepts) compiles for that TPU
slice with the TPU compiler on any host that has libtpu (the test extra), and adds the chip, its HBM and
whether the step fits, XLA's FLOPs and bytes per chip and a roofline step time (`topology`).
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
from meddiff_jax.train import throughput, tpu_compile
from meddiff_jax.train.spec import PretrainConfig


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


def compile_train_step(config: PretrainConfig, devices: list[jax.Device]) -> tuple[Any, dict]:
  """(compiled train step, facts with lower_s / compile_s) for `config` on `devices`; on TPU devices (a topology's:
  no TPU needed) with the implementations a TPU host resolves 'auto' to (`tpu_compile.for_tpu`)."""
  if str(devices[0].platform) == "tpu":
    config = tpu_compile.for_tpu(config)
  t0 = time.perf_counter()
  lowered, facts = lower_train_step(config, devices)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  facts.update(lower_s=round(t1 - t0, 2), compile_s=round(time.perf_counter() - t1, 2))
  return compiled, facts


def run(config: PretrainConfig) -> dict[str, Any]:
  """Compile, analyse, print one JSON line, return it as a dict (`config` checked by checks.pretrain).

  With config.dry_run_topology (a TPU slice by name) the step is compiled by the TPU compiler for that slice's
  devices instead of the devices present (`topology` adds its facts: `tpu_compile`)."""
  if config.dry_run_topology:
    devices = tpu_compile.topology_devices(config.dry_run_topology)
  else:
    devices = jax.devices()
  compiled, facts = compile_train_step(config, devices)
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
  result.update(tpu_compile.memory(compiled))
  result["xla_flops_per_device"] = throughput.xla_flops(compiled)  # the samples' decoding included (below)
  result["decode_flops_per_step"] = decode_flops(config)
  result["lower_s"], result["compile_s"] = facts["lower_s"], facts["compile_s"]
  result["projected_step_s_at_40pct_mfu"] = throughput.projected_step_s(flops, n, kind)
  if result["projected_step_s_at_40pct_mfu"] is None:
    result["note"] = throughput.describe_peak(kind)
  result["projected_step_s_at_40pct_mfu_by_kind"] = {
    k: throughput.projected_step_s(flops, n, k) for k in throughput.PLANNING_KINDS
  }
  if config.dry_run_topology:
    result.update(topology(config, compiled, devices, flops, result["memory_per_device_gib"]))
  print(json.dumps(result), flush=True)
  return result


def decode_flops(config: PretrainConfig) -> float | None:
  """XLA's FLOPs for finishing one step's shipped samples on the device (data.decode_on_device: data/decode.py,
  inside the step; 0 when the host finishes them): what moving the resize to the accelerator adds to the step."""
  if not config.data.decode_on_device:
    return 0.0
  batch = step_lib.batch_spec(config)
  return throughput.xla_flops(jax.jit(step_lib.decode_inputs(config)).lower(batch).compile())


def topology(
  config: PretrainConfig, compiled: Any, devices: list[jax.Device], flops: float, memory_gib: float | None
) -> dict[str, Any]:
  """What a TPU compile for `config.dry_run_topology` says per chip: the chip, its HBM and whether the step fits,
  XLA's FLOPs and bytes accessed, and the roofline step time (the slower of FLOPs at the chip's peak and bytes at
  its HBM bandwidth).

  XLA's cost analysis counts the body of the accumulation loop once: its FLOPs and bytes are one micro-step's
  plus what runs once per step (optimizer, EMA); tpu_compile.per_micro_step spreads the latter over the
  micro-steps, so the step time is grad_accum_steps x the micro-step's."""
  cost = tpu_compile.cost(compiled)
  chip = tpu_compile.chip_for(devices[0].device_kind)
  accum = config.training.grad_accum_steps
  out: dict[str, Any] = {
    "topology": config.dry_run_topology,
    "num_hosts": len({d.process_index for d in devices}),
    "chip": chip.name if chip else None,
    "xla_flops_per_chip_micro_step": cost.get("flops"),
    "bytes_accessed_per_chip_micro_step": cost.get("bytes accessed"),
  }
  if chip is None:  # a chip without known peaks: the compile's figures stand alone
    out["note"] = f"no peaks known for {devices[0].device_kind!r}: no roofline (tpu_compile.CHIPS)"
    return out
  out["hbm_gib_per_chip"] = chip.hbm_gib
  out["fits"] = None if memory_gib is None else memory_gib <= chip.hbm_gib
  if "flops" in cost and "bytes accessed" in cost:
    ops = tpu_compile.hlo_ops(compiled.as_text())
    per = tpu_compile.per_micro_step(cost["flops"], cost["bytes accessed"], ops, accum)
    out["once_per_step_bytes_per_chip"] = per["once_per_step_bytes"]
    micro = tpu_compile.roofline(flops / len(devices) / accum, per["flops"], per["bytes"], chip)
    out["bound"] = micro["bound"]
    out["roofline_step_s"] = accum * micro["roofline_s"]
    out["roofline_mfu"] = micro["roofline_mfu"]
  return out
