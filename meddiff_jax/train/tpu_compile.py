"""Compile the training step for a TPU slice that is not present, and read the TPU compiler's roofline.

With libtpu installed (`pip install 'jax[tpu]'`, the test extra), `jax.experimental.topologies` describes
any slice by name ("v5p:2x2x1", "v5e:2x2", "v5p:4x4x4") on a CPU-only host; `jit(...).lower(...)
.compile()` for a mesh of those devices runs the real TPU compiler (STACK_NOTES section 12). This module:

  topology_devices(name)      -> the slice's devices (libtpu imported here, lazily: the module itself
                                 imports without it)
  for_tpu(config)             -> the config as a TPU host resolves its 'auto' implementations (the project's
                                 own train step is compiled for the devices by train/dry_run.compile_train_step)
  analyse(compiled, ...)      -> per chip and micro-step: XLA FLOPs, bytes accessed, optimal_seconds,
                                 memory, a roofline time and MFU estimate against the chip's peaks
                                 (`CHIPS`), and the ops that move the most bytes (from the compiled HLO)

XLA's cost analysis counts a loop body once: with gradient accumulation (a scan) its totals are one
micro-step plus what runs once per step (optimizer, EMA). `per_micro_step` spreads the once-per-step ops
(the HLO ops outside the loop) over the step's micro-steps, which is what "per micro-step" means here.
`hlo_ops` reads the per-instruction costs the TPU compiler writes into the optimized HLO
(`estimated_cycles` in each op's backend_config) and each op's operand + output bytes, so a table of the
most expensive ops, and of bytes per model module (from each op's `op_name` metadata), says where the
traffic is. Used by benchmarks/tpu_roofline.py and, for `--config.dry_run_topology`, train/dry_run.py.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from typing import Any

import jax

GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip's dense bf16 peak, HBM bandwidth and capacity (Cloud TPU datasheets; capacity in GiB as JAX
  reports what a program may allocate: v5p has 96 GiB physical, of which 95 GiB are the user's)."""

  name: str
  device_kind: str  # as jax reports it (matched exactly)
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes_per_s: float
  hbm_gib: float


CHIPS: tuple[Chip, ...] = (
  Chip("v4", "TPU v4", 275e12, 1.228e12, 32.0),
  Chip("v5e", "TPU v5 lite", 197e12, 0.819e12, 16.0),
  Chip("v5p", "TPU v5", 459e12, 2.765e12, 95.0),
  Chip("v6e", "TPU v6 lite", 918e12, 1.640e12, 32.0),
)


def chip_for(device_kind: str) -> Chip | None:
  """The chip of a jax device_kind ("TPU v5 lite" is v5e, "TPU v5" / "TPU v5p" v5p); None when unknown."""
  kind = device_kind.replace("TPU v5p", "TPU v5").replace("TPU v6e", "TPU v6 lite").replace("TPU v5e", "TPU v5 lite")
  for chip in CHIPS:
    if chip.device_kind == kind:
      return chip
  return None


def topology_devices(topology: str) -> list[Any]:
  """The devices of a TPU slice by name (any name `get_topology_desc` accepts), on any host with libtpu."""
  from jax.experimental import topologies

  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as e:  # a config mistake (checks.py reports it in one line): a bad name, or no libtpu
    reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    raise ValueError(
      f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {reason}); names look like v5p:2x2x1, "
      f"v5e:2x4, v6e:4x4, and libtpu is needed: pip install 'jax[tpu]=={jax.__version__}' (the test extra)"
    ) from e
  return list(desc.devices)


def libtpu_available() -> bool:
  """Whether a TPU compiler can be loaded here (tests skip without it)."""
  try:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None
  except Exception:
    return False


def for_tpu(config: Any) -> Any:
  """`config` (train/spec.PretrainConfig) with model.conv_impl (and attention_impl, where the model has one) 'auto'
  pinned to what 'auto' picks on a TPU host (folded / flash): 'auto' would otherwise resolve on the compiling host
  (depth_taps on a CPU host). The caller's config is not modified."""
  pinned = {"conv_impl": "folded", "attention_impl": "flash"}
  model = dataclasses.replace(
    config.model, **{k: v for k, v in pinned.items() if getattr(config.model, k, None) == "auto"}
  )
  return dataclasses.replace(config, model=model)


# ------------------------------------------------------------------------------------------------
# Analysis


