"""The paper's evaluation protocols: per case, run the task (protocols/adapters.py) and the protocol's
reference rows, score with evaluation/, aggregate, and format the table the paper reports.

Every protocol returns `Result(rows, cases, aggregate, table)`; `rows` are the methods in table order.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from meddiff_jax.data import nifti, preprocess, volume_io, volumes
from meddiff_jax.evaluation import baselines, extractors, frechet, metrics, scores, segmenters
from meddiff_jax.protocols import adapters, datasets
from meddiff_jax.protocols.spec import ALL, REGION_WINDOW, TASK_DEFAULT, THIN_SPACING, EvaluateSpec

MODEL = "MedDiff-FM"
# What the paper reports (../shared/PAPER_NOTES.md section 5), printed under each table.
PAPER = {
  "denoising": "paper (Mayo 2016, 10 patients): SSIM gain over the low-dose input: MedDiff-FM +0.059, "
  "RED-CNN +0.051, CTformer +0.052 (absolute PSNR/SSIM not published)",
  "anomaly": "paper (BMAD liver CT): image-level AUROC 0.8525 (best earlier BMAD method SimpleNet 0.7228)",
  "synthesis": "paper (Table III, full model): FID 0.0655, Dice 0.8183 (3D medical feature extractor; "
  "TotalSegmentator Dice against the conditioning masks)",
  "super_resolution": "paper (RPLHR-CT, x5 in depth): PSNR/SSIM, values not accessible",
  "lesion": "paper Table VIII (Dice, fine-tuned): MSD-Lung 0.28, MSD-Liver 0.48, MED-LN 0.22, ABD-LN 0.50",
  "inpainting": "paper Table IX (Dice, fine-tuned): MSD-Lung 0.77, MSD-Liver 0.71, MED-LN 0.34, ABD-LN 0.53",
}


@dataclasses.dataclass
class Result:
  rows: list[str]
  cases: list[dict[str, Any]]
  aggregate: dict[str, Any]
  table: str


def _case_dir(workdir: str, cid: str) -> str:
  d = os.path.join(workdir, "cases", cid)
  os.makedirs(d, exist_ok=True)
  return d


def _load(config: EvaluateSpec, path: str, is_mask: bool = False) -> volumes.Volume:
  return datasets.load_volume(path, is_mask, config.png_depth, float(config.png_spacing))


def _as_nifti(vol: volumes.Volume, source: str, out: str) -> str:
  """The task commands read NIfTI: pass NIfTI files through, write anything else (DICOM, PNG, a selected
  mask) under the workdir. The user's files are never modified."""
  if source.endswith((".nii", ".nii.gz")) and os.path.isfile(source):
    return source
  nifti.save(vol, out)
  return out


def _region(config: EvaluateSpec) -> str:
  """The region the metrics and the model-free references use: --config.region, else the default of most tasks."""
  return "abdomen" if config.region == TASK_DEFAULT else config.region


def _window(config: EvaluateSpec) -> tuple[float, float]:
  if config.metric_window != REGION_WINDOW:
    lo, hi = (float(v) for v in config.metric_window)
    return lo, hi
  return preprocess.window_bounds(_region(config))


def _mean_std(values: list[float]) -> dict[str, float]:
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  return {
    "mean": float(v.mean()) if v.size else float("nan"),
    "std": float(v.std()) if v.size else float("nan"),
    "n": int(v.size),
  }


def _aggregate(cases: list[dict], rows: list[str], keys: tuple[str, ...]) -> dict[str, dict[str, dict]]:
  return {
    r: {k: _mean_std([c["metrics"][r][k] for c in cases if r in c["metrics"] and k in c["metrics"][r]]) for k in keys}
    for r in rows
  }


def _fmt(ms: dict[str, float], digits: int = 4) -> str:
  if not np.isfinite(ms["mean"]):
    return "-"
  return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def _table(title: str, header: list[str], lines: list[list[str]], footer: list[str]) -> str:
  widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
  fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths))
  sep = "-" * len(fmt(header))
  return "\n".join([title, sep, fmt(header), sep, *[fmt(r) for r in lines], sep, *footer])


