"""Dataset recipes: a public CT dataset's published folder layout -> manifest rows
(image, region, mask, patient, split).

`--config.dataset=NAME --config.input_dir=ROOT` builds the manifest from ROOT as the dataset ships it (layouts
and licences: docs/datasets.md), writes it to OUTPUT_DIR/manifest_NAME.csv for inspection, and prepare.py prepares
it. A recipe lists what the layout promises: a case folder whose image is missing still gets a row, so the
preparation report names the missing file instead of the case silently vanishing.

Masks are TotalSegmentator outputs (what structure conditioning and region curation read), never a dataset's
own organ labels (their ids mean other things). They come from the dataset itself (TotalSegmentator ships them)
or from `--config.mask_dir`: per case `KEY.nii.gz` (a `--ml` label map) or `KEY/` (TotalSegmentator's default
folder of per-class masks, combined here by class name).

Splits: train / val / test by a hash of "dataset/patient" and the seed, so a patient's scans (and all region
sub-volumes cut from them) land in one split, and adding a dataset never moves another's patients.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import hashlib
import io
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from meddiff_jax import storage
from meddiff_jax.data import store, volume_io, volumes

EXTRA_COLUMNS = ("patient", "split", "dataset")
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest_{dataset}.csv"  # one per dataset: several datasets are prepared into one store


@dataclasses.dataclass
class Case:
  image: str
  patient: str
  region: str  # head_neck | chest | abdomen | auto (split by TotalSegmentator landmarks)
  key: str = ""  # name of the case's TotalSegmentator output in mask_dir (default: the patient)
  mask: str = ""  # a label map file or a folder of per-class masks shipped with the dataset


# --------------------------------------------------------------------------------------------- splits


def assign_split(patient: str, seed: int = 0, fractions: Sequence[float] = (0.9, 0.05, 0.05)) -> str:
  """'train' | 'val' | 'test' from a hash of the patient id: deterministic, independent of other patients."""
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
    raise ValueError(f"split fractions {tuple(fractions)} must be three non-negative numbers summing to 1")
  digest = hashlib.sha256(f"{seed}/{patient}".encode()).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def job_extras(entry: Mapping[str, str], image: str, input_dir: str, config: Any) -> dict[str, Any]:
  """Per-job fields beyond prepare's own: patient, split, dataset, class map, region-split settings."""
  dataset = entry.get("dataset") or config.dataset
  patient = entry.get("patient") or os.path.relpath(image, input_dir)
  key = f"{dataset}/{patient}" if dataset else patient
  split = entry.get("split") or assign_split(key, config.split_seed, tuple(config.split_fractions))
  if split not in SPLITS:
    raise ValueError(f"{image}: split {split!r} is not one of {SPLITS}")
  extras = {
    "patient": key,
    "split": split,
    "dataset": dataset,
    "class_map": config.class_map,
    "split_config": dict(config.regions.to_dict()),
  }
  if config.dataset:  # several datasets share one store: their volume ids must not collide
    extras["id"] = f"{config.dataset}-{store.volume_id(image, input_dir)}"
  return extras


# ------------------------------------------------------------------------------------------- masks


@functools.lru_cache(maxsize=4)
def class_map_from(path: str = "") -> dict[int, str]:
  if path:
    from meddiff_jax.data import preprocess

    return preprocess.load_class_map(path)
  from meddiff_jax.data import class_map

  return dict(class_map.TOTAL)


def load_mask(path: str, class_map_path: str = "", options: volumes.ReadOptions | None = None) -> volumes.Volume:
  """A TotalSegmentator label map: one NIfTI file, or a folder of per-class binary masks NAME.nii.gz."""
  if not os.path.isdir(path):
    return volume_io.load(path, is_mask=True, options=options)
  names = {v: k for k, v in class_map_from(class_map_path).items()}
  files = sorted(glob.glob(os.path.join(path, "*.nii*")))
  known = [(names[_stem(f)], f) for f in files if _stem(f) in names]
  if not known:
    raise volumes.VolumeError(
      path,
      f"mask folder has no per-class masks named like the class map (e.g. liver.nii.gz); "
      f"{len(files)} NIfTI files found",
    )
  out = None
  for label, f in known:
    part = volume_io.load(f, is_mask=True, options=options)
    if out is None:
      out = volumes.Volume(np.zeros(part.shape, np.int16), part.affine, path)
    volumes.check_same_grid(out, part)
    out.data[part.data > 0] = label  # TotalSegmentator classes do not overlap; a later id wins if they do
  return out


