"""ControlNet: exact base output at init; one param tree {base, controlnet} whose frozen leaves stay bitwise
unchanged and have no optimizer state (optax.partition + set_to_zero), a non-default pattern training what it
names, compiled memory no larger than a separate-argument frozen base, sharded == single device, and the
fine-tuning command with branch-only checkpoints that resume bitwise."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, build_step, fixed_batch, mesh_of, model_batch, override, run_main

from meddiff_jax import checks, pretrained, sections, sharding
from meddiff_jax.models import trainable
from meddiff_jax.train import controlnet as cn_train
from meddiff_jax.train import loop
from meddiff_jax.train import state as state_lib
from meddiff_jax.train import step as step_lib


def cn_config(**kw):
  from meddiff_jax.configs import controlnet as cfg

  c = cfg.get_config("sr")
  c.training.update(batch_size=8, num_steps=3, log_every=1)
  c.data.phantom.update(num_volumes=3, shape=(32, 32, 32), spacing=(3.0, 3.0, 3.0))  # the base's grid
  c.optimizer.update(learning_rate=1e-2, warmup_steps=1)
  return checks.controlnet(override(c, **kw))  # checked and derived once, as main.py does


def build(config, mesh_sizes):
  b = build_step(config, mesh_sizes, cn_train.trainee(config))
  return b.mesh, b.rules, b.trainee, b.state, b.shardings, b.labels, b.step, b.batch_shardings


@pytest.fixture(scope="module")
def default_build():
  """build(cn_config(), {"data": 1}): initialised, and its step compiled, once for the tests that share it. The
  step donates its state: a test that runs it starts from `fresh(state)`."""
  return build(cn_config(), {"data": 1})


def fresh(st):
  return jax.tree_util.tree_map(jnp.copy, st)


def run(mesh, rules, jitted, batch_sh, st, batch, n):
  with sharding.activate(mesh, rules):
    gb = {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()}
    for _ in range(n):
      st, m = jitted(st, gb)
  return st, m


def host(tree):
  return jax.tree_util.tree_map(np.array, tree)


def n_elements(tree):
  return sum(x.size for x in jax.tree_util.tree_leaves(tree))


def test_trainable_labels_split_merge_and_typos():
  params = {"base": {"encoder": {"k": 1}, "decoder": {"k": 2}}, "controlnet": {"encoder": {"k": 3}, "zero": {"k": 4}}}
  labels = trainable.labels(params, ["controlnet/.*", "base/decoder/.*"])
  assert labels == {
    "base": {"encoder": {"k": "frozen"}, "decoder": {"k": "trainable"}},
    "controlnet": {"encoder": {"k": "trainable"}, "zero": {"k": "trainable"}},
  }
  trained, frozen = trainable.split(params, labels)
  assert frozen == {"base": {"encoder": {"k": 1}}} and trainable.merge(trained, frozen) == params
  with pytest.raises(ValueError, match="match no parameter"):
    trainable.labels(params, ["controlnet/.*", "base/decodr/.*"])
  with pytest.raises(ValueError, match="match no parameter"):
    trainable.labels(params, ["controlnet"])  # a whole-path match: a prefix alone is a typo, not a subtree
  # a pattern that names a whole path does not also train the paths it is a prefix of
  scale = {"base": {"norm": {"scale": 1, "scale_shift": 2}}}
  assert trainable.labels(scale, ["base/norm/scale"]) == {
    "base": {"norm": {"scale": "trainable", "scale_shift": "frozen"}}
  }


def test_partition_optimizer_freezes_exactly_the_frozen_leaves():
  """optax.partition + set_to_zero (not optax.masked alone): frozen leaves get no update and no moments."""
  cfg = cn_config().optimizer
  params = {"base": {"w": jnp.full((3,), -0.0), "v": jnp.arange(4.0)}, "controlnet": {"w": jnp.ones((5,))}}
  labels = trainable.labels(params, ["controlnet/.*"])
  tx = state_lib.make_optimizer(cfg, labels)
  opt = tx.init(params)
  assert n_elements(opt) == 2 * 5 + 2  # mu, nu of controlnet/w + two step counts (Adam, lr schedule)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  for _ in range(3):
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
  assert np.all(np.asarray(params["controlnet"]["w"]) != 1.0)
  np.testing.assert_array_equal(np.asarray(params["base"]["v"]), np.arange(4.0))
  assert not trainable.has_frozen(trainable.labels(params, [".*"]))


def test_itstime_fires_periodically_at_the_end_and_when_stopping():
  fired = [s for s in range(1, 11) if loop.itstime(s, 4, 10)]
  assert fired == [4, 8, 10]
  assert loop.itstime(5, 4, 10, stopping=True) and not loop.itstime(5, 4, 10)
  assert not any(loop.itstime(s, 0, 10, stopping=True) for s in range(1, 11))  # every=0: off


def test_loading_and_tasks_import_nothing_from_train():
  code = (
    "import sys; import meddiff_jax.pretrained, meddiff_jax.tasks.controlled, meddiff_jax.tasks.denoise, "
    "meddiff_jax.tasks.anomaly, meddiff_jax.tasks.synthesis, meddiff_jax.tasks.common; "
    "bad = sorted(m for m in sys.modules if m.startswith('meddiff_jax.train')); assert not bad, bad"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_zero_convs_make_the_combined_model_equal_the_base_at_init(default_build):
  config = cn_config()
  mesh, rules, trainee, st, _, _, _, _ = default_build
  pre = pretrained.load(config.base_checkpoint)
  batch = model_batch(config)
  cond = {k: jnp.asarray(batch[k]) for k in ("pos_box", "region", "structures", "hint")}
  x, t = jnp.asarray(batch["image"]), jnp.arange(8) * 120
  with sharding.activate(mesh, rules):
    combined = jax.jit(lambda p: trainee.apply_fn({"params": p}, x, t, cond))(st.params)
    base = jax.jit(lambda bp: pre.model.apply({"params": bp}, x, t, cond))(pre.params)
  np.testing.assert_array_equal(np.asarray(combined), np.asarray(base))
  # the base in the tree is the pretrained model, and the trainable copy is its encoder
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), st.params["base"], pre.params
  )
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
    st.params["controlnet"]["encoder"],
    pre.params["encoder"],
  )


@pytest.mark.slow
def test_base_is_frozen_and_has_no_optimizer_state(default_build):
  config = cn_config()
  mesh, rules, _, st, _, _, jitted, batch_sh = default_build
  st = fresh(st)
  before = host(st.params)
  st, m = run(mesh, rules, jitted, batch_sh, st, fixed_batch(config), 3)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), st.params["base"], before["base"]
  )
  changed = jax.tree_util.tree_map(
    lambda a, b: bool(np.any(np.asarray(a) != b)), st.params["controlnet"], before["controlnet"]
  )
  assert any(jax.tree_util.tree_leaves(changed))
  assert float(m["finite"]) == 1.0
  n_branch = n_elements(st.params["controlnet"])
  n_opt = sum(x.size for x in jax.tree_util.tree_leaves(st.opt_state) if x.ndim)
  assert n_opt == 2 * n_branch  # Adam mu + nu of the branch only
  assert set(st.ema_params) == {"controlnet"}  # no EMA copy of the frozen base either


@pytest.mark.slow
def test_a_non_default_pattern_trains_what_it_names():
  config = cn_config(**{"optimizer.trainable": ("controlnet/.*", "base/decoder/.*")})
  mesh, rules, _, st, _, labels, jitted, batch_sh = build(config, {"data": 1})
  before = host(st.params)
  st, _ = run(mesh, rules, jitted, batch_sh, st, fixed_batch(config), 3)
  changed = lambda part: [
    bool(np.any(np.asarray(a) != b))
    for a, b in zip(jax.tree_util.tree_leaves(st.params["base"][part]), jax.tree_util.tree_leaves(before["base"][part]))
  ]
  assert np.mean(changed("decoder")) > 0.9  # the named base decoder trains (a zero-gradient leaf may not move)
  assert not any(changed("encoder"))  # the rest of the base stays bitwise frozen
  for part in set(st.params["base"]) - {"decoder"}:
    assert not any(changed(part)), part
  n_trained = n_elements(st.params["controlnet"]) + n_elements(st.params["base"]["decoder"])
  assert sum(x.size for x in jax.tree_util.tree_leaves(st.opt_state) if x.ndim) == 2 * n_trained
  assert set(st.ema_params["base"]) == {"decoder"}


def separate_argument_step(config, trainee, st, shardings, batch_sh, mesh, rules):
  """The previous mechanism, as reference: the branch state donated, the base a separate non-donated,
  non-differentiated jit argument, and an optimizer over the branch only."""
  tx = state_lib.make_optimizer(config.optimizer)
  branch = lambda s: s.replace(params=s.params["controlnet"], ema_params=s.ema_params["controlnet"])
  branch_sh = branch(shardings).replace(opt_state=None)
  with sharding.activate(mesh, rules):
    branch_st = branch(st).replace(opt_state=tx.init(st.params["controlnet"]))
    opt_sh = jax.tree_util.tree_map(lambda x: x.sharding, branch_st.opt_state)
  branch_sh = branch_sh.replace(opt_state=opt_sh)

  def step(state, batch, base):
    apply = lambda v, *a, **k: trainee.apply_fn({"params": {"base": base, "controlnet": v["params"]}}, *a, **k)
    fn = step_lib.make_train_step(apply, trainee.schedule, tx, config, rules)
    return fn(state, batch)

  jitted = jax.jit(
    step,
    in_shardings=(branch_sh, batch_sh, shardings.params["base"]),
    out_shardings=(branch_sh, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
  return jitted, branch_st


def total_bytes(compiled):
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


@pytest.mark.slow
def test_compiled_step_memory_is_no_larger_than_a_separate_frozen_argument(default_build):
  config = cn_config()
  mesh, rules, trainee, st, shardings, _, jitted, batch_sh = default_build
  ref_jitted, branch_st = separate_argument_step(config, trainee, st, shardings, batch_sh, mesh, rules)
  with sharding.activate(mesh, rules):
    gb = {k: jax.device_put(v, batch_sh[k]) for k, v in fixed_batch(config).items()}
    ours = total_bytes(jitted.lower(st, gb).compile())
    ref = total_bytes(ref_jitted.lower(branch_st, gb, st.params["base"]).compile())
  print(f"compiled step memory: partition {ours} B, separate argument {ref} B")
  assert ours <= ref


@pytest.mark.slow
def test_logged_flops_per_step_match_xla_cost_analysis_of_the_compiled_step(tmp_path):
  """MFU's numerator for a ControlNet step: base forward + base decoder activation gradients + 3 x branch.
  The loop logs it beside XLA's count of the step it compiled. XLA counts only conv taps that read real
  voxels (no padding) and counts softmax, so the analytic forward is off by a few % on a 16^3 patch; the
  forward pass's own analytic/XLA ratio calibrates that out. Measured (batch 8, 16^3): XLA step 13.63
  GFLOP; forward base 3.02 + branch 2.92; the old base-only 3 x forward (9.4) is 31% low, leaving out the
  decoder's activation gradients 9% low, counting base weight gradients too (17.2 by XLA) 26% high."""
  config = cn_config(
    **{"training.num_steps": 1, "eval.every_steps": 0, "eval.sample_every_steps": 0, "checkpoint.every_steps": 0}
  )
  trainee = cn_train.trainee(config)
  last = loop.train_and_evaluate(config, str(tmp_path), trainee)
  logged, xla_step = last["flops_per_step"], last["xla_flops_per_step"]
  rows = metrics_rows(tmp_path)
  assert rows[-1]["flops_per_step"] == logged

  pre = pretrained.load(config.base_checkpoint)
  model = pretrained.build_controlled(config.controlnet, pre.spec)
  patch, batch = config.data.patch_size, config.training.batch_size
  x, t, cond = pretrained.dummy_inputs(pre.spec, patch, batch)
  cond["hint"] = jnp.zeros(x.shape, jnp.float32)
  abstract = pretrained._abstract(pretrained.controlled_init_fn(model, patch), pre.params)
  cost = jax.jit(lambda p: model.apply({"params": p}, x, t, cond)).lower(abstract).compile().cost_analysis()
  xla_forward = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  from meddiff_jax.models import controlnet as cn_model
  from meddiff_jax.models import unet3d

  analytic_forward = unet3d.forward_flops(pre.spec, (patch,) * 3, batch) + cn_model.branch_forward_flops(
    pre.spec, tuple(config.controlnet.hint_hidden), (patch,) * 3, batch
  )
  assert logged == pytest.approx(xla_step * analytic_forward / xla_forward, rel=0.03)


