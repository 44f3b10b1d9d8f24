"""Writes the three Colab notebooks from one source: they share the setup (install) cell, the checkpoint
choice and the real-CT cell. Edit here, then `python notebooks/make_notebooks.py`; tests/test_notebooks.py
checks the committed notebooks match."""

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

SETUP = """\
# Setup. On Colab (or anywhere meddiff_jax is not importable yet) this clones REPO and pip-installs it with
# the JAX build for the runtime's accelerator; where meddiff_jax and its configs/ import already, it does nothing.
REPO = "https://github.com/OWNER/meddiff_jax"  # <- set this once: the repository (or your fork) to install
import importlib.util, os, shutil, subprocess, sys
if importlib.util.find_spec("meddiff_jax") is None or importlib.util.find_spec("configs") is None:
  src = os.path.abspath("meddiff_jax_src")
  if not os.path.isdir(src):
    if "/OWNER/" in REPO:
      raise SystemExit("Set REPO above to the meddiff_jax repository URL (e.g. your fork on GitHub), then run again.")
    subprocess.run(["git", "clone", "-q", "--depth=1", REPO, src], check=True)  # configs/ comes with the source
  if importlib.util.find_spec("meddiff_jax") is None:  # (after a runtime restart it is installed already)
    jax_build = ("jax[cuda12]" if shutil.which("nvidia-smi") else
                 "jax[tpu]" if os.path.exists("/dev/accel0") or "COLAB_TPU_ADDR" in os.environ else "jax")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", src, jax_build, "matplotlib"], check=True)
  sys.path.insert(0, src)
  os.chdir(src)
import jax  # no platform forced: the runtime's GPU / TPU when there is one (JAX_PLATFORMS=cpu forces CPU)
print(f"JAX {jax.__version__} on {jax.default_backend().upper()}: {len(jax.devices())} x {jax.devices()[0].device_kind}")
STEPS = int(os.environ.get("NB_STEPS", 10))  # sampler / training steps: small, so the demo runs on a CPU too
"""

CHECKPOINT = """\
import numpy as np
import matplotlib.pyplot as plt
from meddiff_jax import pretrained
from meddiff_jax.data import nifti, preprocess, samples
from meddiff_jax.data.spec import DataSpec
from meddiff_jax.data import nifti, pipeline, preprocess, samples, volume_io, volumes
# the CPU prior trained on real CT when this install ships it, else the phantom-only demo prior
CHECKPOINT = "tiny_ct" if "tiny_ct" in pretrained.BUILTIN else "tiny_phantom"  # or a training workdir / exported dir
# the network runs at the voxel size it was trained at (its stored config's data section, typed)
SPACING = DataSpec.from_config(pretrained.read_config(CHECKPOINT).data).training_spacing()
print(f"checkpoint {CHECKPOINT}: trained at {SPACING} mm")
"""