def _stem(path: str) -> str:
  name = os.path.basename(path)
  for ext in (".nii.gz", ".nii", ".nrrd", ".seg.nrrd"):
    if name.endswith(ext):
      return name[: -len(ext)]
  return name


def _ts_output(mask_dir: str, key: str) -> str:
  """TotalSegmentator output for a case in mask_dir: KEY.nii.gz / KEY.nii (label map) or KEY/ (per-class)."""
  if not mask_dir:
    return ""
  for candidate in (
    os.path.join(mask_dir, key + ".nii.gz"),
    os.path.join(mask_dir, key + ".nii"),
    os.path.join(mask_dir, key),
  ):
    if os.path.exists(candidate):
      return candidate
  return ""


# ----------------------------------------------------------------------------------------- recipes


def _find(root: str, pattern: str) -> list[str]:
  return sorted(glob.glob(os.path.join(root, "**", pattern), recursive=True))


def _folder(path: str, up: int = 1) -> str:
  """The name of the folder `up` levels above `path` (1: the one holding it): the datasets' layouts name
  splits, modalities and tasks by folder."""
  for _ in range(up):
    path = os.path.dirname(path)
  return os.path.basename(path)


def totalsegmentator(root: str, config: Any) -> list[Case]:
  """Zenodo v2 (10047292): ROOT/s0000/ct.nii.gz + ROOT/s0000/segmentations/<class>.nii.gz (117 files)."""
  cases = []
  for case_dir in sorted(d for d in _find(root, "s[0-9][0-9][0-9][0-9]") if os.path.isdir(d)):
    sid = os.path.basename(case_dir)
    seg = os.path.join(case_dir, "segmentations")
    cases.append(Case(os.path.join(case_dir, "ct.nii.gz"), sid, "auto", sid, seg if os.path.isdir(seg) else ""))
  return cases


def autopet(root: str, config: Any) -> list[Case]:
  """TCIA FDG-PET-CT-Lesions NIfTI: ROOT/PETCT_<id>/<study>/CT.nii.gz (several studies per patient), or the
  nnU-Net release of autoPET II/III: ROOT/imagesTr/<tracer>_<id>_<date>_0000.nii.gz (channel 0000 = CT)."""
  cases = []
  for patient_dir in sorted(d for d in _find(root, "PETCT_*") if os.path.isdir(d)):
    pid = os.path.basename(patient_dir)
    for i, study in enumerate(sorted(d for d in glob.glob(os.path.join(patient_dir, "*")) if os.path.isdir(d))):
      cases.append(Case(os.path.join(study, "CT.nii.gz"), pid, "auto", f"{pid}_{i}"))
  for image in _find(root, "*_0000.nii.gz"):
    key = os.path.basename(image)[: -len("_0000.nii.gz")]
    m = re.match(r"^([a-z]+_[0-9a-f]+)_", key)  # fdg_<patient hash>_<study date>
    cases.append(Case(image, m.group(1) if m else key, "auto", key))
  return cases


def abdomenct1k(root: str, config: Any) -> list[Case]:
  """AbdomenCT-1K: ROOT/AbdomenCT-1K-ImagePart{1,2,3}/Case_00001_0000.nii.gz (masks: Mask/Case_00001.nii.gz)."""
  return [Case(p, os.path.basename(p)[: -len("_0000.nii.gz")], "abdomen") for p in _find(root, "Case_*_0000.nii.gz")]


