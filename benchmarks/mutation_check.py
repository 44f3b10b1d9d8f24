"""Mutation check: every mutant against every test file that reaches the mutated module. Nobody picks the tests.

Each mutant is one semantic change (a sign, an off-by-one timestep, a dropped term, a wrong scale, a condition or
option not passed on) to one module of meddiff_jax, applied to a scratch copy of the repository (`git ls-files`).
The tests a mutant runs against are computed, not chosen: every tests/test_*.py whose imports reach the mutated
module through the package's import graph (tests/test_layers.py's parser: module- and function-level imports), a
file that imports from conftest also reaching what conftest's helpers import. They run in groups by distance,
nearest first (files that import the module itself, then those one import away, ..., then those that reach it only
through conftest), one pytest run per group with `-x -p no:cacheprovider`, the fast tier (`-m "not slow"`) unless
the mutant is marked slow; the first failing group kills the mutant, and its first failing test is recorded and
then run alone on the unmutated copy, which it must pass (else the kill is void and the check stops). A mutant
survives when every reaching test passes. The text to mutate must occur exactly once in the current file (the
tree is ruff-formatted: copy the text from the file).

nice -n 10 python benchmarks/mutation_check.py [--only SUBSTR,SUBSTR] [--baseline] [--resume]
Writes benchmarks/results/mutation_check.json after every mutant (merged by mutant name with what the file already
holds), so a stopped run loses at most the mutant in progress, and prints the markdown table of RESULTS.md.
--resume skips the mutants the file already records as killed with the same definition (file, text, replacement);
survivors and changed mutants run again (a test added since cannot undo a kill: the killing test is re-verified).
The tests that killed earlier mutants (their file reaching this mutant's module) are tried first, as one run: a
shortcut, not a selection (when none fails, every reaching group runs as above); within a group, the files whose
tests killed the latest mutant, then those with the most kills so far, run first.
--baseline first runs the whole fast tier on the unmutated copy (it must pass).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import test_layers  # noqa: E402  (the import graph the layer test checks)

PKG = "meddiff_jax/"
SAMPLERS = PKG + "diffusion/samplers.py"
SCHEDULES = PKG + "diffusion/schedules.py"
CONDITIONS = PKG + "models/conditions.py"
COMMON = PKG + "tasks/common.py"
DENOISE = PKG + "tasks/denoise.py"
ANOMALY = PKG + "tasks/anomaly.py"
SYNTHESIS = PKG + "tasks/synthesis.py"
CONTROLLED = PKG + "tasks/controlled.py"
MULTILEVEL = PKG + "data/multilevel.py"
PREPROCESS = PKG + "data/preprocess.py"
STORE = PKG + "data/store.py"


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str
  old: str
  new: str
  slow: bool = False  # also run the slow tests (only where no fast test can see the change)


MUTANTS = [
  # ------------------------------------------------------------------ samplers, partial diffusion, guidance
  Mutant(
    "partial: fresh noise on top of y's noise",
    SAMPLERS,
    "one_minus_alpha_bar(schedule, t, y.ndim) - abar * jnp.square(input_sigma)",
    "one_minus_alpha_bar(schedule, t, y.ndim) - 0.0 * jnp.square(input_sigma)",
  ),
  Mutant(
    "partial: start without the sqrt(abar) scale",
    SAMPLERS,
    "return jnp.sqrt(abar) * y + jnp.sqrt(extra) * noise",
    "return y + jnp.sqrt(extra) * noise",
  ),
  Mutant(
    "sample: first step not from t_start",
    SAMPLERS,
    "rng, step_rng = jax.random.split(rng)\n    t = jnp.full((n,), jnp.where(e == first, t_first, ts_ext[e]))",
    "rng, step_rng = jax.random.split(rng)\n    t = jnp.full((n,), ts_ext[e])",
  ),
  Mutant(
    "dpm-solver++: first step not from t_start",
    SAMPLERS,
    "x, x0_prev, h_prev = carry\n    t = jnp.full((n,), jnp.where(e == first, t_first, ts_ext[e]))",
    "x, x0_prev, h_prev = carry\n    t = jnp.full((n,), ts_ext[e])",
  ),
  Mutant(
    "sample: off-by-one start index",
    SAMPLERS,
    "first = above + on_grid.astype(jnp.int32)",
    "first = above + 1",
  ),
  Mutant(
    "partial grid: off by one below t*",
    SAMPLERS,
    "np.round(np.linspace(0, t_start, n))",
    "np.round(np.linspace(0, t_start - 1, n))",
  ),
  Mutant(
    "ddim: direction sign flipped",
    SAMPLERS,
    "return jnp.exp(0.5 * log_prev) * x0 + direction + sigma * noise",
    "return jnp.exp(0.5 * log_prev) * x0 - direction + sigma * noise",
  ),
  Mutant(
    "ddpm: noise term dropped",
    SAMPLERS,
    "return mean + jnp.where(t_prev >= 0, jnp.sqrt(var), 0.0) * noise",
    "return mean",
  ),
  Mutant(
    "ddpm: clip_x0 ignored",
    SAMPLERS,
    "  if clip_x0:\n    x0 = jnp.clip(x0, -1.0, 1.0)\n  mean",
    "  if False:\n    x0 = jnp.clip(x0, -1.0, 1.0)\n  mean",
  ),
  Mutant(
    "ddim: eps not recomputed from the clipped x0",
    SAMPLERS,
    "    eps = (x_t - jnp.exp(0.5 * log_t) * x0) / jnp.sqrt(one_minus_t)\n",
    "",
  ),
  Mutant(
    "cfg: guidance around the conditional output",
    SAMPLERS,
    "return out_u + guidance_scale * (out_c - out_u)",
    "return out_c + guidance_scale * (out_c - out_u)",
  ),
  Mutant(
    "null condition: structures kept",
    SAMPLERS,
    "null[conditions.STRUCTURES] = jnp.zeros_like(null[conditions.STRUCTURES])",
    "null[conditions.STRUCTURES] = null[conditions.STRUCTURES]",
  ),
  # ------------------------------------------------------------------ prediction_type: the one conversion
  Mutant(
    "prediction type: every model read as eps",
    SAMPLERS,
    '  if prediction_type == "epsilon":\n    return denoise_fn\n',
    "  if True:\n    return denoise_fn\n",
  ),
  Mutant(
    "prediction type: the windowed denoiser ignores the checkpoint's",
    COMMON,
    "samplers.epsilon_fn(blended, pre.schedule, pre.diffusion.prediction_type)",
    'samplers.epsilon_fn(blended, pre.schedule, "epsilon")',
  ),
  Mutant(
    "prediction type: v's eps with the wrong sign",
    SCHEDULES,
    "    eps = s1a * x_t + sa * model_output",
    "    eps = s1a * x_t - sa * model_output",
  ),
  Mutant(
    "prediction type: x0's eps without sqrt(abar)",
    SCHEDULES,
    "    eps = (x_t - sa * x0) / s1a",
    "    eps = (x_t - x0) / s1a",
  ),
  Mutant(
    "prediction type: diffpir reads eps",
    DENOISE,
    "x0, _ = schedules.split_prediction(schedule, prediction_type, denoise_fn(x, t), x, t)",
    'x0, _ = schedules.split_prediction(schedule, "epsilon", denoise_fn(x, t), x, t)',
  ),
  Mutant(
    "prediction type: partial diffusion does not pass it on",
    DENOISE,
    "    prediction_type=prediction_type,\n    progress=progress,",
    "    progress=progress,",
  ),
  Mutant(
    "prediction type: repaint's DDPM step reads eps",
    CONTROLLED,
    "noise, prediction_type=prediction_type)",
    "noise)",
  ),
  # ------------------------------------------------------------------ structure conditions and their dropout
  Mutant(
    "organ dropout: body dropped too",
    CONDITIONS,
    "  body = structures[..., -1:]\n",
    "  body = jnp.zeros_like(structures[..., -1:])\n",
  ),
  Mutant(
    "label dropout: organs kept",
    CONDITIONS,
    "    out = jnp.where(expand(drop), unknown, structures)",
    "    out = structures",
  ),
  Mutant(
    "label dropout: body bit ignored",
    CONDITIONS,
    "    unknown = jnp.where(body, label_body_id | LABEL_BODY_BIT, 0).astype(structures.dtype)",
    "    unknown = jnp.full_like(structures, label_body_id | LABEL_BODY_BIT)",
  ),
  Mutant(
    "training: label ids dropped as grouped channels",
    PKG + "train/step.py",
    "label_body_id=conditions.label_body_id(model.structure_embed_dim, model.num_structure_ids),",
    "label_body_id=0,",
  ),
  Mutant(
    "label ids: no body bit",
    PREPROCESS,
    "  return (out | np.where(body, conditions.LABEL_BODY_BIT, 0).astype(np.uint8))[..., None]",
    "  return out[..., None]",
  ),
  Mutant(
    "model: the body bit read as part of the id",
    PKG + "models/unet3d.py",
    "(conditions.label_ids(structures[..., 0]))",
    "(structures[..., 0])",
    slow=True,
  ),
  Mutant(
    "conditions: label map ignored",
    COMMON,
    "out = encode(labels, np.asarray(hu), lut, groups)",
    "out = encode(None, np.asarray(hu), lut, groups)",
  ),
  Mutant(
    "conditions: body channel not from HU",
    PREPROCESS,
    "return np.asarray(hu) > BODY_THRESHOLD_HU",
    "return np.asarray(hu) > -2000.0",
  ),
  Mutant(
    "position frame: padding counted in the frame",
    PKG + "tasks/sliding_window.py",
    "rel = self.starts - np.asarray(self.frame_start)",
    "rel = self.starts.astype(np.float32)",
  ),
  # ------------------------------------------------------------------ DiffPIR, denoising
  Mutant(
    "diffpir: lambda on the [-1,1] scale (rho x4)",
    DENOISE,
    "rho = lam * (0.5 * sigma_n) ** 2 / sigma_t2",
    "rho = lam * sigma_n ** 2 / sigma_t2",
  ),
  Mutant("diffpir: data step dropped", DENOISE, "x0_hat = (y + rho * x0) / (1.0 + rho)", "x0_hat = x0"),
  Mutant(
    "diffpir: data step sign flipped",
    DENOISE,
    "x0_hat = (y + rho * x0) / (1.0 + rho)",
    "x0_hat = (-y + rho * x0) / (1.0 + rho)",
  ),
  Mutant(
    "diffpir: zeta ignored",
    DENOISE,
    "noise = jnp.sqrt(1.0 - zeta) * eps_hat + jnp.sqrt(zeta) * jax.random.normal(z_rng, x.shape)",
    "noise = eps_hat",
  ),
  Mutant(
    "diffpir: start from pure noise",
    DENOISE,
    "x = samplers.noise_matched_start(schedule, y, jnp.full((n,), ts[0]), jax.random.normal(init_rng, y.shape), sigma_n)",
    "x = jax.random.normal(init_rng, y.shape)",
  ),
  Mutant(
    "diffpir: start adds fresh noise (y's noise ignored)",
    DENOISE,
    "jax.random.normal(init_rng, y.shape), sigma_n)",
    "jax.random.normal(init_rng, y.shape), 0.0)",
  ),
  Mutant(
    "diffpir: eps_hat sign flipped",
    DENOISE,
    "eps_hat = (x - jnp.sqrt(abar) * x0_hat)",
    "eps_hat = (x + jnp.sqrt(abar) * x0_hat)",
  ),
  Mutant(
    "denoise: noisy input decides the window merge",
    PKG + "tasks/scans.py",
    "  local = ndimage.gaussian_filter(input_hu, smooth_voxels) if smooth_voxels else input_hu",
    "  local = input_hu",
  ),
  Mutant(
    "window merge: the model's value where it saturates at the ceiling (thin bone capped)",
    PKG + "tasks/scans.py",
    "  np.minimum(w, model_can_tell, out=w)\n",
    "",
  ),
  Mutant(
    "noise estimate: white-noise lag 1",
    DENOISE,
    "mask: np.ndarray | None = None, lag: int = 4, max_samples",
    "mask: np.ndarray | None = None, lag: int = 1, max_samples",
  ),
  Mutant(
    "noise estimate: depth slabs without their 2 x lag rows past the slab",
    DENOISE,
    "    reach = 2 * lag if axis == 0 else 0",
    "    reach = 0",
  ),
  Mutant(
    "noise estimate: every k-th difference counted from each slab's start",
    DENOISE,
    "      values.append(d[(-seen) % stride :: stride])",
    "      values.append(d[::stride])",
  ),
  Mutant(
    "memory check: a CPU device offered the whole host's memory",
    COMMON,
    "  return workers.available_memory() // jax.local_device_count() if",
    "  return workers.available_memory() if",
  ),
  Mutant(
    "memory check: the sampler's temporaries not counted",
    COMMON,
    "  need = int(stats.output_size_in_bytes) + int(stats.temp_size_in_bytes)",
    "  need = int(stats.output_size_in_bytes)",
  ),
  Mutant(
    "sampler: the params closed over (constants XLA folds at compile time)",
    COMMON,
    "apply = stoppable(functools.partial(apply_fn, params), stop)",
    "apply = stoppable(functools.partial(apply_fn, replicated), stop)",
  ),
  # ------------------------------------------------------------------ each task's run(): what it passes on
  Mutant(
    "denoise run: sigma in HU read on a [0, 1] scale",
    DENOISE,
    "else float(task.noise_sigma_hu) * 2.0 / (hi - lo)",
    "else float(task.noise_sigma_hu) / (hi - lo)",
  ),
  Mutant(
    "denoise run: the input's own grid",
    DENOISE,
    "scan = common.open_scan(task, common.model_data(task, memory), memory=memory)",
    "scan = common.open_scan(task, common.model_data(task, memory), memory=memory, spacing=common.INPUT)",
  ),
  Mutant(
    "spacing: input runs at the checkpoint's spacing",
    PKG + "tasks/scans.py",
    "  if setting == INPUT or (setting == CHECKPOINT and trained is None):\n    spacing = None\n  elif setting == CHECKPOINT:",
    "  if trained is None:\n    spacing = None\n  elif setting in (CHECKPOINT, INPUT):",
  ),
  Mutant(
    "task input: the abdomen window for every region",
    COMMON,
    "  region = preprocess.region_id(part.region)",
    '  region = preprocess.region_id("abdomen")',
  ),
  Mutant(
    "task input: label map not read",
    COMMON,
    "structures = structure_volume(pre, None if labels is None else labels.data, work.data, pre.patch_size, packed=True)",
    "structures = structure_volume(pre, None, work.data, pre.patch_size, packed=True)",
  ),
  Mutant(
    "anomaly run: the input's own grid",
    ANOMALY,
    "scan = common.open_scan(task, common.model_data(task, memory), memory=memory)",
    "scan = common.open_scan(task, common.model_data(task, memory), memory=memory, spacing=common.INPUT)",
  ),
  Mutant(
    "anomaly: noise level one grid step low",
    ANOMALY,
    "fn, pre.schedule, y, task.noise_t, task.num_steps,",
    "fn, pre.schedule, y, task.noise_t - 10, task.num_steps,",
  ),
  Mutant(
    "anomaly: noise_t past the schedule accepted",
    ANOMALY,
    "  if not 0 < task.noise_t < steps:",
    "  if False:",
  ),
  Mutant(
    "anomaly run: map not smoothed",
    ANOMALY,
    "amap = anomaly_map(inp.unit[inp.crop], recon, body, task.smooth_sigma)",
    "amap = anomaly_map(inp.unit[inp.crop], recon, body, 0.0)",
  ),
  Mutant(
    "anomaly run: score of the whole body, not its top fraction",
    ANOMALY,
    "volume_score(amap, body, task.top_fraction)",
    "volume_score(amap, body, 1.0)",
  ),
  Mutant(
    "synthesis run: region not passed on",
    SYNTHESIS,
    "  region = preprocess.region_id(region_name)",
    '  region = preprocess.region_id("abdomen")',
  ),
  Mutant(
    "synthesis run: the params not passed on",
    SYNTHESIS,
    "apply_fn=common.model_fn(pre, scale), params=pre.params,",
    "apply_fn=common.model_fn(pre, scale),",
  ),
  Mutant(
    "synthesis run: label map not passed on",
    SYNTHESIS,
    "structures = common.structure_volume(pre, labels, proxy, packed=True)",
    "structures = common.structure_volume(pre, None, proxy, packed=True)",
  ),
  Mutant(
    "synthesis run: 1 mm instead of the training spacing",
    SYNTHESIS,
    "spacing = (trained if task.spacing == common.CHECKPOINT else tuple(float(s) for s in task.spacing)) or (1.0,) * 3",
    "spacing = (1.0, 1.0, 1.0)",
  ),
  Mutant(
    "super-resolution run: the base's spacing, not the branch run's",
    CONTROLLED,
    "data = common.model_data(task, memory)",
    "data = common.data_spec(pretrained.read_config(task.controlnet).base_checkpoint)",
  ),
  Mutant(
    "super-resolution run: the hint is not the input",
    CONTROLLED,
    "out = sample_controlled(cm, inp, inp.unit, task, sample)",
    "out = sample_controlled(cm, inp, np.zeros_like(inp.unit), task, sample)",
  ),
  Mutant(
    "lesion run: the input's own grid",
    CONTROLLED,
    "scan = common.open_scan(task, common.data_spec(task.controlnet), by_region=False)",
    "scan = common.open_scan(task, common.data_spec(task.controlnet), by_region=False, spacing=common.INPUT)",
  ),
  Mutant(
    "lesion run: mask hint not on the data scale",
    CONTROLLED,
    "gen_unit = sample_controlled(cm, inp, m * 2.0 - 1.0, task, sample)",
    "gen_unit = sample_controlled(cm, inp, m, task, sample)",
  ),
  Mutant(
    "lesion inpaint: RePaint keeps the hole and regenerates the scan",
    CONTROLLED,
    "keep = 1.0 - jnp.asarray(hole, jnp.float32)[None, ..., None]",
    "keep = jnp.asarray(hole, jnp.float32)[None, ..., None]",
  ),
  Mutant(
    "lesion inpaint: sampled from noise like generate (no RePaint)",
    CONTROLLED,
    'if task.method == "inpaint":\n    keep = 1.0',
    "if False:\n    keep = 1.0",
  ),
  # ------------------------------------------------------------------ RePaint
  Mutant(
    "repaint: known region not re-noised",
    CONTROLLED,
    "known_prev = schedules.q_sample(schedule, known, t_prev, jax.random.normal(k2, x.shape))",
    "known_prev = known",
  ),
  Mutant(
    "repaint: known region at the wrong noise level (t)",
    CONTROLLED,
    "known_prev = schedules.q_sample(schedule, known, t_prev, jax.random.normal(k2, x.shape))",
    "known_prev = schedules.q_sample(schedule, known, t, jax.random.normal(k2, x.shape))",
  ),
  Mutant(
    "repaint: no known-region injection",
    CONTROLLED,
    "    return keep * known_prev + (1.0 - keep) * unknown",
    "    return unknown",
  ),
  Mutant(
    "repaint: jumps do not re-noise",
    CONTROLLED,
    "return jnp.sqrt(ratio) * x + jnp.sqrt(1.0 - ratio) * jax.random.normal(rng, x.shape)",
    "return x",
  ),
  Mutant("repaint: no jumps", CONTROLLED, "    if u >= 0 and jumps.get(u, 0) > 0:", "    if False:"),
  Mutant("repaint: final step repeated", CONTROLLED, "  while u >= 0:\n", "  while u >= -1:\n"),
  Mutant(
    "repaint: jumps counted in grid steps",
    CONTROLLED,
    "steps = jump_steps(schedule.num_timesteps, len(asc), jump_timesteps)",
    "steps = jump_timesteps",
  ),
  Mutant(
    "repaint: jump length truncated to the grid",
    CONTROLLED,
    "np.floor(jump_timesteps * num_steps / num_train_timesteps + 0.5)",
    "np.floor(jump_timesteps * num_steps / num_train_timesteps)",
  ),
  Mutant(
    "repaint: one resampling pass fewer",
    CONTROLLED,
    "jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}",
    "jumps = {j: jump_n_sample - 2 for j in range(0, num_steps - jump_length, jump_length)}",
  ),
  # ------------------------------------------------------------------ training: partition, EMA, loss
  Mutant(
    "optimizer: frozen leaves updated too",
    PKG + "train/state.py",
    "optax.partition({trainable.TRAINABLE: tx, trainable.FROZEN: optax.set_to_zero()}, labels)",
    "optax.partition({trainable.TRAINABLE: tx, trainable.FROZEN: tx}, labels)",
  ),
  Mutant(
    "trainable labels: a prefix is enough",
    PKG + "models/trainable.py",
    "out = {path: TRAINABLE if any(p.fullmatch(path) for p in compiled) else FROZEN for path in flat}",
    "out = {path: TRAINABLE if any(p.match(path) for p in compiled) else FROZEN for path in flat}",
  ),
  Mutant(
    "trainable labels: swapped",
    PKG + "models/trainable.py",
    "out = {path: TRAINABLE if any(p.fullmatch(path) for p in compiled) else FROZEN for path in flat}",
    "out = {path: FROZEN if any(p.fullmatch(path) for p in compiled) else TRAINABLE for path in flat}",
  ),
  Mutant(
    "ema: decay used as the step size",
    PKG + "train/step.py",
    "step_size=1.0 - ema_decay)",
    "step_size=ema_decay)",
  ),
  Mutant(
    "ema: averages the params before the update",
    PKG + "train/step.py",
    "optax.incremental_update(float32_tree(new_params), state.ema_params",
    "optax.incremental_update(float32_tree(params), state.ema_params",
  ),
  Mutant(
    "loss: L1 computed as L2",
    PKG + "diffusion/losses.py",
    "    err = jnp.abs(diff)",
    "    err = jnp.square(diff)",
  ),
  # ------------------------------------------------------------------ ControlNet configs
  Mutant(
    "controlnet config: spacing not inherited",
    PKG + "train/controlnet.py",
    '"spacing": tuple(spacing) if spacing else base_data.spacing,',
    '"spacing": "source",',
  ),
  Mutant(
    "controlnet config: a conflicting value accepted",
    PKG + "train/controlnet.py",
    "    elif not _same(asked, theirs):",
    "    elif False:",
  ),
  Mutant(
    "controlnet config: the branch's data at another spacing accepted",
    PKG + "train/controlnet.py",
    "    if source and not np.allclose(source, spacing):",
    "    if False:",
  ),
  # ------------------------------------------------------------------ host data pipeline, metrics
  Mutant("lesion crops: positive centre ignored", MULTILEVEL, "  if centre is not None:\n", "  if False:\n"),
  Mutant(
    "lesion labels: organ lost under the lesion",
    MULTILEVEL,
    "organs = np.where(wide >= LESION_OFFSET, wide - LESION_OFFSET,",
    "organs = np.where(wide >= LESION_OFFSET, 0,",
  ),
  Mutant(
    "sr hint: degradation after the resize",
    MULTILEVEL,
    "      thick = thick_slices(np.asarray(native, np.float32), sr_factor, axis=2)\n"
    "    sample[conditions.HINT] = preprocess.hu_to_unit(resize(thick, target, order=1, dtype=np.float32), region)",
    "      thick = None\n"
    "    sample[conditions.HINT] = thick_slices(sample[conditions.IMAGE], sr_factor, axis=2) if thick is None else "
    "preprocess.hu_to_unit(resize(thick, target, order=1, dtype=np.float32), region)",
  ),
  Mutant(
    "zoom2 window: shipped from the thread's reused memory",
    MULTILEVEL,
    '    window_only = operation == "zoom2" and key == HU\n',
    '    window_only = operation == "zoom2"\n',
  ),
  Mutant(
    "strided gather: every box written to the output's first block",
    STORE,
    "ts.array(out[tuple(slice(o, o + n) for o, _, _, n in box)], copy=False, write=True)",
    "ts.array(out[tuple(slice(0, n) for o, _, _, n in box)], copy=False, write=True)",
  ),
  Mutant(
    "lesion inpaint: the scan not kept outside the regenerated region on its grid",
    CONTROLLED,
    "      block = np.where(new, block, np.round(before))\n",
    "      block = np.where(new | True, block, np.round(before))\n",
  ),
  Mutant(
    "lesion scores: the Dice box one voxel short of the dilation",
    CONTROLLED,
    "    self.box = bounding_box(lesion, margin=2)",
    "    self.box = bounding_box(lesion, margin=1)",
  ),
  Mutant(
    "lesion inpaint: the moved hole's box without the nearest voxel's reach",
    CONTROLLED,
    "[(sl.start - 1.5, sl.stop - 1 + 1.5) for sl in box]",
    "[(sl.start, sl.stop - 1) for sl in box]",
  ),
  Mutant(
    "resize: linear weights swapped",
    MULTILEVEL,
    "taps.append((lo, np.minimum(lo + 1, n - 1), 1.0 - w, w))",
    "taps.append((lo, np.minimum(lo + 1, n - 1), w, 1.0 - w))",
  ),
  Mutant(
    "resize: nearest rounds down",
    MULTILEVEL,
    "np.floor(_source_coordinates(n, m) + 0.5)",
    "np.floor(_source_coordinates(n, m))",
  ),
  Mutant(
    "packed structures: body bit read as a group bit",
    CONDITIONS,
    "masks = np.array([0xFE] * k + [0x01], np.uint8)",
    "masks = np.array([0xFF] * k + [0x01], np.uint8)",
  ),
  Mutant(
    "slice AUROC: slice score is the mean",
    PKG + "evaluation/metrics.py",
    "      out[i] = np.mean(np.partition(values, values.size - k)[-k:])",
    "      out[i] = np.mean(values)",
  ),
]


# ------------------------------------------------------------------------------------------ which tests reach what


def module_of(path: str) -> str:
  parts = pathlib.PurePosixPath(path).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def distances(graph: dict[str, set[str]], starts: set[str]) -> dict[str, int]:
  """Import hops from `starts` (hop 0) to every package module they reach."""
  out, frontier, hop = {m: 0 for m in starts}, set(starts), 0
  while frontier:
    hop += 1
    frontier = {t for m in frontier for t in graph.get(m, ()) if t not in out}
    out.update({t: hop for t in frontier})
  return out


def test_groups(module: str) -> list[list[str]]:
  """The test files that reach `module`, grouped by distance (nearest first): the hops from the file's own
  imports, then (offset past every own distance) the hops through conftest's helpers."""
  modules = test_layers.module_files()
  graph = {m: test_layers.imported_modules(m, p, modules) for m, p in modules.items()}
  conftest_path = ROOT / "tests" / "conftest.py"
  via_conftest = distances(graph, test_layers.imported_modules("tests.conftest", conftest_path, modules))
  groups: dict[int, list[str]] = {}
  for path in sorted((ROOT / "tests").glob("test_*.py")):
    own = distances(graph, test_layers.imported_modules(f"tests.{path.stem}", path, modules))
    uses_conftest = re.search(r"^from conftest import|^import conftest", path.read_text(), re.M)
    if module in own:
      key = own[module]
    elif uses_conftest and module in via_conftest:
      key = 1000 + via_conftest[module]
    else:
      continue
    groups.setdefault(key, []).append(str(path.relative_to(ROOT)))
  return [groups[k] for k in sorted(groups)]