def _check_grid(a: volumes.Volume, b: volumes.Volume, what: str) -> None:
  if a.shape != b.shape or not np.allclose(a.affine, b.affine, atol=1e-2):
    raise volumes.VolumeError(
      b.path,
      f"{what} grid (shape {b.shape}) does not match {a.path} (shape {a.shape}): "
      "pairs must be registered on one voxel grid",
    )


# ----------------------------------------------------------------------------------------------------- denoising


def denoising(config: EvaluateSpec, cases: list[datasets.Case], workdir: str) -> Result:
  window = _window(config)
  model_row = f"{MODEL} ({'diffpir' if config.method == TASK_DEFAULT else config.method})"
  rows = ["low-dose input", "Gaussian filter", "non-local means"] + ([] if config.skip_model else [model_row])
  out_cases = []
  for case in cases:
    low, high = _load(config, case.paths["low"]), _load(config, case.paths["high"])
    _check_grid(low, high, "full-dose")
    volumes.check_ct(low)
    outputs = {
      "low-dose input": low.data,
      "Gaussian filter": baselines.gaussian(low.data, window, float(config.gaussian_sigma)),
      "non-local means": baselines.non_local_means(low.data, window, float(config.nlm_h_factor)),
    }
    if not config.skip_model:
      d = _case_dir(workdir, case.id)
      out = os.path.join(d, "denoised.nii.gz")
      adapters.run_task(
        "denoising",
        config,
        input=_as_nifti(low, case.paths["low"], os.path.join(d, "low.nii.gz")),
        output=out,
        output_int16=False,
      )
      outputs[model_row] = volume_io.load(out).data
    m = {r: scores.image_quality(high.data, outputs[r], window) for r in rows}
    for r in rows:
      m[r]["ssim_2d_gain"] = m[r]["ssim_2d"] - m["low-dose input"]["ssim_2d"]
      m[r]["psnr_gain"] = m[r]["psnr"] - m["low-dose input"]["psnr"]
    out_cases.append({"id": case.id, "paths": case.paths, "metrics": m})
  keys = ("psnr", "ssim_2d", "ssim_3d", "psnr_gain", "ssim_2d_gain")
  agg = _aggregate(out_cases, rows, keys)
  agg["window_hu"] = list(window)
  agg["data_range"] = window[1] - window[0]
  lines = [
    [
      r,
      _fmt(agg[r]["psnr"], 2),
      _fmt(agg[r]["ssim_2d"]),
      _fmt(agg[r]["ssim_3d"]),
      f"{agg[r]['ssim_2d_gain']['mean']:+.4f}",
    ]
    for r in rows
  ]
  title = (
    f"Denoising: {len(out_cases)} cases; PSNR/SSIM on HU clipped to [{window[0]:g}, {window[1]:g}], "
    f"data range {window[1] - window[0]:g}"
  )
  table = _table(
    title, ["method", "PSNR (dB)", "SSIM (2D slices)", "SSIM (3D)", "ΔSSIM vs input"], lines, [PAPER["denoising"]]
  )
  return Result(rows, out_cases, agg, table)


# ------------------------------------------------------------------------------------------------------- anomaly


def _no_prior_map(image_unit: np.ndarray, body: np.ndarray) -> np.ndarray:
  """Model-free reference: the residual to a heavily smoothed image (what any local-contrast detector sees)."""
  from scipy import ndimage

  return np.where(body, np.abs(image_unit - ndimage.gaussian_filter(image_unit, 3.0)), 0.0).astype(np.float32)


