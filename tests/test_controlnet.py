"""ControlNet: exact base output at init, frozen base bitwise unchanged, no optimizer state for the base,
sharded step == single-device step, fine-tuning command with branch-only checkpoints."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, override
from meddiff_jax.data import pipeline
from meddiff_jax.models import controlnet
from meddiff_jax.train import controlnet as cn_train
from meddiff_jax.train import sharding
from meddiff_jax.train import state as state_lib
from meddiff_jax.train import step as step_lib


def cn_config(**kw):
  from configs import controlnet as cfg
  c = cfg.get_config("sr")
  c.training.update(batch_size=8, num_steps=3, log_every=1)
  c.data.phantom.update(num_volumes=3, shape=(32, 32, 32), spacing=(9.0, 9.0, 9.0))
  c.optimizer.update(learning_rate=1e-2, warmup_steps=1)
  return override(c, **kw)


def build(config, mesh_sizes):
  mesh = sharding.make_mesh(mesh_sizes, jax.devices()[: int(np.prod(list(mesh_sizes.values())))])
  rules = sharding.rules_from_config(())
  pre, branch, st, shardings, base_params, base_sh = cn_train.setup(config, mesh, rules)
  with config.unlocked():
    config.model, config.diffusion = pre.config.model, pre.config.diffusion
    config.data.patch_size = pre.patch_size
  tx = state_lib.make_optimizer(config.optimizer)
  fn = step_lib.make_train_step(cn_train.make_apply_fn(pre.model, branch), pre.schedule, tx,
                                state_lib.learning_rate_schedule(config.optimizer), config, rules)
  batch_sh = pipeline.batch_sharding(mesh, sharding.batch_axes(rules))
  jitted = step_lib.jit_train_step(fn, shardings, batch_sh, mesh, {"base": base_sh})
  return mesh, rules, pre, branch, st, base_params, jitted, batch_sh


def a_batch(config):
  ds = pipeline.make_dataset(pipeline.make_store(config.data), config.data, batch_size=config.training.batch_size,
                             seed=0)
  batch = next(iter(ds))
  batch.pop("operation")
  return batch


def test_zero_convs_make_the_combined_model_equal_the_base_at_init():
  config = cn_config()
  mesh, rules, pre, branch, st, base_params, _, _ = build(config, {"data": 1})
  batch = a_batch(config)
  cond = {k: jnp.asarray(batch[k]) for k in ("pos_box", "region", "structures", "hint")}
  x, t = jnp.asarray(batch["image"]), jnp.arange(8) * 120
  with sharding.activate(mesh, rules):
    combined = jax.jit(lambda bp, cp: controlnet.controlled_apply(pre.model, branch, bp, cp, x, t, cond, cond["hint"]))(
        base_params, st.params)
    base = jax.jit(lambda bp: pre.model.apply({"params": bp}, x, t, cond))(base_params)
  np.testing.assert_array_equal(np.asarray(combined), np.asarray(base))
  # the trainable copy is the pretrained encoder
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                         st.params["encoder"], base_params["encoder"])


def test_base_is_frozen_and_has_no_optimizer_state():
  config = cn_config()
  mesh, rules, pre, branch, st, base_params, jitted, batch_sh = build(config, {"data": 1})
  before = jax.tree_util.tree_map(np.array, base_params)
  branch_before = jax.tree_util.tree_map(np.array, st.params)
  batch = a_batch(config)
  with sharding.activate(mesh, rules):
    gb = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
    for _ in range(3):
      st, m = jitted(st, gb, {"base": base_params})
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), base_params, before)
  changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != b)), st.params, branch_before)
  assert any(jax.tree_util.tree_leaves(changed))
  assert float(m["finite"]) == 1.0
  n_branch = sum(x.size for x in jax.tree_util.tree_leaves(st.params))
  n_opt = sum(x.size for x in jax.tree_util.tree_leaves(st.opt_state) if x.ndim)
  assert n_opt == 2 * n_branch  # Adam mu + nu of the branch only


def test_sharded_controlnet_step_matches_single_device():
  config = cn_config()
  batch = a_batch(config)
  out = []
  for mesh_sizes in ({"data": 1}, {"data": 4, "fsdp": 2}):
    mesh, rules, pre, branch, st, base_params, jitted, batch_sh = build(cn_config(), mesh_sizes)
    with sharding.activate(mesh, rules):
      gb = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
      st, m1 = jitted(st, gb, {"base": base_params})
      st, m2 = jitted(st, gb, {"base": base_params})
    out.append((float(m1["loss"]), float(m2["loss"]), jax.tree_util.tree_map(np.asarray, st.params)))
  np.testing.assert_allclose(out[1][:2], out[0][:2], rtol=1e-5)
  # Adam's first steps move every leaf by ~lr * g / |g|: on leaves whose gradient is near Adam's eps (the zero
  # convs' neighbours) a reduction-order difference in g changes the step by up to ~1% of lr (7e-5 measured at
  # lr 1e-2); a wrong sharding would move them by O(lr).
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4), out[1][2], out[0][2])


def test_finetune_command_saves_only_the_branch_and_resumes(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  args = [sys.executable, "-m", "meddiff_jax.main", "--config=configs/controlnet.py:lesion", f"--workdir={tmp_path}",
          "--config.training.log_every=1", "--config.data.phantom.shape=(32,32,32)",
          "--config.data.phantom.num_volumes=3", "--config.training.batch_size=2", "--config.checkpoint.every_steps=2"]
  proc = subprocess.run(args + ["--config.training.num_steps=2"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  meta = json.loads((tmp_path / "checkpoints" / "2" / "config" / "metadata").read_text())
  assert meta["base_checkpoint"] == "tiny_phantom"
  proc = subprocess.run(args + ["--config.training.num_steps=3"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed ControlNet branch from step 2" in proc.stdout  # our progress lines go to stdout
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3]


def test_repaint_keeps_the_known_region_and_fills_the_hole_with_an_oracle():
  from meddiff_jax.diffusion import schedules, samplers
  from meddiff_jax.tasks import controlled

  sched = schedules.make_schedule("cosine", 1000)
  x0 = jnp.linspace(-0.5, 0.5, 8 ** 3).reshape(1, 8, 8, 8, 1)
  keep = jnp.ones_like(x0).at[:, 2:5, 2:5, 2:5].set(0.0)

  def oracle(x, t):
    abar = schedules.alpha_bar(sched, t, x.ndim)
    return (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)

  known = jnp.where(keep > 0, x0, 0.9)  # the hole holds garbage
  ts = samplers.make_timesteps(1000, 20, "trailing")
  out = jax.jit(lambda r: controlled.repaint(oracle, sched, ts, r, known, keep, 5, 2))(jax.random.key(0))
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=2e-3)


def test_super_resolution_and_lesion_commands(tmp_path):
  from meddiff_jax.data import multilevel, nifti, phantom

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  work = tmp_path / "cn"
  base = [sys.executable, "-m", "meddiff_jax.main"]
  proc = subprocess.run(base + ["--config=configs/controlnet.py:lesion", f"--workdir={work}",
                                "--config.training.num_steps=1", "--config.data.phantom.shape=(32,32,32)",
                                "--config.data.phantom.num_volumes=3", "--config.training.batch_size=2"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  p = phantom.make_phantom((24, 24, 20), (6.0, 6.0, 6.0), "abdomen", seed=3, num_lesions=1)
  nifti.save(nifti.Volume(np.round(p.hu), p.affine), tmp_path / "ct.nii.gz", np.int16)
  nifti.save(nifti.Volume(p.lesions, p.affine), tmp_path / "lesion.nii.gz", np.uint8)
  for method in ("inpaint", "generate"):
    out = tmp_path / f"{method}.nii.gz"
    proc = subprocess.run(base + ["--config=configs/lesion.py", f"--config.controlnet={work}",
                                  f"--config.input={tmp_path / 'ct.nii.gz'}", f"--config.mask={tmp_path / 'lesion.nii.gz'}",
                                  f"--config.output={out}", f"--config.method={method}", "--config.num_steps=3",
                                  "--config.jump_length=1", "--config.jump_n_sample=2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / f"{method}.json").read_text())
    assert 0.0 <= res["dice_threshold_segmentation"] <= 1.0 and res["psnr_outside_mask"] > 0
    vol = nifti.load(out)
    np.testing.assert_allclose(vol.affine, p.affine, atol=1e-4)
  # super-resolution: a x3 thick-slice input, reference = the thin original
  thin = nifti.Volume(np.round(p.hu), p.affine)
  nifti.save(thin, tmp_path / "hr.nii.gz", np.int16)
  lr = nifti.resample(thin, (6.0, 6.0, 18.0), order=1)
  nifti.save(lr, tmp_path / "lr.nii.gz", np.int16)
  proc = subprocess.run(base + ["--config=configs/super_resolution.py", f"--config.controlnet={work}",
                                f"--config.input={tmp_path / 'lr.nii.gz'}", f"--config.output={tmp_path / 'sr.nii.gz'}",
                                f"--config.reference={tmp_path / 'hr.nii.gz'}", "--config.spacing=(6.0,6.0,6.0)",
                                "--config.num_steps=3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "sr.json").read_text())
  assert set(res["metrics"]) == {"controlnet", "trilinear", "cubic"}