# ------------------------------------------------------------------------------------------ running


def pytest_run(tree: pathlib.Path, args: list[str], timeout: int) -> tuple[int, float, str, str]:
  """(return code, seconds, the first failing test's node id or '', the last output line)."""
  env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu", PYTHONDONTWRITEBYTECODE="1")
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *args],
      cwd=tree,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    rc = proc.returncode
  except subprocess.TimeoutExpired as e:
    out, rc = f"{e.stdout or ''}\ntimeout after {timeout} s", -1
  failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
  lines = out.strip().splitlines()
  return rc, time.perf_counter() - t0, (failed[0] if failed else ""), (lines[-1] if lines else "")


def scratch_copy(dest: pathlib.Path) -> None:
  """The tracked files of this checkout (its working-tree versions), without caches, in a git repository of its
  own with those files staged (the TPU launcher's tests list what it ships with git ls-files)."""
  files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  for name in filter(None, files.split("\0")):
    src, dst = ROOT / name, dest / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
      os.symlink(os.readlink(src), dst)
    elif src.is_file():
      shutil.copy2(src, dst)
  subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
  subprocess.run(["git", "add", "-A"], cwd=dest, check=True)


FIRST = (
  " run",
  "task input",
  "repaint",
  "optimizer",
  "trainable",
  "ema:",
  "controlnet config",
  "dropout",
  "label ids",
  "noise_t",
)
NO_TESTS = 5  # pytest's exit code when every test of a run is deselected (a group of slow tests only)