def cost(compiled: Any) -> dict[str, float]:
  """XLA's cost analysis of a compiled program (flops, bytes accessed, optimal_seconds, ...); {} without one."""
  try:
    cost = compiled.cost_analysis()
  except Exception:
    return {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(cost or {})


def memory(compiled: Any) -> dict[str, Any]:
  """Per-device bytes: arguments + outputs + temp - aliased (donated state counted once), in GiB."""
  try:
    mem = compiled.memory_analysis()
  except Exception:
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


def roofline(model_flops: float, xla_flops: float, bytes_accessed: float, chip: Chip) -> dict[str, float]:
  """Roofline time of one program on one chip (max of FLOP time and HBM time) and the MFU it implies:
  model FLOPs / (time x peak). XLA's FLOPs (remat recompute, halos) set the FLOP time."""
  flop_s = xla_flops / chip.peak_flops
  hbm_s = bytes_accessed / chip.hbm_bytes_per_s
  step_s = max(flop_s, hbm_s)
  return {
    "flop_time_s": flop_s,
    "hbm_time_s": hbm_s,
    "roofline_s": step_s,
    "bound": "memory" if hbm_s > flop_s else "compute",
    "roofline_mfu": model_flops / (step_s * chip.peak_flops) if step_s > 0 else float("nan"),
  }


def analyse(
  compiled: Any,
  model_flops_per_device: float,
  device_kind: str,
  *,
  top: int = 15,
  hlo_text: str | None = None,
  loop_trips: int = 1,
) -> dict[str, Any]:
  """The TPU compiler's view of one compiled program on one chip, per micro-step (see module doc).

  model_flops_per_device: analytic model FLOPs of one micro-step per device (e.g. 3 x forward of one
  micro-batch / devices); loop_trips: the trip count of the program's while loop (grad_accum_steps), so what
  runs once per step outside it (optimizer, EMA) is spread over its micro-steps. Returns a JSON-able dict.
  """
  text = hlo_text if hlo_text is not None else compiled.as_text()
  return _summary(cost(compiled), memory(compiled), text, model_flops_per_device, device_kind, top, loop_trips)


def analyse_text(
  hlo_text: str, model_flops_per_device: float, device_kind: str, *, top: int = 15, loop_trips: int = 1
) -> dict[str, Any]:
  """`analyse` from a saved optimized HLO text alone: bytes from its ops (tiled), no FLOPs or memory."""
  ops_bytes = sum(o["bytes"] for o in hlo_ops(hlo_text))
  return _summary({"bytes accessed": ops_bytes}, {}, hlo_text, model_flops_per_device, device_kind, top, loop_trips)


def per_micro_step(xla_flops: float, bytes_accessed: float, ops: list[dict], loop_trips: int) -> dict[str, float]:
  """The cost analysis counts a loop body once, plus what runs outside it once: the step is loop_trips x the
  body + the outside. Spread over its micro-steps: FLOPs and bytes per micro-step, with the outside's bytes
  (from the HLO ops outside the loop) / loop_trips. The outside's FLOPs (elementwise optimizer updates,
  ~1e-4 of a micro-step's) are not split off: the FLOPs stay the cost analysis's, a slight overestimate.
  Every op under any while loop counts as the accumulation loop's: the train step has no other loop."""
  outside = sum(o["bytes"] for o in ops if not o["in_loop"])
  looped = loop_trips > 1 and any(o["in_loop"] for o in ops)
  spread = bytes_accessed - outside + outside / loop_trips if looped else bytes_accessed
  return {"flops": xla_flops, "bytes": spread, "once_per_step_bytes": outside}


def _summary(
  cost: dict, mem: dict, text: str, model_flops: float, device_kind: str, top: int, loop_trips: int = 1
) -> dict[str, Any]:
  xla_flops = float(cost.get("flops", float("nan")))
  bytes_accessed = float(cost.get("bytes accessed", float("nan")))
  optimal_s = cost.get("optimal_seconds")
  ops = hlo_ops(text)
  micro = per_micro_step(xla_flops, bytes_accessed, ops, loop_trips)
  out: dict[str, Any] = {
    "device_kind": device_kind,
    "model_flops": model_flops,
    "xla_flops": xla_flops,
    "xla_over_model": xla_flops / model_flops if model_flops else None,
    "bytes_accessed": bytes_accessed,  # the loop body once + the once-per-step ops (XLA's count)
    "loop_trips": loop_trips,
    "once_per_step_bytes": micro["once_per_step_bytes"],
    "bytes_per_micro_step": micro["bytes"],  # the once-per-step ops spread over the micro-steps
    "transcendentals": float(cost.get("transcendentals", 0.0)),
    "optimal_seconds": float(optimal_s) if optimal_s is not None and optimal_s > 0 else None,
  }
  out.update(mem)
  chip = chip_for(device_kind)
  if chip is not None:
    out["chip"] = dataclasses.asdict(chip)
    out.update(roofline(model_flops, micro["flops"], micro["bytes"], chip))
    if out["optimal_seconds"]:
      out["optimal_mfu"] = model_flops / (out["optimal_seconds"] * chip.peak_flops)
    if out.get("memory_per_device_gib") is not None:
      out["fits"] = out["memory_per_device_gib"] <= chip.hbm_gib
  out["hlo_bytes_total"] = sum(o["bytes"] for o in ops)  # ~ bytes_accessed: tiled as the cost analysis counts
  out["hlo_logical_bytes_total"] = sum(o["logical_bytes"] for o in ops)  # without tile padding
  out["hlo_cycles_total"] = sum(o["cycles"] for o in ops)
  out["top_ops"] = sorted(ops, key=lambda o: -o["bytes"])[:top]
  out["bytes_by_scope"] = by_scope(ops)
  out["bytes_by_opcode"] = by_key(ops, lambda o: o["kind"])
  return out


# ------------------------------------------------------------------------------------------------
# Optimized HLO text -> per-op bytes and estimated cycles

_DTYPE_BYTES = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "bf16": 2,
  "f16": 2,
  "s16": 2,
  "u16": 2,
  "f32": 4,
  "s32": 4,
  "u32": 4,
  "f64": 8,
  "s64": 8,
  "u64": 8,
  "c64": 8,
  "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-_]*)\((.*)$")