def amos22(root: str, config: Any) -> list[Case]:
  """AMOS22: ROOT/images{Tr,Va,Ts}/amos_0001.nii.gz; ids >= 500 are MRI and are left out."""
  cases = []
  for p in _find(root, "amos_*.nii.gz"):
    if _folder(p).startswith("labels"):
      continue
    m = re.match(r"amos_(\d+)\.nii\.gz$", os.path.basename(p))
    if m and int(m.group(1)) < 500:
      cases.append(Case(p, f"amos_{m.group(1)}", "abdomen"))
  return cases


def btcv(root: str, config: Any) -> list[Case]:
  """BTCV (Synapse): ROOT/RawData/{Training,Testing}/img/img0001.nii.gz (labels: Training/label/label0001)."""
  return [Case(p, _stem(p), "abdomen") for p in _find(root, "img[0-9]*.nii.gz") if _folder(p) == "img"]


def chaos(root: str, config: Any) -> list[Case]:
  """CHAOS: ROOT/{Train,Test}_Sets/CT/<n>/DICOM_anon/*.dcm. Each image is a DICOM series folder (data/dicom.py:
  slices ordered by position, never by file name or InstanceNumber)."""
  cases = []
  for d in sorted(d for d in _find(root, "DICOM_anon") if os.path.isdir(d)):
    n = _folder(d)
    modality = _folder(d, 2)
    if modality != "CT":
      continue  # MR/T1DUAL... are MRI
    split_set = "test" if "Test" in d else "train"
    cases.append(Case(d, f"{split_set}_{n}", "abdomen"))
  return cases


def word(root: str, config: Any) -> list[Case]:
  """WORD v0.1.0: ROOT/images{Tr,Val,Ts}/word_0001.nii.gz (labels: labels{Tr,Val,Ts}/)."""
  return [Case(p, _stem(p), "abdomen") for p in _find(root, "word_*.nii.gz") if _folder(p).startswith("images")]


def segthor(root: str, config: Any) -> list[Case]:
  """SegTHOR: ROOT/train/Patient_01/Patient_01.nii.gz (+ GT.nii.gz), ROOT/test/Patient_41.nii.gz."""
  return [Case(p, _stem(p), "chest") for p in _find(root, "Patient_[0-9]*.nii.gz")]


def ct_rate(root: str, config: Any) -> list[Case]:
  """CT-RATE (Hugging Face ibrahimhamamci/CT-RATE): ROOT/dataset/{train,valid}/train_1/train_1_a/train_1_a_1.nii.gz
  (patient / scan a,b / reconstruction 1,2). One volume per patient (first scan, first reconstruction), then
  `max_volumes` of them (the paper: 1,000) chosen by hash so the subset is stable."""
  first: dict[str, str] = {}
  for p in _find(root, "*_[0-9]*.nii.gz"):
    m = re.match(r"^((?:train|valid)_\d+)_([a-z]+)_(\d+)\.nii\.gz$", os.path.basename(p))
    if m and (m.group(1) not in first or os.path.basename(p) < os.path.basename(first[m.group(1)])):
      first[m.group(1)] = p
  cases = [Case(p, pid, "chest") for pid, p in sorted(first.items())]
  limit = int(config.max_volumes)
  if limit and len(cases) > limit:
    cases = sorted(cases, key=lambda c: hashlib.sha256(c.patient.encode()).hexdigest())[:limit]
  return sorted(cases, key=lambda c: c.patient)


def structseg(root: str, config: Any) -> list[Case]:
  """StructSeg 2019 head-and-neck tasks: ROOT/HaN_OAR/<n>/data.nii.gz (+ label.nii.gz), ROOT/Naso_GTV/<n>/...
  The thoracic tasks (Thoracic_OAR, Lung_GTV) are chest and left out (the paper lists StructSeg under HaN)."""
  return [
    Case(p, f"{_folder(p, 2)}_{_folder(p)}", "head_neck")
    for p in _find(root, "data.nii.gz")
    if _folder(p, 2) in ("HaN_OAR", "Naso_GTV")
  ]


def instance2022(root: str, config: Any) -> list[Case]:
  """INSTANCE 2022 (non-contrast head CT): ROOT/train_2/data/001.nii.gz (+ train_2/label/001.nii.gz)."""
  return [Case(p, _stem(p), "head_neck") for p in _find(root, "*.nii.gz") if _folder(p) == "data"]