def by_kills(group: list[str], recorded: dict[str, dict]) -> list[str]:
  """A group's files, the one whose test killed the latest mutant first, then by kills so far (pytest runs files in
  the order given, and -x stops at the first failure): the same files run, only the likely killers sooner."""
  kills = [r for r in recorded.values() if r.get("status") == "killed"]
  kills.sort(key=lambda r: r.get("when", ""))
  files = [r.get("killed_by", "").split("::")[0] for r in kills]
  latest = {f: i for i, f in enumerate(files)}  # mutants run by theme: the latest killer's file is the likeliest
  return sorted(group, key=lambda f: (-latest.get(f, -1), -files.count(f), f))


def prior_killers(m: Mutant, recorded: dict[str, dict], reaching: set[str], limit: int = 6) -> list[str]:
  """The tests that killed mutants before (this mutant's own killer first, then those of its module's other
  mutants, then any other), kept only where their file reaches this mutant's module. Run first, as one pytest
  run, they only save time: their failure is a kill like any other (and re-verified unmutated); when none fails
  the groups run as if they had not been tried, so a survivor is still one that every reaching test lets pass."""
  own = recorded.get(m.name, {})
  kills = [r for r in recorded.values() if r.get("status") == "killed" and "::" in r.get("killed_by", "")]
  kills.sort(key=lambda r: r.get("when", ""), reverse=True)  # the latest first within each rank (a stable sort)
  ranked = sorted(kills, key=lambda r: (r["mutant"] != m.name, r["file"] != m.path))
  out = []
  for r in ([own] if own.get("status") == "killed" else []) + ranked:
    test = r.get("killed_by", "")
    if "::" in test and test.split("::")[0] in reaching and test not in out:
      out.append(test)
  return out[:limit]