REAL_CT = '''\
UPLOAD = False  # True (on Colab): upload your own CT (.nii.gz / .nrrd / .mha) instead of the public sample
REGION = "abdomen"  # head_neck | chest | abdomen: the region of the crop (sets the HU window and the condition)
CROP = 48  # voxels per side of the demo crop (at SPACING); keep it small on a CPU
if UPLOAD:
  from google.colab import files
  path = os.path.abspath(next(iter(files.upload())))
else:
  path = samples.example_ct()  # TotalSegmentator's example_ct (Apache-2.0): pelvis to lung bases, 3 mm, real CT
vol = volume_io.load(path)
volumes.check_ct(vol)  # refuses MR, masks and unscaled data with a reason
work = volumes.resample(vol, SPACING)
centre = np.round(np.argwhere(preprocess.body_mask(work.data)).mean(0)).astype(int)  # the body, not the air
start = np.clip(centre - CROP // 2, 0, np.maximum(np.array(work.shape) - CROP, 0))
hu = work.data[tuple(slice(int(s), int(s) + CROP) for s in start)].astype(np.float32)
crop_affine = work.affine.copy()
crop_affine[:3, 3] += work.affine[:3, :3] @ start  # the crop keeps its place in world coordinates
print(f"{os.path.basename(path)}: {vol.shape} at {tuple(round(s, 2) for s in vol.spacing)} mm -> crop {hu.shape} at {SPACING} mm")


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


lo_hu, hi_hu = preprocess.window_bounds(REGION)
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
      "cell if you install from a fork. Real CT and the pretrained priors: notebook 2."
    ),
    new_code_cell(SETUP),
    new_code_cell("""\
import json, tempfile
import numpy as np
import matplotlib.pyplot as plt
from meddiff_jax.configs import pretrain
from meddiff_jax.evaluation import montage
from meddiff_jax import checks
from meddiff_jax.train import loop
config = pretrain.get_config("tiny")
config.training.update(num_steps=int(os.environ.get("NB_STEPS", 30)), log_every=2)
config.eval.update(every_steps=10, sample_every_steps=0)
workdir = tempfile.mkdtemp(prefix="meddiff_quickstart_")
print(config.model)"""),
    new_code_cell("""\
typed = checks.pretrain(config)  # checked and typed once, as main.py does: the loop runs on this
last = loop.train_and_evaluate(typed, workdir)
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
      "TensorBoard events to `workdir`."
    ),
    new_code_cell("""\
from meddiff_jax.data import pipeline
from meddiff_jax.train import step
shipped = next(iter(pipeline.make_dataset(pipeline.make_store(typed.data), typed.data, batch_size=3, seed=0)))
# samples ship their HU and label codes (data.decode_on_device); the train step finishes them on the device, as here
batch = {k: np.asarray(v) for k, v in step.decode_inputs(typed)(shipped).items()}
print("operations (whole, zoom2, patch):", shipped["operation"], "\\npos_box[0]:", batch["pos_box"][0])
plt.figure(figsize=(6, 6)); plt.imshow(montage.slice_montage(list(batch["image"]), tile=96)); plt.axis("off"); plt.show()"""),
  ]
)

# ------------------------------------------------------------------------------------------------ 02
nb02 = nb(
  [
    new_markdown_cell(
      "# 2. Denoising and anomaly detection on a real CT with the pretrained prior\n"
      "`CHECKPOINT` is `tiny_ct` (a CPU-sized prior trained on two real CTs: smoke-level) when installed, else "
      "`tiny_phantom` (phantoms only). Neither is a substitute for the paper-scale prior "
      "(`configs/pretrain.py:paper`). The CT is TotalSegmentator's public `example_ct` (fetched by URL), or "
      "your own with `UPLOAD = True`. Set `REPO` in the first cell if you install from a fork."
    ),
    new_code_cell(SETUP),
    new_code_cell(CHECKPOINT + "pre = pretrained.load(CHECKPOINT)\n"),
    new_code_cell(REAL_CT),
    new_markdown_cell(
      "## Denoising at a simulated low dose\nGaussian noise of `NOISE_HU` HU on the crop; "
      "DiffPIR with the prior vs a Gaussian filter. Bottom: each result minus the clean crop (HU)."
    ),
    new_code_cell("""\
import jax.numpy as jnp
from scipy import ndimage
from meddiff_jax.configs import anomaly as anomaly_config, denoise as denoise_config
from meddiff_jax import sharding
from meddiff_jax.evaluation import metrics
from meddiff_jax.tasks import anomaly, common, denoise
region = preprocess.region_id(REGION)
NOISE_HU = 40.0
clean = preprocess.hu_to_unit(hu, region)
sigma = NOISE_HU * 2 / (hi_hu - lo_hu)  # the same noise on the model's [-1, 1] scale
noisy = np.clip(clean + np.random.default_rng(0).normal(0, sigma, clean.shape), -1, 1).astype(np.float32)
cfg = denoise_config.get_config()
cfg.update(overlap=0.25, window_batch=8)
task = denoise.DenoiseSpec.from_config(cfg)  # the denoise command's options, typed and checked (no files here)
with sharding.activate(common.task_mesh(), sharding.DEFAULT_RULES):
  structures = common.structure_volume(pre, None, preprocess.unit_to_hu(noisy, region))  # body from HU, organs unknown
  fn, plan = common.windowed_denoiser(pre, common.Canvas(noisy.shape, region, structures, None, None), task)
  ts = denoise.diffpir_timesteps(pre.schedule, sigma, STEPS)
  out = jax.jit(lambda y: denoise.diffpir(fn, pre.schedule, y, jnp.float32(sigma), ts, jax.random.key(0), zeta=0.0))(
      jnp.asarray(noisy)[None, ..., None])
results = {"noisy": noisy, "Gaussian filter": ndimage.gaussian_filter(noisy, 1.0), "DiffPIR": np.asarray(out)[0, ..., 0]}
for name, img in results.items():
  print(f"{name:16s} PSNR {metrics.psnr(clean, img, 2.0):6.2f} dB  SSIM {metrics.ssim(clean, img, 2.0):.3f}")
to_hu = lambda v: preprocess.unit_to_hu(v, region)  # back to HU, within the region's window (what the model sees)
show([to_hu(clean)] + [to_hu(v) for v in results.values()], ["clean"] + list(results), ["gray"] * 4,
     [(lo_hu, hi_hu)] * 4, f"{CHECKPOINT}: denoising at {NOISE_HU:.0f} HU noise")
show([to_hu(v) - to_hu(clean) for v in results.values()], [f"{k} - clean" for k in results], ["RdBu_r"] * 3,
     [(-2 * NOISE_HU, 2 * NOISE_HU)] * 3, "difference maps (HU)")"""),
    new_markdown_cell(
      "## Anomaly detection: an inserted lesion\nA hypodense sphere in soft tissue; the prior "
      "reconstructs the crop from noise level `noise_t` (the paper: 950) and the anomaly map is the "
      "smoothed |input - reconstruction| inside the body."
    ),
    new_code_cell("""\
rng = np.random.default_rng(0)
tissue = ndimage.binary_erosion((hu > -20) & (hu < 120), iterations=4)  # soft tissue away from edges
candidates = np.argwhere(tissue) if tissue.any() else np.argwhere(preprocess.body_mask(hu))
lesion_centre = candidates[rng.integers(len(candidates))]
grid = np.stack(np.meshgrid(*[np.arange(n) for n in hu.shape], indexing="ij"), -1)
truth = np.linalg.norm(grid - lesion_centre, axis=-1) <= 4.0
with_lesion = np.where(truth, hu - 60.0, hu).astype(np.float32)  # 60 HU darker, like a hypodense lesion
x = preprocess.hu_to_unit(with_lesion, region)
acfg = anomaly_config.get_config()
acfg.update(overlap=0.25, window_batch=8, noise_t=500, num_steps=STEPS, seed=0, sampler="dpmpp_2m")
canvas = common.Canvas(x.shape, region, common.structure_volume(pre, None, with_lesion), None, None)
recon = anomaly.reconstruct(pre, x, canvas, anomaly.AnomalySpec.from_config(acfg))
body = preprocess.body_mask(with_lesion)
amap = anomaly.anomaly_map(x, recon, body)
print(f"volume score {anomaly.volume_score(amap, body):.4f}; voxel AUROC (lesion vs rest of body) "
      f"{metrics.auroc(truth[body], amap[body]):.3f}")
z = int(lesion_centre[2])
view = lambda v: np.fliplr(np.rot90(v[:, :, z]))  # the axial slice through the lesion
fig, ax = plt.subplots(1, 4, figsize=(13, 3.4))
for a, img, title in zip(ax[:3], (with_lesion, to_hu(recon), np.abs(with_lesion - to_hu(recon))),
                         ("input with lesion", "reconstruction", "|input - reconstruction| (HU)")):
  a.imshow(view(img), cmap="gray" if "|" not in title else "magma",
           **({"vmin": lo_hu, "vmax": hi_hu} if "|" not in title else {}))
  a.set_title(title, fontsize=9)
ax[3].imshow(view(with_lesion), cmap="gray", vmin=lo_hu, vmax=hi_hu)
ax[3].imshow(np.ma.masked_less(view(amap), np.percentile(amap[body], 95)), cmap="autumn", alpha=0.6)
ax[3].contour(view(truth.astype(float)), levels=[0.5], colors="cyan", linewidths=1)
ax[3].set_title("anomaly map (top 5%) + true lesion", fontsize=9)
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
from meddiff_jax.configs import controlnet as cn_config
from meddiff_jax import checks
from meddiff_jax.train import controlnet as cn_train
config = cn_config.get_config("sr")
config.base_checkpoint = CHECKPOINT
config.training.update(num_steps=int(os.environ.get("NB_STEPS", 6)), batch_size=2, log_every=2)
config.data.phantom.update(num_volumes=3, shape=(48, 48, 48), spacing=SPACING)  # the base's voxel size
config.eval.update(every_steps=0, sample_every_steps=0)  # no validation / previews in this short demo
workdir = tempfile.mkdtemp(prefix="meddiff_sr_")
print(cn_train.finetune(checks.controlnet(config), workdir))  # checked and derived from the base once"""),
    new_code_cell(REAL_CT),
    new_code_cell("""\
from meddiff_jax.configs import super_resolution
from meddiff_jax import checks
from meddiff_jax.tasks import controlled
hr_path, lr_path, sr_path = (os.path.join(workdir, n) for n in ("hr.nii.gz", "lr.nii.gz", "sr.nii.gz"))
hr = volumes.Volume(np.round(hu), crop_affine)
nifti.save(hr, hr_path, np.int16)
nifti.save(volumes.resample(hr, (SPACING[0], SPACING[1], 5 * SPACING[2])), lr_path, np.int16)  # x5 thick slices
c = super_resolution.get_config()
c.update(controlnet=workdir, input=lr_path, output=sr_path, reference=hr_path, region=REGION, num_steps=STEPS)
result = controlled.run_super_resolution(checks.task(c))  # checked and typed, as the command does
print(json.dumps(result["metrics"], indent=1))"""),
    new_code_cell("""\
sr = volume_io.load(sr_path).data
lr_up = volumes.resample(volume_io.load(lr_path), SPACING).data
n = [min(s) for s in zip(hr.shape, sr.shape, lr_up.shape)]
# compared within the region's HU window: the model's output range (bone above it is clipped)
ref, tri, out = (np.clip(v[:n[0], :n[1], :n[2]], lo_hu, hi_hu).astype(np.float32) for v in (hr.data, lr_up, sr))
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