@pytest.mark.slow
def test_sharded_controlnet_step_matches_single_device(default_build):
  config = cn_config()
  batch = fixed_batch(config)
  out = []
  for mesh_sizes in ({"data": 1}, {"data": 4, "fsdp": 2}):
    built = default_build if mesh_sizes == {"data": 1} else build(config, mesh_sizes)
    mesh, rules, _, st, _, _, jitted, batch_sh = built
    st = fresh(st)
    with sharding.activate(mesh, rules):
      gb = {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()}
      st, m1 = jitted(st, gb)
      st, m2 = jitted(st, gb)
    out.append((float(m1["loss"]), float(m2["loss"]), jax.tree_util.tree_map(np.asarray, st.params)))
  np.testing.assert_allclose(out[1][:2], out[0][:2], rtol=1e-5)
  # Adam's first steps move every leaf by ~lr * g / |g|: on leaves whose gradient is near Adam's eps (the zero
  # convs' neighbours) a reduction-order difference in g changes the step by up to ~1% of lr (7e-5 measured at
  # lr 1e-2); a wrong sharding would move them by O(lr).
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4), out[1][2], out[0][2])


CN_ARGS = [
  "--config=configs/controlnet.py:lesion",
  "--config.training.log_every=1",
  "--config.data.phantom.shape=(32,32,32)",
  "--config.data.phantom.num_volumes=3",
  "--config.training.batch_size=2",
  "--config.checkpoint.every_steps=2",
  "--config.eval.every_steps=0",
  "--config.eval.sample_every_steps=0",
]