def hanseg(root: str, config: Any) -> list[Case]:
  """HaN-Seg: ROOT/set_1/case_01/case_01_IMG_CT.nrrd (+ _IMG_MR_T1.nrrd, _OAR_*.seg.nrrd), read by SimpleITK.
  One row per case folder, so a case whose CT is missing is reported rather than skipped."""
  return [
    Case(os.path.join(d, f"{os.path.basename(d)}_IMG_CT.nrrd"), os.path.basename(d), "head_neck")
    for d in _find(root, "case_[0-9]*")
    if os.path.isdir(d)
  ]


def segrap2023(root: str, config: Any) -> list[Case]:
  """SegRap2023: ROOT/SegRap2023_Training_Set_120cases/segrap_0000/image.nii.gz (non-contrast; image_contrast.nii.gz
  is the same patient with contrast and is left out so the patient counts once)."""
  cases = []
  for d in sorted(d for d in _find(root, "segrap_[0-9]*") if os.path.isdir(d)):
    cases.append(Case(os.path.join(d, "image.nii.gz"), os.path.basename(d), "head_neck"))
  return cases


def folder(root: str, config: Any) -> list[Case]:
  """Your own scans: every NIfTI under ROOT not matching config.exclude; mask_dir: TotalSegmentator outputs
  (KEY.nii.gz or KEY/ per scan, KEY = the file stem). Region: config.default_region ('auto': cut by masks)."""
  import fnmatch

  cases = []
  for p in _find(root, "*.nii*"):
    if any(fnmatch.fnmatch(os.path.basename(p), pat) for pat in config.exclude):
      continue
    cases.append(Case(p, os.path.relpath(p, root), config.default_region or "auto", _stem(p)))
  return cases


RECIPES: dict[str, Callable[[str, Any], list[Case]]] = {
  "totalsegmentator": totalsegmentator,
  "autopet": autopet,
  "abdomenct1k": abdomenct1k,
  "amos22": amos22,
  "btcv": btcv,
  "chaos": chaos,
  "word": word,
  "segthor": segthor,
  "ct_rate": ct_rate,
  "structseg": structseg,
  "instance2022": instance2022,
  "hanseg": hanseg,
  "segrap2023": segrap2023,
  "folder": folder,
}


def build_manifest(config: Any) -> dict[str, dict[str, str]]:
  """Manifest entries (image -> region, mask, parent, lesion, patient, split, dataset) from a recipe; also
  written to OUTPUT_DIR/manifest_NAME.csv."""
  name = config.dataset
  if name not in RECIPES:
    raise ValueError(f"--config.dataset={name!r}; choose one of {sorted(RECIPES)}")
  cases = RECIPES[name](config.input_dir, config)
  if not cases:
    raise FileNotFoundError(
      f"{config.input_dir}: no {name} cases found in the published layout "
      f"({RECIPES[name].__doc__.splitlines()[0]}); see docs/datasets.md"
    )
  mask_dir = config.mask_dir
  entries = {}
  for c in cases:
    mask = _ts_output(mask_dir, c.key or c.patient) or c.mask
    entries[os.path.normpath(c.image)] = {
      "region": c.region,
      "mask": mask,
      "parent": "",
      "lesion": "",
      "patient": c.patient,
      "split": "",
      "dataset": name,
    }
  if config.output_dir:
    write_manifest(entries, storage.join(config.output_dir, MANIFEST_NAME.format(dataset=name)), config)
  return entries


def write_manifest(entries: Mapping[str, Mapping[str, str]], path: str, config: Any) -> None:
  """The manifest as CSV at `path` (local or a URL: through the storage layer)."""
  text = io.StringIO(newline="")
  w = csv.writer(text)
  w.writerow(["image", "region", "mask", "patient", "split", "dataset"])
  for image, e in entries.items():
    extras = job_extras(e, image, config.input_dir, config)
    w.writerow([image, e["region"], e["mask"], extras["patient"], extras["split"], e["dataset"]])
  storage.write_text(path, text.getvalue())