def anomaly(config: EvaluateSpec, cases: list[datasets.Case], workdir: str) -> Result:
  from scipy import ndimage

  region = _region(config)
  top, axis = float(config.top_fraction), config.slice_axis
  rows = ([] if config.skip_model else [MODEL]) + ["no-prior residual"]
  per_row = {r: {"volume": ([], []), "slice": ([], []), "pixel": ([], [])} for r in rows}
  out_cases = []
  for case in cases:
    img = _load(config, case.paths["image"])
    volumes.check_ct(img)
    mask = None
    if "label" in case.paths:
      mvol = _load(config, case.paths["label"], is_mask=True)
      _check_grid(img, mvol, "label")
      mask = (mvol.data > 0).astype(np.int8)
    elif case.is_abnormal == 0:
      mask = np.zeros(img.shape, np.int8)  # a normal case: no abnormal voxel
    if mask is not None and case.is_abnormal == 0 and mask.any():
      raise volumes.VolumeError(case.paths.get("label", ""), "is_abnormal=0 but its mask has abnormal voxels")
    body = img.data > preprocess.BODY_THRESHOLD_HU
    maps = {
      "no-prior residual": ndimage.gaussian_filter(
        _no_prior_map(preprocess.hu_to_unit(img.data, region), body), float(config.smooth_sigma)
      )
    }
    if not config.skip_model:
      d = _case_dir(workdir, case.id)
      out = os.path.join(d, "anomaly_map.nii.gz")
      adapters.run_task(
        "anomaly", config, input=_as_nifti(img, case.paths["image"], os.path.join(d, "image.nii.gz")), output=out
      )
      maps[MODEL] = volume_io.load(out).data
    m = {}
    for r in rows:
      amap = maps[r]
      vs = scores.top_fraction_mean(amap[body], top)
      m[r] = {"volume_score": vs}
      per_row[r]["volume"][0].append(case.is_abnormal)
      per_row[r]["volume"][1].append(vs)
      if mask is not None:
        per_row[r]["slice"][0].extend(scores.slice_labels(mask, axis))
        per_row[r]["slice"][1].extend(scores.slice_scores(amap, body, top, axis))
        step = config.pixel_subsample  # every k-th body voxel: whole CTs hold ~10^7 each
        per_row[r]["pixel"][0].append(mask[body][::step])
        per_row[r]["pixel"][1].append(amap[body][::step].astype(np.float32))
    out_cases.append(
      {
        "id": case.id,
        "paths": case.paths,
        "is_abnormal": case.is_abnormal,
        "has_voxel_labels": mask is not None,
        "metrics": m,
      }
    )
  agg: dict[str, Any] = {}
  for r in rows:
    agg[r] = {}
    for level in ("volume", "slice", "pixel"):
      y, s = per_row[r][level]
      if level == "pixel" and y:
        y, s = np.concatenate(y), np.concatenate(s)
      agg[r][level] = scores.detection_scores(np.asarray(y, np.int8), np.asarray(s, np.float64))
  f = lambda v: "-" if not np.isfinite(v) else f"{v:.4f}"
  lines = [
    [
      r,
      level,
      f(agg[r][level]["auroc"]),
      f(agg[r][level]["auprc"]),
      f"{agg[r][level]['n']} ({agg[r][level]['n_positive']} abnormal)",
    ]
    for r in rows
    for level in ("volume", "slice", "pixel")
  ]
  title = (
    f"Anomaly detection: {len(out_cases)} cases; "
    f"noise to t={adapters.parse_task_options(config.task).get('noise_t', 950)}, residual map, "
    f"score = mean of the top {top:g} of the map inside the body (volume / axial slice), voxels inside the body"
  )
  table = _table(title, ["method", "level", "AUROC", "AUPRC", "n"], lines, [PAPER["anomaly"]])
  return Result(rows, out_cases, agg, table)


# ----------------------------------------------------------------------------------------------------- synthesis