def metrics_rows(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_finetune_command_saves_only_the_branch_and_resumes_bitwise(tmp_path):
  from meddiff_jax import checkpoint

  resumed, straight = tmp_path / "resumed", tmp_path / "straight"
  proc = run_main(*CN_ARGS, f"--workdir={resumed}", "--config.training.num_steps=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  meta = json.loads((resumed / "checkpoints" / "2" / "config" / "metadata").read_text())
  assert meta["base_checkpoint"] == "tiny_phantom" and meta["model"]["base_channels"] == 8  # derived once
  saved = checkpoint.Checkpointer(str(resumed / "checkpoints")).manager.item_metadata(2)["state"]
  assert set(saved["params"]) == {"controlnet"} and set(saved["ema_params"]) == {"controlnet"}  # no base copy
  proc = run_main(*CN_ARGS, f"--workdir={resumed}", "--config.training.num_steps=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from step 2" in proc.stdout  # our progress lines go to stdout
  assert [r["step"] for r in metrics_rows(resumed)] == [1, 2, 3]
  proc = run_main(*CN_ARGS, f"--workdir={straight}", "--config.training.num_steps=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses = lambda w: [r["loss"] for r in metrics_rows(w)]
  assert losses(resumed) == losses(straight)  # bitwise (float repr): the base reloaded, the branch restored


@pytest.mark.slow
def test_export_command_and_loading_a_workdir_read_only_the_ema_params(tmp_path):
  from meddiff_jax import checkpoint
  from meddiff_jax.configs import pretrain

  config = pretrain.get_config("tiny")
  typed = checks.pretrain(config, num_devices=1)
  mesh = mesh_of({"data": 1})
  st, _, _, _ = loop.init_state(typed, loop.pretraining(typed), mesh, sharding.DEFAULT_RULES)
  st = st.replace(ema_params=jax.tree_util.tree_map(lambda p: p + 1.0, st.ema_params))  # EMA != params
  ck = checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints"))
  ck.save(4, st, None, config)
  ck.close()
  loaded = pretrained.load(str(tmp_path / "run"))
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded.params, st.ema_params
  )
  out = tmp_path / "exported"
  proc = run_main("--config=configs/export.py", f"--config.source={tmp_path / 'run'}", f"--config.output={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  exported = pretrained.load(str(out))
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), exported.params, st.ema_params
  )
  assert exported.config.to_dict() == loaded.config.to_dict()
  proc = run_main("--config=configs/export.py", f"--config.source={tmp_path / 'run'}", f"--config.output={out}")
  assert proc.returncode != 0 and "not empty" in proc.stderr  # never overwrites without being asked


def test_branch_configs_inherit_the_bases_grid_and_structures_and_refuse_another():
  """data.spacing, structures, structure_groups, class_map and pack_structures are the base checkpoint's ('base'):
  tiny_phantom was trained on 3 mm phantoms with grouped, packed structures. A conflicting value is refused in
  one line naming the key; the base's own value is accepted; a data source at another spacing is refused."""
  base = pretrained.read_config("tiny_phantom")
  derived = cn_config()
  assert derived.data.spacing == (3.0, 3.0, 3.0) == derived.data.training_spacing()
  assert derived.data.structures == "grouped" and derived.data.class_map == ""
  assert derived.data.structure_groups == sections.frozen(base.data.structure_groups)
  assert derived.data.pack_structures == base.data.pack_structures
  assert cn_config(**{"data.spacing": (3, 3, 3)}).data.spacing == (3.0, 3.0, 3.0)  # the base's own: fine
  for key, value in (
    ("data.spacing", (1.0, 1.0, 1.0)),
    ("data.structures", "classes"),
    ("data.structure_groups", (("lung", ("lung_*",)),)),
    ("data.class_map", "/some/map.json"),
    ("data.pack_structures", not base.data.pack_structures),
  ):
    with pytest.raises(checks.ConfigError, match=f"config.{key}=") as e:
      cn_config(**{key: value})
    assert "\n" not in str(e.value) and "tiny_phantom" in str(e.value)
  with pytest.raises(checks.ConfigError, match=r"config.data.phantom.spacing is \(6.0, 6.0, 6.0\) mm"):
    cn_config(**{"data.phantom.spacing": (6.0, 6.0, 6.0)})


@pytest.mark.slow
def test_super_resolution_and_lesion_commands(tmp_path):
  from scipy import ndimage

  from meddiff_jax.data import nifti, phantom, preprocess, volume_io, volumes
  from meddiff_jax.evaluation import metrics

  work = tmp_path / "cn"
  proc = run_main(
    "--config=configs/controlnet.py:lesion",
    f"--workdir={work}",
    "--config.training.num_steps=1",
    "--config.data.phantom.shape=(32,32,32)",
    "--config.data.phantom.num_volumes=3",
    "--config.training.batch_size=2",
    "--config.eval.every_steps=0",
    "--config.eval.sample_every_steps=0",
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  p = phantom.make_phantom((24, 24, 20), (6.0, 6.0, 6.0), "abdomen", seed=3, num_lesions=1)
  nifti.save(volumes.Volume(np.round(p.hu), p.affine), tmp_path / "ct.nii.gz", np.int16)
  nifti.save(volumes.Volume(p.lesions, p.affine), tmp_path / "lesion.nii.gz", np.uint8)
  for method in ("inpaint", "generate"):
    out = tmp_path / f"{method}.nii.gz"
    proc = run_main(
      "--config=configs/lesion.py",
      f"--config.controlnet={work}",
      f"--config.input={tmp_path / 'ct.nii.gz'}",
      f"--config.mask={tmp_path / 'lesion.nii.gz'}",
      f"--config.output={out}",
      f"--config.method={method}",
      "--config.num_steps=3",
      "--config.jump_timesteps=200",
      "--config.jump_n_sample=2",
      "--config.region=abdomen",  # (a small phantom: too little anatomy to estimate it from)
      timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / f"{method}.json").read_text())
    vol = volume_io.load(out)
    np.testing.assert_allclose(vol.affine, p.affine, atol=1e-4)
    from meddiff_jax.tasks import controlled

    lesion, ct = p.lesions > 0, np.round(p.hu)
    # the sidecar's numbers are those of the written volume
    assert res["dice_threshold_segmentation"] == pytest.approx(controlled.lesion_dice(vol.data, ct, lesion, 20.0))
    unit = lambda v: preprocess.hu_to_unit(v, "abdomen")
    assert res["psnr_outside_mask"] == pytest.approx(metrics.psnr(unit(ct[~lesion]), unit(vol.data[~lesion]), 2.0))
    if method == "inpaint":  # the scan as read outside the lesion and its one-voxel rim
      rim = ndimage.binary_dilation(lesion, iterations=2)
      np.testing.assert_array_equal(vol.data[~rim], ct[~rim])
    else:
      assert np.mean(np.abs(vol.data - ct)) > 1.0  # a whole new window, not the scan passed through
  # super-resolution: a x3 thick-slice input, reference = the thin original
  thin = volumes.Volume(np.round(p.hu), p.affine)
  nifti.save(thin, tmp_path / "hr.nii.gz", np.int16)
  lr = volumes.resample(thin, (6.0, 6.0, 18.0), order=1)
  nifti.save(lr, tmp_path / "lr.nii.gz", np.int16)
  proc = run_main(
    "--config=configs/super_resolution.py",
    f"--config.controlnet={work}",
    f"--config.input={tmp_path / 'lr.nii.gz'}",
    f"--config.output={tmp_path / 'sr.nii.gz'}",
    f"--config.reference={tmp_path / 'hr.nii.gz'}",
    "--config.spacing=(6.0,6.0,6.0)",
    "--config.num_steps=3",
    "--config.region=chest",  # (the window the scores below are computed in)
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "sr.json").read_text())
  sr, ref = volume_io.load(tmp_path / "sr.nii.gz"), volume_io.load(tmp_path / "hr.nii.gz")
  np.testing.assert_allclose(sr.spacing, (6.0, 6.0, 6.0), atol=1e-4)  # the thin grid asked for
  sl = tuple(slice(0, min(a, b)) for a, b in zip(ref.shape, sr.shape))
  unit = lambda v: preprocess.hu_to_unit(v[sl], "chest")
  # the sidecar's numbers are those of the written volume and of trilinear interpolation of the input
  assert res["metrics"]["controlnet"]["psnr"] == pytest.approx(
    metrics.psnr(unit(ref.data), unit(sr.data), 2.0), abs=0.05
  )
  linear = volumes.resample(volume_io.load(tmp_path / "lr.nii.gz"), (6.0, 6.0, 6.0), order=1, fill=-1024.0).data
  assert res["metrics"]["trilinear"]["psnr"] == pytest.approx(metrics.psnr(unit(ref.data), unit(linear), 2.0))
