"""The TPU compiler's roofline of the training step, for a named slice, on any host with libtpu.

Usage (a CPU-only host is fine: libtpu compiles for a topology that is not present):
  JAX_PLATFORMS=cpu python benchmarks/tpu_roofline.py --topology=v5p:2x2x1 --config=configs/pretrain.py:paper
  ... --config.data.patch_size=64 --config.model.remat=dots      # any config override
  ... --topology=v5e:2x2 --out=benchmarks/results/tpu_roofline_paper_v5e.json --hlo_out=/tmp/paper.hlo.txt

Compiles the project's own train step (model, state, sharding rules, step: train/dry_run.py's path through
train/tpu_compile.py) for the slice's devices, and prints per chip and micro-step: model FLOPs (analytic),
XLA FLOPs, bytes accessed, XLA's optimal_seconds, the roofline time max(FLOPs / peak, bytes / HBM bandwidth)
and the MFU it implies, memory per chip, then the ops that move the most bytes and the bytes per model
module. `--from_hlo=FILE` re-analyses a saved optimized HLO text without compiling (the cost-analysis
totals then come from the HLO ops). Writes the JSON row to --out (appended to a .jsonl, or a .json file).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/pretrain.py:PRESET", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU slice name (jax.experimental.topologies)")
_OUT = flags.DEFINE_string("out", "", "write the JSON row here (.jsonl: appended)")
_HLO_OUT = flags.DEFINE_string("hlo_out", "", "save the compiled (optimized) HLO text here")
_FROM_HLO = flags.DEFINE_string("from_hlo", "", "analyse this saved HLO text instead of compiling")
_TOP = flags.DEFINE_integer("top", 15, "rows of the top-ops table")
_LABEL = flags.DEFINE_string("label", "", "a name for this row (e.g. the change measured)")


def model_flops_per_device(config, spec, num_devices: int) -> float:
  """Analytic model FLOPs of one micro-step on one device (3 x forward of a micro-batch / devices)."""
  from meddiff_jax.train import throughput

  return throughput.flops_for_config(config) / num_devices / int(config.training.grad_accum_steps)


def conv_lane_bound(config, spec, lanes: int) -> dict:
  """Upper bound on MFU from MXU column occupancy alone (memory ignored): a conv whose output has C
  features fills C / (ceil(C / lanes) * lanes) of a lanes-wide systolic array (128 on v4/v5e/v5p, 256 on
  v6e); forward and weight-gradient convs output the layer's Cout, the data-gradient conv its Cin.
  Attention and dense layers are counted at full occupancy. From the model's own conv kernels and the
  level each runs at (its module name)."""
  import re

  import jax
  from flax import traverse_util

  from meddiff_jax import pretrained
  from meddiff_jax.models import unet3d

  model = unet3d.UNet3D(spec)
  shapes = jax.eval_shape(pretrained.init_params_fn(model, spec, int(config.data.patch_size)), jax.random.key(0))
  flat = traverse_util.flatten_dict(__import__("flax").linen.meta.unbox(shapes))
  patch, last = int(config.data.patch_size), len(spec.channel_mult) - 1
  occ = lambda c: c / (-(-c // lanes) * lanes)
  conv_flops = slow = 0.0
  for path, leaf in flat.items():
    if path[-1] != "kernel" or len(leaf.shape) != 5:
      continue
    name = "/".join(path)
    m = re.search(r"(down|up)(\d+)_(\w+?)/", name)
    level = int(m.group(2)) if m else (last if "mid_" in name else 0)
    if m and m.group(3) == "downsample":
      level += 1
    if m and m.group(3) == "upsample":
      level -= 1
    k, _, _, cin, cout = leaf.shape
    f = 2.0 * k**3 * cin * cout * (patch // 2**level) ** 3
    conv_flops += 3 * f
    slow += f / occ(cout) + f / occ(cin) + f / occ(cout)
  total = 3 * __import__("meddiff_jax").models.unet3d.forward_flops(spec, (patch,) * 3)
  return {"lanes": lanes, "conv_share": conv_flops / total, "mfu_bound": total / (total - conv_flops + slow)}


def measure(config, topology: str, hlo_out: str = "", from_hlo: str = "", top: int = 15) -> dict:
  from meddiff_jax.train import tpu_compile

  devices = tpu_compile.topology_devices(topology)
  t0 = time.perf_counter()
  if from_hlo:
    spec = config.model
    compiled, facts = None, {"spec": spec, "num_devices": len(devices), "mesh": None}
    text = pathlib.Path(from_hlo).read_text()
  else:
    from meddiff_jax.train import dry_run

    compiled, facts = dry_run.compile_train_step(config, devices)
    text = compiled.as_text()
    if hlo_out:
      pathlib.Path(hlo_out).write_text(text)
  spec, n = facts["spec"], facts["num_devices"]
  flops = model_flops_per_device(config, spec, n)
  trips = int(config.training.grad_accum_steps)
  row = {
    "label": _LABEL.value,
    "topology": topology,
    "num_devices": n,
    "mesh": facts.get("mesh"),
    "preset": config.preset,
    "patch_size": int(config.data.patch_size),
    "micro_batch": int(config.training.batch_size) // int(config.training.grad_accum_steps),
    "grad_accum_steps": int(config.training.grad_accum_steps),
    "remat": spec.remat,
    "dtype": str(spec.dtype),
    "channel_mult": list(spec.channel_mult),
    "params": facts.get("params"),
    "lower_s": facts.get("lower_s"),
    "compile_s": facts.get("compile_s"),
  }
  if compiled is not None:
    row.update(tpu_compile.analyse(compiled, flops, devices[0].device_kind, top=top, hlo_text=text, loop_trips=trips))
  else:
    row.update(tpu_compile.analyse_text(text, flops, devices[0].device_kind, top=top, loop_trips=trips))
  row["conv_lane_bound"] = [conv_lane_bound(config, spec, lanes) for lanes in (128, 256)]
  row["wall_s"] = round(time.perf_counter() - t0, 1)
  return row


def print_table(row: dict) -> None:
  g = 1e9
  print(f"\n{row['preset']} {row['patch_size']}^3 on {row['topology']} ({row['num_devices']} x {row['device_kind']}), ")
  print(f"mesh {row['mesh']}, remat {row['remat']}, per chip and micro-step  [{row['label']}]")
  print("| | value |\n|---|---|")
  rows = [
    ("model FLOPs (3 x forward, analytic)", f"{row['model_flops'] / 1e12:.3f} TFLOP"),
    ("XLA FLOPs", f"{row['xla_flops'] / 1e12:.3f} TFLOP ({100 * (row['xla_over_model'] - 1):+.0f}%)"),
    (
      "bytes accessed (XLA: the loop body once + the once-per-step ops)",
      f"{row['bytes_accessed'] / g:.1f} GB (HLO ops: {row['hlo_bytes_total'] / g:.1f} tiled, "
      f"{row['hlo_logical_bytes_total'] / g:.1f} without tile padding)",
    ),
    (
      f"bytes per micro-step (once-per-step ops / {row['loop_trips']})",
      f"{row['bytes_per_micro_step'] / g:.1f} GB (once per step: {row['once_per_step_bytes'] / g:.1f} GB)",
    ),
    ("XLA optimal_seconds", f"{row['optimal_seconds'] * 1e3:.1f} ms" if row.get("optimal_seconds") else "n/a"),
  ]
  if "chip" in row:
    chip = row["chip"]
    rows += [
      (f"FLOP time at {chip['peak_flops'] / 1e12:.0f} TFLOP/s", f"{row['flop_time_s'] * 1e3:.2f} ms"),
      (f"HBM time at {chip['hbm_bytes_per_s'] / 1e12:.3f} TB/s", f"{row['hbm_time_s'] * 1e3:.2f} ms"),
      ("roofline MFU estimate", f"{100 * row['roofline_mfu']:.1f}% ({row['bound']} bound)"),
    ]
    if row.get("optimal_mfu"):
      rows.append(("MFU at optimal_seconds", f"{100 * row['optimal_mfu']:.1f}%"))
  for b in row.get("conv_lane_bound", []):
    rows.append(
      (
        f"MFU bound from {b['lanes']}-wide MXU occupancy",
        f"{100 * b['mfu_bound']:.0f}% (convs {100 * b['conv_share']:.0f}% of FLOPs)",
      )
    )
  if row.get("memory_per_device_gib") is not None:
    rows.append(("memory per chip", f"{row['memory_per_device_gib']:.2f} GiB (temp {row['temp_gib']:.2f})"))
  if row.get("compile_s") is not None:
    rows.append(("compile time", f"{row['compile_s']:.0f} s"))
  for k, v in rows:
    print(f"| {k} | {v} |")
  print("\nbytes by model module (GB):", ", ".join(f"{k} {v / g:.1f}" for k, v in row["bytes_by_scope"].items()))
  print("bytes by op kind (GB):", ", ".join(f"{k} {v / g:.1f}" for k, v in list(row["bytes_by_opcode"].items())[:8]))
  print("\n| GB | GB unpadded | Mcycles | kind | shape | op |\n|---|---|---|---|---|---|")
  for o in row["top_ops"]:
    print(
      f"| {o['bytes'] / g:.2f} | {o['logical_bytes'] / g:.2f} | {o['cycles'] / 1e6:.2f} | {o['kind']} | "
      f"{o['shape'][:60]} | {o['scope'][-90:]} |"
    )


def main(argv):
  del argv
  from meddiff_jax import checks
  from meddiff_jax.train import tpu_compile
  from meddiff_jax.train.spec import PretrainConfig

  # typed, with the batch plan ('auto' mesh.data / grad_accum_steps) for the slice, as the dry run takes it
  devices = len(tpu_compile.topology_devices(_TOPOLOGY.value))
  config = checks.batch_plan(PretrainConfig.from_config(_CONFIG.value), devices)
  row = measure(config, _TOPOLOGY.value, _HLO_OUT.value, _FROM_HLO.value, _TOP.value)
  print_table(row)
  if _OUT.value:
    out = pathlib.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
      with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    else:
      out.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
