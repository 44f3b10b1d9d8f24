"""Set-up the sampler/task benchmarks share: the prior, the real CT and its liver crops, window conditions,
results files. Imported by benchmarks/task_eval.py, solver_quality.py and sliding_window.py (run as scripts
from the repository root or anywhere: this module puts the repository on sys.path).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
LIVER = 5  # TotalSegmentator label of the liver in example_seg_fast_force_split


UNTRAINED = "preset:"


def add_prior_flags(p) -> None:
  """--checkpoint (a builtin name such as tiny_phantom, an exported dir, a training workdir, or preset:NAME: a
  pretrain preset's model with random params, for speed only) and
  --inference_dtype (configs/task_options.py)."""
  p.add_argument("--checkpoint", default="tiny_phantom")
  p.add_argument("--inference_dtype", default="auto", help="auto | float32 | bfloat16")


def load_prior(args) -> Any:
  from meddiff_jax import pretrained

  if args.checkpoint.startswith(UNTRAINED):  # speed only: a preset's architecture, random params
    from meddiff_jax.configs import pretrain

    pre = pretrained.untrained(pretrain.get_config(args.checkpoint.removeprefix(UNTRAINED)))
    return pretrained.with_compute_dtype(pre, pretrained.inference_dtype(args.inference_dtype))
  return pretrained.load(args.checkpoint, compute_dtype=args.inference_dtype)


def commit() -> str:
  return subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
  ).stdout.strip()


SCANS = ("example_ct", "dicom")


def add_scan_flags(p) -> None:
  """--scan: example_ct (the 3 mm abdomen CT; tiny_ct trained on it) or dicom (example_ct_dicom/, another
  patient, never trained on: the held-out scan); --spacing: native | prior (the checkpoint's training spacing)
  | 'X,Y,Z' mm."""
  p.add_argument("--scan", default="example_ct", choices=SCANS)
  p.add_argument("--spacing", default="native")


def scan_spacing(args, pre) -> tuple[float, float, float] | None:
  if args.spacing == "native":
    return None
  if args.spacing == "prior":
    spacing = pre.data.training_spacing()  # what the tasks resample to
    if spacing is None:
      raise SystemExit(f"--spacing=prior: {args.checkpoint} records no training spacing")
    return spacing
  return tuple(float(v) for v in args.spacing.split(","))


def real_ct(
  data_dir: str | pathlib.Path = DATA, scan: str = "example_ct", spacing: tuple[float, float, float] | None = None
):
  """(CT, TotalSegmentator labels) as `volumes.Volume`s in RAS, labels on the CT's grid, optionally resampled
  to `spacing` mm (trilinear CT, nearest labels)."""
  from meddiff_jax.data import volume_io, volumes

  data_dir = pathlib.Path(data_dir)
  if scan == "example_ct":
    ct = volume_io.load(data_dir / "example_ct.nii.gz")
    seg = volume_io.load(data_dir / "example_seg_fast_force_split.nii.gz", is_mask=True)
  elif scan == "dicom":  # labels were made on dcm2niix's grid of the series: put them on ours by world position
    ct = volume_io.load(data_dir / "example_ct_dicom")
    seg = volume_io.load(data_dir / "example_seg_dicom.nii.gz", is_mask=True)
    seg = volumes.resample_like(seg, ct.shape, ct.affine, order=0)
  else:
    raise ValueError(f"scan {scan!r}: choose one of {SCANS}")
  if spacing:
    ct = volumes.resample(ct, spacing)
    seg = volumes.resample_like(seg, ct.shape, ct.affine, order=0)
  return ct, seg


def crop_around(centre: np.ndarray, size: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
  """A size^3 box around `centre`, moved inside the volume (an axis shorter than `size` is taken whole)."""
  sizes = np.minimum(size, np.array(shape))
  centre = np.clip(np.asarray(centre), sizes // 2, np.array(shape) - (sizes - sizes // 2))
  return tuple(slice(int(m - n // 2), int(m - n // 2 + n)) for m, n in zip(centre, sizes))


def liver_centre(seg) -> np.ndarray:
  return np.argwhere(seg.data == LIVER).mean(0).astype(int)


def window_conditions(pre, n: int, region: int = 2) -> dict:
  """Conditions of n whole-frame windows (position box [-1, 1]^3, one region, organs unknown)."""
  import jax.numpy as jnp

  w = pre.patch_size
  cond = {"pos_box": jnp.tile(jnp.array([[[-1.0, 1.0]] * 3]), (n, 1, 1)), "region": jnp.full((n,), region, jnp.int32)}
  if pre.spec.structure_channels:
    cond["structures"] = jnp.zeros((n, w, w, w, pre.spec.structure_channels), jnp.uint8)
  return cond


def rmse(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def write_json(name: str, result: dict) -> pathlib.Path:
  out = RESULTS / name
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1))
  return out


def parse_budgets(text: str) -> list[tuple[str, int]]:
  """'ddim:10,dpmpp_2m:20' -> [('ddim', 10), ('dpmpp_2m', 20)]."""
  out = []
  for item in filter(None, text.split(",")):
    method, steps = item.split(":")
    out.append((method, int(steps)))
  return out


def synthetic_batch(spec_batch: dict) -> dict[str, np.ndarray]:
  """Values of the shapes and dtypes the host ships (step.batch_spec: the store's HU with data.decode_on_device,
  the default, or finished samples): speed only, so plausible ranges, no phantom."""
  from meddiff_jax.models import conditions

  rng = np.random.default_rng(0)
  host = {}
  for key, s in spec_batch.items():
    if key == conditions.POS_BOX:
      host[key] = np.tile(np.array([[-1.0, 1.0]], np.float32), (s.shape[0], 3, 1))
    elif s.dtype == np.int16:  # HU
      host[key] = rng.integers(-1000, 1000, s.shape).astype(np.int16)
    elif s.dtype == np.float32:  # a finished image / hint, or zoom2's resized HU
      host[key] = rng.uniform(-1, 1, s.shape).astype(np.float32)
    else:  # region / operation ids, label codes (0: background) and structure channels
      host[key] = np.zeros(s.shape, s.dtype)
  return host
