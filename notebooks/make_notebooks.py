"""Writes the three Colab notebooks from one source: they share the setup (install) cell, the checkpoint
choice and the real-CT cell. Edit here, then `python notebooks/make_notebooks.py`; tests/test_notebooks.py
checks the committed notebooks match."""

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

# The repository the notebooks install from on Colab: the one place to set it (a fork's URL), then regenerate; a
# user can also set it in the setup cell or through the MEDDIFF_REPO environment variable.
REPOSITORY = ""

SETUP = f"""\
# Setup. On Colab (or anywhere meddiff_jax is not importable yet) this clones REPO and pip-installs it with the JAX
# build for the runtime's accelerator; where meddiff_jax and its configs/ import already, it does nothing.
REPO = "{REPOSITORY}"  # <- the meddiff_jax git repository (or your fork) to install; or set MEDDIFF_REPO
import glob, importlib.util, os, pathlib, subprocess, sys
REPO = REPO or os.environ.get("MEDDIFF_REPO", "")
# JAX's own test for its accelerators, before it starts (jax/_src/hardware_utils.py): TPU chips on the PCI bus
# (Google's vendor id with a TPU device id), NVIDIA GPUs as device files
TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")  # v3, v4, v5p, v5e, v6e, 7x
def accelerator():
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    device = pathlib.Path(vendor).with_name("device")
    if pathlib.Path(vendor).read_text().strip() == "0x1ae0" and device.read_text().strip() in TPU_PCI_DEVICES:
      return "tpu"
  return "gpu" if any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")) else "cpu"
JAX_BUILD = {{"tpu": "jax[tpu]", "gpu": "jax[cuda12]", "cpu": "jax"}}[accelerator()]
if importlib.util.find_spec("meddiff_jax") is None or importlib.util.find_spec("configs") is None:
  src = os.path.abspath("meddiff_jax_src")
  if not os.path.isdir(src):
    if not REPO:
      raise SystemExit(
        "REPO is not set: put the git URL of meddiff_jax (or your fork), e.g. REPO = "
        "'https://github.com/<you>/meddiff_jax', in the first line of this cell (or set MEDDIFF_REPO), and run it again."
      )
    subprocess.run(["git", "clone", "-q", "--depth=1", REPO, src], check=True)  # configs/ comes with the source
  if importlib.util.find_spec("meddiff_jax") is None:  # (after a runtime restart it is installed already)
    print(f"installing {{REPO}} with {{JAX_BUILD}} (the build for this runtime's accelerator)")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", src, JAX_BUILD, "matplotlib"], check=True)
  sys.path.insert(0, src)
  os.chdir(src)
import jax  # no platform forced: the runtime's GPU / TPU when there is one (JAX_PLATFORMS=cpu forces CPU)
print(f"JAX {{jax.__version__}} on {{jax.default_backend().upper()}}: {{len(jax.devices())}} x {{jax.devices()[0].device_kind}}")
STEPS = int(os.environ.get("NB_STEPS", 10))  # sampler / training steps: small, so the demo runs on a CPU too
"""

CHECKPOINT = """\
import numpy as np
import matplotlib.pyplot as plt
import meddiff_jax as md  # the Python API: the same checks and runs as the meddiff command
CHECKPOINT = "tiny_ct"  # the CPU prior trained on real CT; or a training workdir, an exported dir, a gs:// URL
pipe = md.load(CHECKPOINT)
# tasks run the network at the voxel size it was trained at (resampled there and back)
SPACING = pipe.spacing
print(f"checkpoint {CHECKPOINT}: trained at {SPACING} mm, {pipe.patch_size}^3 windows")
"""