def synthesis(config: EvaluateSpec, cases: list[datasets.Case], workdir: str) -> Result:
  extractor = None if config.extractor == "none" else extractors.Extractor(config.extractor)
  if config.segmenter == "threshold":  # the lesion proxy has no meaning for anatomy
    raise ValueError(f"synthesis Dice needs an anatomy segmenter; {segmenters.MISSING} (or none to skip Dice)")
  segmenter = None if config.segmenter == "none" else segmenters.Segmenter(config.segmenter)
  rows = ([] if config.skip_model else [MODEL]) + ["real images (reference)"]
  feats = {r: [] for r in rows}
  real_feats, out_cases = [], []
  dice_labels = None if config.dice_labels == ALL else list(config.dice_labels)
  for case in cases:
    real = _load(config, case.paths["image"])
    labels = _load(config, case.paths["labels"], is_mask=True)
    _check_grid(real, labels, "labels")
    d = _case_dir(workdir, case.id)
    images = {
      "real images (reference)": (real.data, _as_nifti(real, case.paths["image"], os.path.join(d, "real.nii.gz")))
    }
    if not config.skip_model:
      out = os.path.join(d, "generated.nii.gz")
      adapters.run_task(
        "synthesis",
        config,
        output=out,
        labels=_as_nifti(labels, case.paths["labels"], os.path.join(d, "labels.nii.gz")),
      )
      gen = volume_io.load(out)
      images[MODEL] = (gen.data, out)
    if extractor is not None:
      real_feats.append(extractor(case.id, real.data))
    m = {}
    for r in rows:
      data, path = images[r]
      m[r] = {}
      if extractor is not None:
        feats[r].append(extractor(case.id, data, generated=(r == MODEL)))
      if segmenter is not None:
        seg = segmenter(case.id if r == MODEL else f"{case.id}_real", path)
        m[r]["dice"] = scores.mean_dice(seg, labels.data, dice_labels)
    out_cases.append({"id": case.id, "paths": case.paths, "metrics": m})
  agg = _aggregate(out_cases, rows, ("dice",))
  for r in rows:
    fd = float("nan")
    if extractor is not None and len(real_feats) >= 2:
      fd = frechet.frechet_distance_from_features(np.stack(real_feats), np.stack(feats[r]))
    agg[r]["frechet_distance"] = fd
  f = lambda v: "-" if not np.isfinite(v) else f"{v:.4f}"
  lines = [[r, f(agg[r]["frechet_distance"]), _fmt(agg[r]["dice"])] for r in rows]
  title = (
    f"Synthesis: {len(out_cases)} cases; Fréchet distance of {config.extractor or '-'} features to the real "
    f"images, mean Dice of {config.segmenter or '-'} on each image against the conditioning labels"
  )
  table = _table(title, ["images", "FD", "Dice"], lines, [PAPER["synthesis"]])
  return Result(rows, out_cases, agg, table)


# ---------------------------------------------------------------------------------------------- super-resolution


def super_resolution(config: EvaluateSpec, cases: list[datasets.Case], workdir: str) -> Result:
  given = config.metric_window != REGION_WINDOW or config.region != TASK_DEFAULT
  window = _window(config) if given else preprocess.window_bounds("chest")  # the task's default region
  rows = ["trilinear", "cubic"] + ([] if config.skip_model else [f"{MODEL} (ControlNet)"])
  out_cases = []
  for case in cases:
    thick, thin = _load(config, case.paths["thick"]), _load(config, case.paths["thin"])
    volumes.check_ct(thick)
    target = thin.spacing if config.sr_spacing == THIN_SPACING else tuple(float(s) for s in config.sr_spacing)
    ref = volumes.resample(thin, target, order=1, fill=-1024.0) if not np.allclose(target, thin.spacing) else thin
    outputs = {
      "trilinear": volumes.resample(thick, target, order=1, fill=-1024.0).data,
      "cubic": volumes.resample(thick, target, order=3, fill=-1024.0).data,
    }
    if not config.skip_model:
      d = _case_dir(workdir, case.id)
      out = os.path.join(d, "sr.nii.gz")
      adapters.run_task(
        "super_resolution",
        config,
        output=out,
        spacing=target,
        input=_as_nifti(thick, case.paths["thick"], os.path.join(d, "thick.nii.gz")),
      )
      outputs[rows[-1]] = volume_io.load(out).data
    m = {}
    for r in rows:  # the thin scan and the upsampled thick one cover the same extent up to a slice: compare the overlap
      sl = tuple(slice(0, min(a, b)) for a, b in zip(ref.shape, outputs[r].shape))
      m[r] = scores.image_quality(ref.data[sl], outputs[r][sl], window)
    out_cases.append({"id": case.id, "paths": case.paths, "metrics": m})
  agg = _aggregate(out_cases, rows, ("psnr", "ssim_2d", "ssim_3d"))
  agg["window_hu"] = list(window)
  lines = [[r, _fmt(agg[r]["psnr"], 2), _fmt(agg[r]["ssim_2d"]), _fmt(agg[r]["ssim_3d"])] for r in rows]
  title = (
    f"Super-resolution: {len(out_cases)} cases; thin reference grid; PSNR/SSIM on HU clipped to "
    f"[{window[0]:g}, {window[1]:g}]"
  )
  table = _table(title, ["method", "PSNR (dB)", "SSIM (2D slices)", "SSIM (3D)"], lines, [PAPER["super_resolution"]])
  return Result(rows, out_cases, agg, table)