_COMP = re.compile(r"^(ENTRY\s+)?%(\S+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"\b(?:body|condition|to_apply|calls|branch_computations|true_computation|false_computation)=")
# Ops whose operands/outputs are not memory traffic of their own (views, bookkeeping, async halves).
_FREE = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "while",
  "conditional",
  "call",
  "after-all",
  "partition-id",
  "replica-id",
  "copy-done",
  "collective-permute-done",
  "all-gather-done",
  "all-reduce-done",
  "async-done",
  "opt-barrier",
}


def _array_bytes(dtype: str, dims: str, layout: str | None, tiled: bool = True) -> float:
  """Bytes of one array; `tiled`: as stored, its minor dims padded to the layout's tile (e.g. T(8,128): the
  minor-most dim to a multiple of 128, the next to 8), which is what the TPU cost analysis counts."""
  size = _DTYPE_BYTES.get(dtype)
  if size is None:
    return 0.0
  shape = [int(d) for d in dims.split(",") if d] if dims else []
  if tiled and layout and shape:
    m = re.match(r"\{([0-9,]*)(?::(.*))?\}", layout)
    minor_to_major = [int(x) for x in m.group(1).split(",") if x] if m else []
    tile = re.search(r"T\(([0-9,]+)\)", (m.group(2) or "") if m else "")
    if tile and minor_to_major:
      for j, t in enumerate(reversed([int(x) for x in tile.group(1).split(",")])):
        if j < len(minor_to_major):
          d = minor_to_major[j]
          shape[d] = -(-shape[d] // t) * t
  return math.prod(shape) * size


def shape_bytes(shape: str, tiled: bool = True) -> float:
  """Bytes of an HLO shape string (arrays or tuples of them): tiled as stored (default) or logical."""
  return sum(_array_bytes(m.group(1), m.group(2), m.group(3), tiled) for m in _ARRAY.finditer(shape))


def _split_operands(s: str) -> tuple[list[str], str]:
  """'%a, %b), attrs...' -> (['a', 'b'], 'attrs...')."""
  depth, i = 1, 0
  while i < len(s) and depth:
    depth += {"(": 1, ")": -1}.get(s[i], 0)
    i += 1
  inner, rest = s[: i - 1], s[i:]
  return re.findall(r"%([\w.\-]+)", inner), rest


def _scope(op_name: str) -> str:
  """jax op_name -> the model module path it came from (transforms and jit wrappers dropped)."""
  parts = [p for p in op_name.split("/") if p]
  keep = []
  for p in parts:
    p = re.sub(r"^(?:jit|pjit|remat|checkpoint|jvp|transpose|vmap|while|body|cond|scan)\((.*)\)$", r"\1", p)
    while re.match(r"^\w+\((.*)\)$", p):
      p = re.sub(r"^\w+\((.*)\)$", r"\1", p)
    keep.append(p)
  return "/".join(keep)


def hlo_ops(text: str) -> list[dict[str, Any]]:
  """Every memory-touching op of the scheduled computations (entry, loop bodies, called computations;
  not the insides of fusions) with its bytes (operands + outputs), the compiler's estimated cycles, its
  opcode / fusion kind and op_name."""
  comps: dict[str, list[str]] = {}
  entry = None
  current = None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m:
      current = m.group(2)
      comps[current] = []
      if m.group(1):
        entry = current
      continue
    if current is not None:
      if line.startswith("}"):
        current = None
      else:
        comps[current].append(line)
  if entry is None:
    return []
  # computations reached from the entry through control flow (not fusion bodies / reducers), and whether
  # through a while loop (its body runs once per trip: the accumulation loop's micro-steps)
  reached: dict[str, bool] = {}
  todo = [(entry, False)]
  while todo:
    name, in_loop = todo.pop()
    if name not in comps or (name in reached and (reached[name] or not in_loop)):
      continue  # seen, unless first reached outside a loop and now inside one
    reached[name] = in_loop
    for line in comps[name]:
      for m in re.finditer(
        r"\b(body|condition|branch_computations|true_computation|false_computation|calls)=([^,]*)", line
      ):
        if m.group(1) == "calls" and " call(" not in line and "async-start" not in line:
          continue  # fusion bodies are accounted for by the fusion op
        loop = in_loop or m.group(1) in ("body", "condition")
        todo.extend((c, loop) for c in re.findall(r"%([\w.\-]+)", m.group(2)))
  ops = []
  for name in comps:
    if name not in reached:
      continue
    shapes: dict[str, str] = {}
    names: dict[str, str] = {}  # op_name, or (compiler-inserted copies, pads...) the first operand's
    for line in comps[name]:
      m = _INSTR.match(line)
      if not m:
        continue
      iname, shape, opcode, rest = m.groups()
      shapes[iname] = shape
      operands, attrs = _split_operands(rest)
      opn = re.search(r'op_name="([^"]*)"', attrs)
      op_name = opn.group(1) if opn else next((names[o] for o in operands if names.get(o)), "")
      names[iname] = op_name
      if opcode in _FREE:
        continue
      traffic = []
      for tiled in (True, False):
        out_bytes = shape_bytes(shape, tiled)
        in_bytes = sum(shape_bytes(shapes.get(o, ""), tiled) for o in operands)
        if opcode.endswith("-start"):  # async start: the output tuple repeats its operands
          out_bytes -= in_bytes
        traffic.append(in_bytes + max(out_bytes, 0.0))
      kind = opcode
      if opcode == "fusion":
        k = re.search(r"kind=(k\w+)", attrs)
        kind = f"fusion:{k.group(1)}" if k else "fusion"
        if "convolution" in iname or _is_conv_fusion(attrs):
          kind += ":conv"
      cyc = re.search(r'"estimated_cycles":"(\d+)"', attrs)
      ops.append(
        {
          "name": iname,
          "computation": name,
          "in_loop": reached[name],
          "kind": kind,
          "bytes": traffic[0],
          "logical_bytes": traffic[1],
          "cycles": int(cyc.group(1)) if cyc else 0,
          "shape": _short_shape(shape),
          "op_name": op_name,
          "scope": _scope(op_name),
        }
      )
  return ops


def _is_conv_fusion(attrs: str) -> bool:
  return '"kernel_window_bounds":["' in attrs


def _short_shape(shape: str) -> str:
  return ", ".join(f"{m.group(1)}[{m.group(2)}]" for m in _ARRAY.finditer(shape))


def by_key(ops: list[dict], key: Any) -> dict[str, float]:
  acc: dict[str, float] = defaultdict(float)
  for o in ops:
    acc[key(o)] += o["bytes"]
  return dict(sorted(acc.items(), key=lambda kv: -kv[1]))


_MODULE = re.compile(
  r"(stem|conv_in|down\d+_\w+?|mid_\w+?|up\d+_\w+?|out_norm|out_conv|head|time_mlp\d|region_embed)(?=/|$)"
)


def by_scope(ops: list[dict], depth: int = 1) -> dict[str, float]:
  """Bytes per model module (the first `depth` UNet module names in the op's scope). Ops outside any named
  module: 'skip concat' (the decoder's concatenations and their split in the backward), 'remat copies',
  'optimizer/EMA' (outside the accumulation loop), 'step' (noise, loss, input assembly), 'unattributed'
  (no op_name: layout copies and prefetches the compiler added)."""

  def key(o):
    names = _MODULE.findall(o["scope"])
    if names:
      return "/".join(names[:depth])
    name = o["op_name"]
    if not name:
      return "unattributed"
    last = name.rsplit("/", 1)[-1]
    if "decoder" in name and last in ("concatenate", "split"):
      return "skip concat"
    if last.startswith("remat"):
      return "remat copies"
    if o["computation"].startswith("main"):
      return "optimizer/EMA"
    return "step"

  return by_key(ops, key)