REAL_CT = '''\
import nibabel as nib
UPLOAD = False  # True (on Colab): upload your own CT (.nii.gz) instead of the public sample
REGION = "abdomen"  # head_neck | chest | abdomen: the region of the crop (sets the HU window and the condition)
CROP_MM = 96  # mm per side of the demo crop; keep it small on a CPU
if UPLOAD:
  from google.colab import files
  path = os.path.abspath(next(iter(files.upload())))
else:
  path = md.example_ct()  # TotalSegmentator's example_ct (Apache-2.0): pelvis to lung bases, 3 mm, real CT
img = nib.as_closest_canonical(nib.load(path))  # RAS voxel order, for the pictures
ct = img.get_fdata(dtype=np.float32)
voxel = np.array(img.header.get_zooms()[:3], float)
size = np.minimum(np.round(CROP_MM / voxel).astype(int), ct.shape)
centre = np.round(np.argwhere(ct > -500).mean(0)).astype(int)  # the body, not the air
start = np.clip(centre - size // 2, 0, np.array(ct.shape) - size)
hu = ct[tuple(slice(int(s), int(s + n)) for s, n in zip(start, size))]
affine = img.affine.copy()
affine[:3, 3] += img.affine[:3, :3] @ start  # the crop keeps its place in world coordinates
print(f"{os.path.basename(path)}: {ct.shape} at {tuple(voxel.tolist())} mm -> crop {hu.shape} (tasks: {SPACING} mm)")


def planes(v):
  """Axial and coronal mid-planes of a RAS (X, Y, Z) volume, radiological convention (patient's right on the left)."""
  return [np.fliplr(np.rot90(v[:, :, v.shape[2] // 2])), np.fliplr(np.rot90(v[:, v.shape[1] // 2, :]))]


def show(rows, titles, cmaps, lims, suptitle=""):
  """One column per volume, axial above coronal."""
  fig, ax = plt.subplots(2, len(rows), figsize=(2.6 * len(rows), 5.4), squeeze=False)
  for j, (v, title, cmap, (lo, hi)) in enumerate(zip(rows, titles, cmaps, lims)):
    for i, p in enumerate(planes(v)):
      im = ax[i, j].imshow(p, cmap=cmap, vmin=lo, vmax=hi)
      ax[i, j].axis("off")
    ax[0, j].set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax[:, j], shrink=0.6)
  fig.suptitle(suptitle)
  plt.show()


lo_hu, hi_hu = md.hu_window(REGION)  # the HU window the model sees for this region
show([hu], ["real CT crop (HU)"], ["gray"], [(lo_hu, hi_hu)])
'''


def nb(cells):
  n = new_notebook(cells=cells)
  for i, c in enumerate(n.cells):
    c.id = f"cell-{i}"  # stable ids: regenerating gives a clean diff
  n.metadata.update(
    {
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "accelerator": "GPU",
      "colab": {"provenance": [], "gpuType": "T4"},
    }
  )
  return n


# ------------------------------------------------------------------------------------------------ 01
nb01 = nb(
  [
    new_markdown_cell(
      "# 1. Quickstart: pretrain MedDiff-FM's backbone for a few steps\n"
      "The tiny preset on the embedded synthetic CT phantom: multi-level patches with whole-volume position, "
      "region and structure conditions. Runs as is on Colab (GPU / TPU runtime or CPU): set `REPO` in the first "
      "cell if you install from a fork. Real CT and the pretrained priors: notebook 2. Everything runs through the "
      "Python API (`import meddiff_jax as md`)."
    ),
    new_code_cell(SETUP),
    new_code_cell("""\
import json, tempfile
import numpy as np
import matplotlib.pyplot as plt
import meddiff_jax as md  # the Python API: the same checks and runs as the meddiff command
from meddiff_jax.configs import pretrain  # the shipped configs: start from one, edit it
config = pretrain.get_config("tiny")
config.training.update(num_steps=int(os.environ.get("NB_STEPS", 30)), log_every=2)
config.eval.update(every_steps=10, sample_every_steps=0)
workdir = tempfile.mkdtemp(prefix="meddiff_quickstart_")
print(config.model)"""),
    new_code_cell("""\
last = md.pretrain(config, workdir)  # checked as `meddiff --config=... --workdir=...` checks it, then trained
rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
train = [r for r in rows if "loss" in r]
val = [r for r in rows if "val/loss" in r]
plt.figure(figsize=(6, 3))
plt.plot([r["step"] for r in train], [r["loss"] for r in train], label="train L1 (eps)")
plt.plot([r["step"] for r in val], [r["val/loss"] for r in val], "o-", label="validation")
plt.xlabel("step"); plt.legend(); plt.show()
assert all(np.isfinite(r["loss"]) for r in train)  # falls steadily with the default 30 steps"""),
    new_markdown_cell(
      "Training resumes from `workdir/checkpoints` when run again with more steps, and writes "
      "TensorBoard events to `workdir`. The workdir is a checkpoint: load it and sample a volume larger than the "
      "training patch (after a few dozen steps the sample is still mostly noise)."
    ),
    new_code_cell("""\
pipe = md.load(workdir)  # the newest checkpoint's EMA params
sample = pipe.synthesize(shape=(48, 48, 48), region="abdomen", num_steps=STEPS)
print(sample.info, "trained at", pipe.spacing, "mm")
fig, ax = plt.subplots(1, 2, figsize=(6, 3))
for a, plane in zip(ax, (sample.image[:, :, 24], sample.image[:, 24, :])):
  a.imshow(np.fliplr(np.rot90(plane)), cmap="gray", vmin=-1000, vmax=1000); a.axis("off")
plt.show()"""),
  ]
)