# --------------------------------------------------------------------------------------- lesion / inpainting


def _lesion(protocol: str, config: EvaluateSpec, cases: list[datasets.Case], workdir: str) -> Result:
  segmenter = None if config.segmenter == "threshold" else segmenters.Segmenter(config.segmenter)
  model_row = f"{MODEL} ({adapters.FIXED_METHOD[protocol]})"
  rows = ["input scan (no change)"] + ([] if config.skip_model else [model_row])
  out_cases, skipped = [], []
  for case in cases:
    img = _load(config, case.paths["image"])
    volumes.check_ct(img)
    mvol = _load(config, case.paths["mask"], is_mask=True)
    _check_grid(img, mvol, "mask")
    lesion = np.isin(mvol.data, case.mask_labels) if case.mask_labels else mvol.data > 0
    if not lesion.any():
      skipped.append({"id": case.id, "reason": "empty lesion mask"})
      continue
    d = _case_dir(workdir, case.id)
    images = {rows[0]: (img.data, _as_nifti(img, case.paths["image"], os.path.join(d, "image.nii.gz")))}
    if not config.skip_model:
      mask_path = os.path.join(d, "lesion_mask.nii.gz")
      nifti.save(volumes.Volume(lesion.astype(np.uint8), mvol.affine), mask_path)
      out = os.path.join(d, "generated.nii.gz")
      adapters.run_task(protocol, config, input=images[rows[0]][1], mask=mask_path, output=out)
      images[model_row] = (volume_io.load(out).data, out)
    m = {}
    for r in rows:
      data, path = images[r]
      if segmenter is None:
        seg = segmenters.lesion_threshold_segmentation(data, img.data, lesion, float(config.dice_threshold_hu))
      else:
        seg = segmenter(case.id if r == model_row else f"{case.id}_input", path) > 0
      m[r] = {"dice": metrics.dice(seg, lesion), "lesion_voxels": int(lesion.sum())}
    out_cases.append({"id": case.id, "paths": case.paths, "metrics": m})
  agg = _aggregate(out_cases, rows, ("dice",))
  agg["skipped"] = skipped
  lines = [[r, _fmt(agg[r]["dice"])] for r in rows]
  title = (
    f"{'Lesion generation' if protocol == 'lesion' else 'Lesion inpainting'}: {len(out_cases)} cases "
    f"({len(skipped)} skipped); Dice of the {config.segmenter} segmentation against the lesion mask"
  )
  table = _table(
    title,
    ["method", "Dice"],
    lines,
    [PAPER[protocol]]
    + (["(threshold segmenter: a model-free proxy, not the paper's segmenter)"] if segmenter is None else []),
  )
  return Result(rows, out_cases, agg, table)


PROTOCOLS: dict[str, Callable[..., Result]] = {
  "denoising": denoising,
  "anomaly": anomaly,
  "synthesis": synthesis,
  "super_resolution": super_resolution,
  "lesion": lambda c, cs, w: _lesion("lesion", c, cs, w),
  "inpainting": lambda c, cs, w: _lesion("inpainting", c, cs, w),
}
