"""Peak memory (RSS) of prepare and of the tasks on one large volume, against its voxel bytes V.

python benchmarks/memory_big_volume.py [--side=1024] [--spacing=0.5] [--commands=prepare,denoise,anomaly]
    [--task_spacing=checkpoint] [--prepare_spacing=MM] [--gzip] [--dir=/tmp/meddiff_memory]
python benchmarks/memory_big_volume.py --commands=super_resolution --controlnet=SR_WORKDIR  (a controlnet:sr run)
python benchmarks/memory_big_volume.py --commands=lesion --controlnet=LESION_WORKDIR  (inpaints a sphere's mask)

Writes a SIDE^3 int16 CT-like NIfTI (air around an elliptic body of fat, soft tissue and bone: the CT check and
the region estimate accept it as an abdomen) at SPACING mm, then runs each command as a user runs it (`python -m
meddiff_jax.main`, one CPU device) under /usr/bin/time and reports its peak RSS in GB and as a multiple of V
(SIDE^3 x 2 bytes). The tasks run with the shipped tiny_phantom at its 3 mm training spacing (--task_spacing;
denoise's own default is the scan's grid) and one step: their memory is the scan's, not the sampler's. Prints
a JSON line per command; --json appends them to benchmarks/results/memory_big_volume.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_nifti(path: pathlib.Path, side: int, spacing: float, dtype: type, sections) -> None:
  """A side^3 NIfTI on an isotropic `spacing` grid, written one z section (x fastest) at a time from `sections`
  (an iterator of (side, side) arrays indexed [y, x]): never the whole array in memory."""
  import nibabel as nib

  affine = np.diag([spacing, spacing, spacing, 1.0])
  header = nib.Nifti1Header()
  header.set_data_shape((side, side, side))
  header.set_data_dtype(dtype)
  header.set_qform(affine, code=1)
  header.set_sform(affine, code=1)
  header.set_slope_inter(1.0, 0.0)
  with nib.openers.Opener(str(path), "wb") as f:
    header.write_to(f)
    f.write(b"\0" * (int(header["vox_offset"]) - 348))
    for section in sections:
      f.write(np.asfortranarray(np.asarray(section, dtype).T).T.tobytes(order="F"))


def write_volume(path: pathlib.Path, side: int, spacing: float) -> None:
  """A CT-like int16 volume: one noisy body section repeated along z."""
  y, x = np.mgrid[:side, :side].astype(np.float32)
  c = (side - 1) / 2
  body = ((x - c) / (0.42 * side)) ** 2 + ((y - c) / (0.30 * side)) ** 2 <= 1
  inner = ((x - c) / (0.36 * side)) ** 2 + ((y - c) / (0.25 * side)) ** 2 <= 1
  bone = (x - c) ** 2 + (y - 0.75 * side) ** 2 <= (0.04 * side) ** 2
  section = np.full((side, side), -1000, np.int16)
  section[body] = -100  # fat
  section[inner] = 40  # soft tissue
  section[bone] = 700
  rng = np.random.default_rng(0)
  noisy = (section + rng.normal(0, 20, section.shape).astype(np.int16) for _ in range(side))
  write_nifti(path, side, spacing, np.int16, noisy)


def write_mask(path: pathlib.Path, side: int, spacing: float) -> None:
  """A uint8 lesion mask on write_volume's grid: a sphere of radius side / 16 voxels in the body's soft tissue."""
  y, x = np.mgrid[:side, :side].astype(np.float32)
  c, r = (side - 1) / 2, side / 16
  spheres = ((x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2 <= r**2 for z in range(side))
  write_nifti(path, side, spacing, np.uint8, spheres)


def run(args: list[str]) -> tuple[float, float, int, str]:
  """(peak RSS GB, wall seconds, exit status, last stderr line) of `python -m meddiff_jax.main ARGS`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  start = time.perf_counter()
  proc = subprocess.run(
    ["/usr/bin/time", "-f", "MAXRSS_KB %M", sys.executable, "-m", "meddiff_jax.main", *args],
    env=env,
    capture_output=True,
    text=True,
  )
  wall = time.perf_counter() - start
  kb = int(re.findall(r"MAXRSS_KB (\d+)", proc.stderr)[-1])
  last = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("MAXRSS")]
  return kb * 1024 / 1e9, wall, proc.returncode, (last[-1] if last else "")[-300:]


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--side", type=int, default=1024)
  parser.add_argument("--spacing", type=float, default=0.5)
  parser.add_argument("--commands", default="prepare,denoise,anomaly")
  parser.add_argument(
    "--task_spacing", default="checkpoint", help="the tasks' --config.spacing (denoise: input by default)"
  )
  parser.add_argument(
    "--prepare_spacing", type=float, default=None, help="prepare's --config.spacing in mm (default: the volume's own)"
  )
  parser.add_argument("--controlnet", default="", help="the super_resolution / lesion command's ControlNet workdir")
  parser.add_argument("--gzip", action="store_true", help="write .nii.gz (slower) instead of .nii")
  parser.add_argument("--dir", default="/tmp/meddiff_memory")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  work = pathlib.Path(args.dir)
  (work / "in").mkdir(parents=True, exist_ok=True)
  name = f"ct_{args.side}_{args.spacing:g}mm.nii" + (".gz" if args.gzip else "")
  volume = work / "in" / name
  if not volume.exists():
    t = time.perf_counter()
    write_volume(volume, args.side, args.spacing)
    print(f"wrote {volume} in {time.perf_counter() - t:.0f} s", flush=True)
  voxel_gb = args.side**3 * 2 / 1e9
  for command in args.commands.split(","):
    out = work / f"out_{command}"
    subprocess.run(["rm", "-rf", str(out), str(out) + ".nii.gz", str(out) + ".json"], check=True)
    if command == "prepare":
      mm = args.prepare_spacing or args.spacing
      cli = [
        "--config=prepare",
        f"--config.input_dir={work / 'in'}",
        f"--config.output_dir={out}",
        "--config.default_region=abdomen",
        "--config.workers=1",
        "--config.store_format=npy",
        f"--config.spacing=({mm},{mm},{mm})",
      ]
    else:
      cli = [f"--config={command}", f"--config.input={volume}", f"--config.output={out}.nii.gz", "--config.num_steps=1"]
      cli.append(f"--config.spacing={args.task_spacing}")
      cli.append("--config.region=abdomen")  # (a small SIDE makes a body too small to tell neck from abdomen)
      if command in ("super_resolution", "lesion"):
        cli.append(f"--config.controlnet={args.controlnet}")
      if command == "lesion":  # RePaint with one step and no jumps: the scan's memory, not the schedule's
        mask = work / "in" / name.replace("ct_", "mask_")
        if not mask.exists():
          write_mask(mask, args.side, args.spacing)
        cli += [f"--config.mask={mask}", "--config.jump_timesteps=1", "--config.jump_n_sample=1"]
    gb, wall, rc, last = run(cli)
    row = {
      "command": command,
      "volume": f"{args.side}^3 int16 at {args.spacing:g} mm" + (" (.nii.gz)" if args.gzip else " (.nii)"),
      "task_spacing": None if command == "prepare" else args.task_spacing,
      "voxel_gb": round(voxel_gb, 3),
      "peak_rss_gb": round(gb, 2),
      "peak_over_voxel_bytes": round(gb / voxel_gb, 2),
      "seconds": round(wall, 1),
      "rc": rc,
    }
    if command == "prepare":
      row["prepare_spacing_mm"] = mm
    if rc:
      row["error"] = last
    print(json.dumps(row), flush=True)
    if args.json:
      with open(REPO / "benchmarks" / "results" / "memory_big_volume.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
