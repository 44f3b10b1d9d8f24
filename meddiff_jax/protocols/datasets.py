"""Cases of an evaluation protocol: the generic CSV form and the published datasets' layouts.

A case is an id plus paths by role (`low`/`high`, `thick`/`thin`, `image`/`mask`/`label`/`labels`) and,
for anomaly detection, a 0/1 label. A path may be a NIfTI file, a DICOM series directory (Mayo, TCIA),
or a PNG slice (BMAD); `load_volume` turns any of them into a RAS `volumes.Volume`. Every problem is a
one-line error naming the file (and CSV line) and what is wrong. Layouts are documented in
docs/evaluation.md.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
from typing import Any

import numpy as np

from meddiff_jax.data import preprocess, volume_io, volumes

CSV_COLUMNS = {
  "denoising": ("low", "high"),
  "super_resolution": ("thick", "thin"),
  "lesion": ("image", "mask"),
  "inpainting": ("image", "mask"),
  "anomaly": ("image", "label", "is_abnormal"),
  "synthesis": ("image", "labels"),
}
OPTIONAL_COLUMNS = {"anomaly": ("label",)}  # an empty label path: no voxel labels for that case
DATASETS = {  # name -> protocols it serves
  "mayo2016": ("denoising",),
  "bmad_liver": ("anomaly",),
  "rplhr_ct": ("super_resolution",),
  "msd_task03_liver": ("lesion", "inpainting"),
  "msd_task06_lung": ("lesion", "inpainting"),
  "tcia_lymph_nodes": ("lesion", "inpainting"),
}
MAYO_PATIENTS = ("L067", "L096", "L109", "L143", "L192", "L286", "L291", "L310", "L333", "L506")


@dataclasses.dataclass
class Case:
  id: str
  paths: dict[str, str]
  is_abnormal: int | None = None
  mask_labels: tuple[int, ...] = ()  # label values of `mask` that form the lesion (MSD: tumour only)


class DatasetError(ValueError):
  pass


def read_cases(config: Any) -> list[Case]:
  """The cases a config names: --config.pairs=CSV or --config.dataset=NAME --config.data_root=DIR."""
  protocol = config.protocol
  if bool(config.pairs) == bool(config.dataset):
    raise DatasetError("give exactly one of --config.pairs=FILE.csv or --config.dataset=NAME (with --config.data_root)")
  if config.pairs:
    cases = read_pairs_csv(config.pairs, protocol)
  else:
    if config.dataset not in DATASETS:
      raise DatasetError(f"--config.dataset={config.dataset!r}; choose from {sorted(DATASETS)}")
    if protocol not in DATASETS[config.dataset]:
      raise DatasetError(f"dataset {config.dataset} serves protocols {DATASETS[config.dataset]}, not {protocol!r}")
    if not config.data_root or not os.path.isdir(config.data_root):
      raise DatasetError(f"--config.data_root={config.data_root!r} is not a directory")
    reader = {
      "mayo2016": lambda: mayo2016(config.data_root, config.mayo_thickness),
      "bmad_liver": lambda: bmad_liver(config.data_root, config.split),
      "rplhr_ct": lambda: rplhr_ct(config.data_root, config.split),
      "msd_task03_liver": lambda: msd(
        config.data_root, "Task03_Liver", config.split, config.test_fraction, config.split_seed
      ),
      "msd_task06_lung": lambda: msd(
        config.data_root, "Task06_Lung", config.split, config.test_fraction, config.split_seed
      ),
      "tcia_lymph_nodes": lambda: tcia_lymph_nodes(
        config.data_root, config.ln_subset, config.split, config.test_fraction, config.split_seed
      ),
    }[config.dataset]
    cases = reader()
  if config.max_cases:
    cases = cases[: int(config.max_cases)]
  if not cases:
    raise DatasetError("no cases found")
  return cases


def read_pairs_csv(path: str, protocol: str) -> list[Case]:
  if protocol not in CSV_COLUMNS:
    raise DatasetError(f"protocol {protocol!r} has no CSV form; choose from {sorted(CSV_COLUMNS)}")
  if not os.path.isfile(path):
    raise DatasetError(f"{path}: pairs CSV does not exist")
  need = CSV_COLUMNS[protocol]
  base = os.path.dirname(os.path.abspath(path))
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in need if c not in header]
    if missing:
      raise DatasetError(
        f"{path}: header must have columns {list(need)} (optional: id) for protocol {protocol}; "
        f"missing {missing}, got {header}"
      )
    cases, seen = [], set()
    for line, row in enumerate(reader, start=2):
      row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
      paths = {}
      for col in need:
        if col == "is_abnormal":
          continue
        value = row.get(col, "")
        if not value:
          if col in OPTIONAL_COLUMNS.get(protocol, ()):
            continue
          raise DatasetError(f"{path} line {line}: column {col!r} is empty")
        full = value if os.path.isabs(value) else os.path.join(base, value)
        if not os.path.exists(full):
          raise DatasetError(f"{path} line {line}: column {col!r}: {full} does not exist")
        paths[col] = full
      label = None
      if "is_abnormal" in need:
        raw = row.get("is_abnormal", "").lower()
        if raw not in ("0", "1", "true", "false"):
          raise DatasetError(f"{path} line {line}: is_abnormal must be 0/1 (or true/false), got {raw!r}")
        label = int(raw in ("1", "true"))
      cid = row.get("id") or _stem(paths[need[0]])
      if cid in seen:
        cid = f"{cid}_{line}"
      seen.add(cid)
      cases.append(Case(cid, paths, label))
  if not cases:
    raise DatasetError(f"{path}: no rows")
  return cases


def _stem(path: str) -> str:
  name = os.path.basename(os.path.normpath(path))
  for ext in (".nii.gz", ".nii", ".png"):
    if name.endswith(ext):
      return name[: -len(ext)]
  return name


def mayo2016(root: str, thickness: str = "3mm") -> list[Case]:
  """AAPM / Mayo 2016 Low-Dose CT Grand Challenge: ROOT/<patient>/{quarter,full}_<thickness>/*.IMA."""
  cases = []
  for pdir in sorted(glob.glob(os.path.join(root, "*"))):
    low, high = os.path.join(pdir, f"quarter_{thickness}"), os.path.join(pdir, f"full_{thickness}")
    if not os.path.isdir(pdir) or not (os.path.isdir(low) or os.path.isdir(high)):
      continue
    for d in (low, high):
      if not os.path.isdir(d):
        raise DatasetError(f"{d}: missing (Mayo 2016 layout: <patient>/quarter_{thickness} and full_{thickness})")
    cases.append(Case(os.path.basename(pdir), {"low": low, "high": high}))
  if not cases:
    raise DatasetError(
      f"{root}: no <patient>/quarter_{thickness} + full_{thickness} folders (Mayo 2016 layout; "
      f"patients {', '.join(MAYO_PATIENTS)})"
    )
  return cases


def bmad_liver(root: str, split: str = "test") -> list[Case]:
  """BMAD Liver CT: ROOT/<split>/good/img/*.png (normal) and ROOT/<split>/Ungood/{img,label}/*.png."""
  if split not in ("valid", "test"):
    raise DatasetError(f"BMAD liver split {split!r}; choose valid or test (train has only normal slices)")
  cases = []
  for kind, abnormal in (("good", 0), ("Ungood", 1)):
    img_dir = os.path.join(root, split, kind, "img")
    if not os.path.isdir(img_dir):
      raise DatasetError(f"{img_dir}: missing (BMAD liver layout: <split>/good/img, <split>/Ungood/img + label)")
    for img in sorted(glob.glob(os.path.join(img_dir, "*.png"))):
      paths = {"image": img}
      label = os.path.join(root, split, kind, "label", os.path.basename(img))
      if abnormal and not os.path.isfile(label):
        raise DatasetError(f"{label}: label missing for abnormal slice {img}")
      if os.path.isfile(label):
        paths["label"] = label
      cases.append(Case(f"{kind}_{_stem(img)}", paths, abnormal))
  return cases


def rplhr_ct(root: str, split: str = "test") -> list[Case]:
  """RPLHR-CT: ROOT/<split>/5mm/<case>.nii.gz (thick) paired with ROOT/<split>/1mm/<case>.nii.gz (thin)."""
  thick_dir, thin_dir = os.path.join(root, split, "5mm"), os.path.join(root, split, "1mm")
  for d in (thick_dir, thin_dir):
    if not os.path.isdir(d):
      raise DatasetError(f"{d}: missing (RPLHR-CT layout: <train|val|test>/{{1mm,5mm}}/<case>.nii.gz)")
  cases = []
  for thick in sorted(glob.glob(os.path.join(thick_dir, "*.nii.gz"))):
    thin = os.path.join(thin_dir, os.path.basename(thick))
    if not os.path.isfile(thin):
      raise DatasetError(f"{thin}: thin-slice partner of {thick} missing")
    cases.append(Case(_stem(thick), {"thick": thick, "thin": thin}))
  return cases


def _split(cases: list[Case], split: str, test_fraction: float, seed: int) -> list[Case]:
  """Deterministic train/test split (the paper's 80/20; its assignment is not published)."""
  if split == "all":
    return cases
  if split not in ("train", "test"):
    raise DatasetError(f"split {split!r}; choose train, test or all")
  order = np.random.default_rng(seed).permutation(len(cases))
  n_test = int(round(test_fraction * len(cases)))
  chosen = sorted(order[:n_test]) if split == "test" else sorted(order[n_test:])
  return [cases[i] for i in chosen]


def msd(root: str, task: str, split: str = "test", test_fraction: float = 0.2, seed: int = 0) -> list[Case]:
  """Medical Segmentation Decathlon: ROOT[/TaskNN_Name]/dataset.json + imagesTr/ + labelsTr/.

  Lesion = label 2 (tumour) for Task03_Liver, label 1 (nodule) for Task06_Lung."""
  if os.path.isdir(os.path.join(root, task)):
    root = os.path.join(root, task)
  lesion = {"Task03_Liver": (2,), "Task06_Lung": (1,)}[task]
  ds_json = os.path.join(root, "dataset.json")
  if os.path.isfile(ds_json):
    try:
      with open(ds_json) as f:
        entries = json.load(f)["training"]
      pairs = [(os.path.join(root, e["image"]), os.path.join(root, e["label"])) for e in entries]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise DatasetError(
        f"{ds_json}: not an MSD dataset.json with a 'training' list ({type(e).__name__}: {e})"
      ) from None
  else:
    images = sorted(
      p for p in glob.glob(os.path.join(root, "imagesTr", "*.nii.gz")) if not os.path.basename(p).startswith("._")
    )
    if not images:
      raise DatasetError(f"{root}: neither dataset.json nor imagesTr/*.nii.gz (MSD {task} layout)")
    pairs = [(p, os.path.join(root, "labelsTr", os.path.basename(p))) for p in images]
  cases = []
  for image, label in pairs:
    for p in (image, label):
      if not os.path.isfile(p):
        raise DatasetError(f"{p}: listed in {task} but missing")
    cases.append(Case(_stem(image), {"image": image, "mask": label}, mask_labels=lesion))
  return _split(sorted(cases, key=lambda c: c.id), split, test_fraction, seed)


def tcia_lymph_nodes(
  root: str, subset: str = "", split: str = "test", test_fraction: float = 0.2, seed: int = 0
) -> list[Case]:
  """TCIA CT Lymph Nodes: ROOT/MED_ABD_LYMPH_MASKS/<ID>/<ID>_mask.nii.gz with the CT either as a DICOM series
  under ROOT/CT Lymph Nodes/<ID>/ (TCIA download) or as ROOT/images/<ID>.nii.gz (converted, e.g. dcm2niix).
  subset: MED (mediastinal, the paper's MED-LN), ABD (abdominal, ABD-LN) or '' for both."""
  mask_root = os.path.join(root, "MED_ABD_LYMPH_MASKS")
  if not os.path.isdir(mask_root):
    raise DatasetError(f"{mask_root}: missing (TCIA CT Lymph Nodes layout)")
  if subset not in ("", "MED", "ABD"):
    raise DatasetError(f"--config.ln_subset={subset!r}; choose MED, ABD or ''")
  cases = []
  for pid in sorted(os.listdir(mask_root)):
    if subset and not pid.startswith(subset):
      continue
    mask = os.path.join(mask_root, pid, f"{pid}_mask.nii.gz")
    if not os.path.isfile(mask):
      raise DatasetError(f"{mask}: lymph-node mask missing")
    nii = os.path.join(root, "images", f"{pid}.nii.gz")
    dcm = os.path.join(root, "CT Lymph Nodes", pid)
    image = nii if os.path.isfile(nii) else (_series_dir(dcm) if os.path.isdir(dcm) else "")
    if not image:
      raise DatasetError(f"{pid}: CT missing (expected {nii} or a DICOM series under {dcm})")
    cases.append(Case(pid, {"image": image, "mask": mask}))
  return _split(cases, split, test_fraction, seed)


def _series_dir(root: str) -> str:
  """The directory under `root` holding the most files (a TCIA download nests study/series folders)."""
  best, count = "", 0
  for d, _, files in os.walk(root):
    if len(files) > count:
      best, count = d, len(files)
  return best


def load_volume(path: str, is_mask: bool = False, png_depth: int = 16, png_spacing: float = 1.0) -> volumes.Volume:
  """NIfTI file, DICOM series directory or PNG slice -> RAS Volume (HU for images, int labels for masks)."""
  if path.lower().endswith(".png"):
    return read_png_slice(path, is_mask, png_depth, png_spacing)
  return volume_io.load(path, is_mask=is_mask)


def read_png_slice(path: str, is_mask: bool, depth: int, spacing: float) -> volumes.Volume:
  """A BMAD slice (8-bit, already windowed) as a volume of `depth` identical slices: grey 1..255 maps
  linearly onto the abdomen window's HU range, grey 0 (at or below the window) to -1024 HU, which the
  model sees identically (-1 after windowing) and which makes the body mask (HU > -500) the non-zero
  pixels. Our choice: the 3D prior needs a volume in HU."""
  from PIL import Image

  try:
    img = np.asarray(Image.open(path).convert("L"), np.float32).T  # (W, H): x along the image columns
  except Exception as e:  # noqa: BLE001 - PIL raises many types
    raise volumes.VolumeError(path, f"not a readable PNG ({type(e).__name__}: {e})") from None
  if is_mask:
    data = np.repeat((img > 0)[..., None], depth, axis=2).astype(np.int16)
  else:
    hu = np.where(img > 0, preprocess.unit_to_hu(img / 127.5 - 1.0, "abdomen"), -1024.0).astype(np.float32)
    data = np.repeat(hu[..., None], depth, axis=2)
  return volumes.Volume(data, np.diag([spacing] * 3 + [1.0]), path)