# ------------------------------------------------------------------------------------------------ 02
nb02 = nb(
  [
    new_markdown_cell(
      "# 2. Denoising and anomaly detection on a real CT with the pretrained prior\n"
      "`CHECKPOINT` is `tiny_ct`, a CPU-sized prior trained on two real CTs (smoke-level): no substitute for the "
      "paper-scale prior (`configs/pretrain.py:paper`). The CT is TotalSegmentator's public `example_ct` (fetched "
      "by URL), or your own with `UPLOAD = True`. Everything runs through the Python API (`import meddiff_jax as "
      "md`): the tasks take an array and its affine (or a file) and return the result on the same grid. Set "
      "`REPO` in the first cell if you install from a fork."
    ),
    new_code_cell(SETUP),
    new_code_cell(CHECKPOINT),
    new_code_cell(REAL_CT),
    new_markdown_cell(
      "## Denoising at a simulated low dose\nGaussian noise of `NOISE_HU` HU on the crop; "
      "DiffPIR with the prior (the noise level estimated from the image) vs a Gaussian filter. "
      "Bottom: each result minus the clean crop (HU)."
    ),
    new_code_cell("""\
from scipy import ndimage, stats
NOISE_HU = 40.0
noisy = (hu + np.random.default_rng(0).normal(0, NOISE_HU, hu.shape)).astype(np.float32)
out = pipe.denoise(noisy, affine=affine, region=REGION, num_steps=STEPS, zeta=0.0, output_int16=False,
                   overlap=0.25, window_batch=8)  # the denoise command's options; the result on the crop's grid
print(out.info)
results = {"noisy": noisy, "Gaussian filter": ndimage.gaussian_filter(noisy, 1.0), "DiffPIR": out.image}
windowed = lambda v: np.clip(v, lo_hu, hi_hu)  # compared within the region's window: what the model sees
for name, img in results.items():
  mse = np.mean((windowed(img) - windowed(hu)) ** 2)
  print(f"{name:16s} PSNR {10 * np.log10((hi_hu - lo_hu) ** 2 / mse):6.2f} dB (within the window)")
show([hu] + list(results.values()), ["clean"] + list(results), ["gray"] * 4,
     [(lo_hu, hi_hu)] * 4, f"{CHECKPOINT}: denoising at {NOISE_HU:.0f} HU noise")
show([windowed(v) - windowed(hu) for v in results.values()], [f"{k} - clean" for k in results], ["RdBu_r"] * 3,
     [(-2 * NOISE_HU, 2 * NOISE_HU)] * 3, "difference maps (HU)")"""),
    new_markdown_cell(
      "## Anomaly detection: an inserted lesion\nA hypodense sphere in soft tissue; the prior "
      "reconstructs the crop from noise level `noise_t` (the paper: 950) and the anomaly map is the "
      "smoothed |input - reconstruction| inside the body."
    ),
    new_code_cell("""\
rng = np.random.default_rng(0)
tissue = ndimage.binary_erosion((hu > -20) & (hu < 120), iterations=2)  # soft tissue away from edges
candidates = np.argwhere(tissue) if tissue.any() else np.argwhere(hu > -500)
lesion_centre = candidates[rng.integers(len(candidates))]
grid = np.stack(np.meshgrid(*[np.arange(n) for n in hu.shape], indexing="ij"), -1)
truth = np.linalg.norm((grid - lesion_centre) * voxel, axis=-1) <= 10.0  # a 10 mm radius sphere
with_lesion = np.where(truth, hu - 60.0, hu).astype(np.float32)  # 60 HU darker, like a hypodense lesion
amap = pipe.detect_anomalies(with_lesion, affine=affine, region=REGION, noise_t=500, num_steps=STEPS,
                             sampler="dpmpp_2m", overlap=0.25, window_batch=8)
body = with_lesion > -500
score, lesion = amap.image[body], truth[body]
ranks = stats.rankdata(score)  # AUROC as the Mann-Whitney statistic: lesion voxels vs the rest of the body
auroc = (ranks[lesion].sum() - lesion.sum() * (lesion.sum() + 1) / 2) / (lesion.sum() * (~lesion).sum())
print(f"volume score {amap.info['volume_score']:.4f}; voxel AUROC (lesion vs rest of body) {auroc:.3f}")
z = int(lesion_centre[2])
view = lambda v: np.fliplr(np.rot90(v[:, :, z]))  # the axial slice through the lesion
fig, ax = plt.subplots(1, 3, figsize=(10, 3.4))
ax[0].imshow(view(with_lesion), cmap="gray", vmin=lo_hu, vmax=hi_hu)
ax[0].set_title("input with lesion", fontsize=9)
ax[1].imshow(view(amap.image), cmap="magma")
ax[1].set_title("anomaly map", fontsize=9)
ax[2].imshow(view(with_lesion), cmap="gray", vmin=lo_hu, vmax=hi_hu)
ax[2].imshow(np.ma.masked_less(view(amap.image), np.percentile(score, 95)), cmap="autumn", alpha=0.6)
ax[2].contour(view(truth.astype(float)), levels=[0.5], colors="cyan", linewidths=1)
ax[2].set_title("anomaly map (top 5%) + true lesion", fontsize=9)
for a in ax:
  a.axis("off")
plt.show()"""),
  ]
)