def definition(m: Mutant) -> str:
  """A short hash of what the mutant changes: a recorded result counts only for the same definition."""
  return hashlib.sha256(json.dumps([m.path, m.old, m.new, m.slow]).encode()).hexdigest()[:12]


def write_results(out: pathlib.Path, recorded: dict[str, dict], command: str) -> list[dict]:
  """Every recorded result of a current mutant, in MUTANTS order (atomic replace: a kill mid-write loses nothing)."""
  results = [recorded[m.name] for m in MUTANTS if m.name in recorded]
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".tmp")
  tmp.write_text(json.dumps({"last_command": command, "results": results}, indent=1))
  os.replace(tmp, out)
  return results


def print_table(results: list[dict]) -> None:
  """The markdown table of RESULTS.md: every mutant of MUTANTS, those not yet run marked so."""
  by_name = {r["mutant"]: r for r in results}
  killed = sum(r["status"] == "killed" for r in results)
  survived = [r["mutant"] for r in results if r["status"] != "killed"]
  print(f"\n{killed}/{len(results)} mutants run killed ({len(MUTANTS) - len(results)} of {len(MUTANTS)} not run)")
  print(f"survivors: {survived}\n")
  print("| mutant | file | killed by (first failing test) | test files run / reaching | s |\n|---|---|---|---|---|")
  for m in MUTANTS:
    r = by_name.get(m.name)
    if r is None:
      print(f"| {m.name} | `{m.path.removeprefix(PKG)}` | not run | | |")
      continue
    by = f"`{r['killed_by']}`" if r["status"] == "killed" else "**SURVIVED**"
    files = f"{r['test_files_run']} / {r['test_files_reaching']}"
    if r["status"] == "killed" and r["test_files_run"] == 0:
      files = f"earlier killers / {r['test_files_reaching']}"
    print(f"| {m.name} | `{m.path.removeprefix(PKG)}` | {by} | {files} | {r['seconds']:.0f} |")


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--only", default="", help="comma-separated substrings of mutant names")
  p.add_argument("--timeout", type=int, default=3600, help="seconds per pytest run")
  p.add_argument("--baseline", action="store_true", help="first run the whole fast tier unmutated (must pass)")
  p.add_argument("--out", default="mutation_check.json")
  p.add_argument("--resume", action="store_true", help="skip the mutants the results file records as killed")
  p.add_argument("--table", action="store_true", help="only print the table of the results file")
  args = p.parse_args()
  out = ROOT / "benchmarks" / "results" / args.out
  recorded = {}
  if out.exists():
    old = json.loads(out.read_text())
    recorded = {r["mutant"]: r for r in old.get("results", []) if "definition" in r}
  if args.table:
    current = {m.name: definition(m) for m in MUTANTS}
    return print_table([r for r in recorded.values() if current.get(r["mutant"]) == r["definition"]])
  chosen = [m for m in MUTANTS if not args.only or any(s in m.name for s in args.only.split(","))]
  # what issue 26 added first (each task's run() wiring, RePaint's schedule, the optimizer partition and EMA, the
  # ControlNet data, dropout in every structure mode), then the rest of tasks/ and diffusion/ (where a wrong answer
  # is silent), then the others; stable, so otherwise in MUTANTS order
  chosen.sort(
    key=lambda m: (not any(k in m.name for k in FIRST), not m.path.startswith((PKG + "tasks/", PKG + "diffusion/")))
  )
  if args.resume:
    done = {n for n, r in recorded.items() if r["status"] == "killed"}
    chosen = [m for m in chosen if not (m.name in done and recorded[m.name]["definition"] == definition(m))]
    print(f"resuming: {len(chosen)} mutants to run", flush=True)
  for m in chosen:  # every text must be where it is said to be, once, before anything runs
    count = (ROOT / m.path).read_text().count(m.old)
    if count != 1:
      raise SystemExit(f"mutant {m.name!r}: the text to mutate occurs {count} times in {m.path}")
  verified = set()
  with tempfile.TemporaryDirectory() as tmp:
    tree = pathlib.Path(tmp) / "repo"
    scratch_copy(tree)
    if args.baseline:
      rc, seconds, first, tail = pytest_run(tree, ["-m", "not slow", "tests"], args.timeout)
      print(f"baseline (fast tier) {seconds:6.0f}s  {tail}", flush=True)
      if rc != 0:
        raise SystemExit(f"the fast tier fails unmutated ({first}): fix that first")
    for m in chosen:
      target = tree / m.path
      original = target.read_text()
      groups = test_groups(module_of(m.path))
      marker = [] if m.slow else ["-m", "not slow"]
      status, killer, seconds, ran, tail = "SURVIVED", "", 0.0, 0, ""
      tried = prior_killers(m, recorded, {f for g in groups for f in g})
      target.write_text(original.replace(m.old, m.new))
      try:
        if tried:  # a shortcut only: a test that killed a mutant before, in a file that reaches this one
          rc, seconds, first, tail = pytest_run(tree, [*marker, *tried], args.timeout)
          if rc not in (0, NO_TESTS):
            status, killer = "killed", first or f"(pytest exit {rc}: {tail})"
        for group in groups if status != "killed" else ():
          rc, s, first, tail = pytest_run(tree, [*marker, *by_kills(group, recorded)], args.timeout)
          seconds += s
          ran += len(group)
          if rc not in (0, NO_TESTS):
            status, killer = "killed", first or f"(pytest exit {rc}: {tail})"
            break
      finally:
        target.write_text(original)
      if status == "killed" and killer and killer not in verified and "::" in killer:
        rc, _, _, vtail = pytest_run(tree, [killer], args.timeout)  # the killing test passes unmutated
        if rc != 0:
          raise SystemExit(f"{killer} fails on the unmutated copy too ({vtail}): the kill of {m.name!r} is void")
        verified.add(killer)
      n_files = sum(len(g) for g in groups)
      recorded[m.name] = {
        "mutant": m.name,
        "file": m.path,
        "slow_tests": m.slow,
        "status": status,
        "killed_by": killer,
        "test_files_run": ran,
        "prior_killers_tried": len(tried),
        "test_files_reaching": n_files,
        "seconds": round(seconds, 1),
        "definition": definition(m),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      }
      write_results(out, recorded, " ".join(sys.argv))
      print(f"{status:9s} {seconds:6.0f}s  {m.name}  <- {killer or tail}  ({ran}/{n_files} files)", flush=True)
  print_table(write_results(out, recorded, " ".join(sys.argv)))


if __name__ == "__main__":
  main()