# ------------------------------------------------------------------------------------------------ 03
nb03 = nb(
  [
    new_markdown_cell(
      "# 3. ControlNet super-resolution: fine-tune a branch on the frozen backbone\n"
      "The condition is a x5 thick-slice version of the volume (RPLHR-CT style). The base (`CHECKPOINT`) stays "
      "bitwise frozen; only the branch trains, here for a few steps on phantoms, and is then applied to a real CT "
      "crop. This shows the mechanics only: after a few steps the branch has learned next to nothing and its "
      "sample is far from the reference (trilinear wins). Real super-resolution needs `configs/controlnet.py:sr` "
      "trained for thousands of steps on RPLHR-CT-like pairs over a paper-scale prior. Set `REPO` in the first "
      "cell if you install from a fork."
    ),
    new_code_cell(SETUP),
    new_code_cell(CHECKPOINT),
    new_code_cell("""\
import json, tempfile
from meddiff_jax.configs import controlnet as cn_config  # the shipped configs: start from one, edit it
config = cn_config.get_config("sr")
config.base_checkpoint = CHECKPOINT
config.training.update(num_steps=int(os.environ.get("NB_STEPS", 6)), batch_size=2, log_every=2)
config.data.phantom.update(num_volumes=3, shape=(48, 48, 48), spacing=SPACING)  # the base's voxel size
config.eval.update(every_steps=0, sample_every_steps=0)  # no validation / previews in this short demo
workdir = tempfile.mkdtemp(prefix="meddiff_sr_")
print(md.finetune(config, workdir))  # checked (and derived from the base) as the command does, then trained"""),
    new_code_cell(REAL_CT),
    new_code_cell("""\
from scipy import ndimage
hr_path, lr_path, sr_path = (os.path.join(workdir, n) for n in ("hr.nii.gz", "lr.nii.gz", "sr.nii.gz"))
hr = np.round(hu).astype(np.int16)
lr, lr_affine = hr[:, :, ::5], affine @ np.diag([1.0, 1.0, 5.0, 1.0])  # every 5th slice: x5 thick slices
nib.save(nib.Nifti1Image(hr, affine), hr_path)
nib.save(nib.Nifti1Image(lr, lr_affine), lr_path)
# the ControlNet pipeline: sampled at the base's spacing, resampled to the reference's grid (spacing=)
sr = md.load(workdir).super_resolve(lr_path, output=sr_path, reference=hr_path, region=REGION, num_steps=STEPS,
                                    spacing=tuple(voxel))
print(json.dumps(sr.info["metrics"], indent=1))"""),
    new_code_cell("""\
out = sr.image  # the thin grid, in the input file's voxel order (RAS here)
z = np.arange(out.shape[2]) / 5.0  # the thin slices' positions in thick-slice units
tri = ndimage.map_coordinates(lr.astype(np.float32), np.meshgrid(*map(np.arange, lr.shape[:2]), z, indexing="ij"),
                              order=1)  # trilinear from the thick slices onto the thin grid
n = [min(s) for s in zip(hr.shape, out.shape)]
# compared within the region's HU window: the model's output range (bone above it is clipped)
ref, tri, out = (np.clip(v[:n[0], :n[1], :n[2]], lo_hu, hi_hu).astype(np.float32) for v in (hr, tri, out))
show([ref, tri, out], ["reference", "trilinear from x5 thick slices", "ControlNet"], ["gray"] * 3,
     [(lo_hu, hi_hu)] * 3, f"super-resolution on a real CT crop (base {CHECKPOINT})")
show([tri - ref, out - ref], ["trilinear - reference", "ControlNet - reference"], ["RdBu_r"] * 2,
     [(-200, 200)] * 2, "difference maps (HU)")"""),
  ]
)

NOTEBOOKS = {"01_quickstart_pretraining": nb01, "02_denoising_anomaly": nb02, "03_controlnet_super_resolution": nb03}

if __name__ == "__main__":
  import os

  for name, n in NOTEBOOKS.items():
    nbformat.validate(n)
    nbformat.write(n, os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.ipynb"))
