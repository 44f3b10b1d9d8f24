"""Test setup: 8 fake CPU devices for every sharding test, and the one place for shared test helpers: tiny
configs, exact denoisers (oracles), float64 DDPM posterior tables, the command line as a user runs it, meshes,
batches and prepare configs."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import functools  # noqa: E402
import pathlib  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
  """The tiny preset shrunk further: 8^3 patches of 24^3 phantoms (XLA:CPU 3D convs are slow); the ConfigDict,
  as a config file gives it (`tiny` types it)."""
  from meddiff_jax.configs import pretrain

  c = pretrain.get_config("tiny")
  c.data.patch_size = 8
  c.data.phantom.update(num_volumes=3, shape=(24, 24, 24), spacing=(12.0, 12.0, 12.0))
  c.model.update(base_channels=8, channel_mult=(1, 2), attention_levels=(1,))
  c.training.update(batch_size=8, num_steps=3, log_every=1)
  return override(c, **overrides)


def tiny(**overrides):
  """`tiny_config(**overrides)` typed (train/spec.PretrainConfig: every section checked, as checks.pretrain does
  without the devices present: tests build their own meshes)."""
  from meddiff_jax.train.spec import PretrainConfig

  return PretrainConfig.from_config(tiny_config(**overrides))


def unet_spec(**overrides):
  """A UNetSpec for model-level tests: configs/pretrain.py:paper's model without structure channels, float32, no
  remat, with `overrides` (e.g. base_channels=8, channel_mult=(1, 2), attention_levels=(1,))."""
  import dataclasses

  from meddiff_jax.configs import pretrain
  from meddiff_jax.models import unet3d

  paper = unet3d.UNetSpec.from_config(pretrain.get_config("paper").model)
  return dataclasses.replace(
    paper, **{"structure_channels": 0, "dtype": jnp.dtype("float32"), "remat": "none", **overrides}
  )


def override(config, **dotted):
  """Set nested config keys given as 'a.b.c': value (what --config.a.b.c=value does)."""
  for key, value in dotted.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def data_dir() -> pathlib.Path | None:
  """../shared/data (or $MEDDIFF_TEST_DATA); skip, or fail under MEDDIFF_REQUIRE_DATA=1, when absent."""
  path = pathlib.Path(os.environ.get("MEDDIFF_TEST_DATA", REPO.parent / "shared" / "data"))
  if (path / "example_ct.nii.gz").exists():
    return path
  if os.environ.get("MEDDIFF_REQUIRE_DATA") == "1":
    pytest.fail(f"MEDDIFF_REQUIRE_DATA=1 but no example_ct.nii.gz under {path}")
  pytest.skip(f"real CT data not found under {path}")


@pytest.fixture
def real_data_dir():
  return data_dir()


def chest_over_abdomen(data: pathlib.Path):
  """A scan that spans regions, from the real CT: example_ct's abdomen (3 mm) with the CTA crop's chest (lungs)
  above it, resampled to 3 mm and set in soft tissue to the same in-plane size (a volumes.Volume)."""
  from meddiff_jax.data import volume_io, volumes

  abdomen = volume_io.load(data / "example_ct.nii.gz")
  chest = volumes.resample(volume_io.load(data / "aorta_ct_cropped_lps.nii.gz"), (3.0, 3.0, 3.0))
  top = np.full(abdomen.shape[:2] + (chest.shape[2],), 40.0, np.float32)
  x0, y0 = (abdomen.shape[0] - chest.shape[0]) // 2, (abdomen.shape[1] - chest.shape[1]) // 2
  top[x0 : x0 + chest.shape[0], y0 : y0 + chest.shape[1]] = chest.data
  return volumes.Volume(np.concatenate([abdomen.data, top], axis=2), abdomen.affine, "chest_over_abdomen.nii.gz")


# ------------------------------------------------------------------------------------------ the command line


def run_main(*args, timeout: int = 900, cwd=REPO) -> subprocess.CompletedProcess:
  """`python -m meddiff_jax.main ARGS` as a user runs it: one real CPU device (no fake-device XLA_FLAGS), this
  checkout's package, output captured."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
  )
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
    [sys.executable, "-m", "meddiff_jax.main", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
  )


# ------------------------------------------------------------------------------------------ object storage


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
  """gs://bucket served by a local emulator; yields an fsspec gcs filesystem on it.

  The emulator omits the object generation header on media downloads, which real GCS sends and
  TensorStore needs for OCDBT's conditional manifest commits (a multi-array Orbax save); the fixture adds
  it for the emulator's lifetime.
  """
  from gcp_storage_emulator.handlers import objects
  from gcp_storage_emulator.server import create_server

  download = objects.download

  def download_with_generation(request, response, storage_, *args, **kwargs):
    download(request, response, storage_, *args, **kwargs)
    try:
      obj = storage_.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the original handler already answered 404
      return
    response["x-goog-generation"] = str(obj["generation"])

  objects.download = download_with_generation
  port = free_port()
  url = f"http://localhost:{port}"
  env = {
    "STORAGE_EMULATOR_HOST": url,  # gcsfs
    "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore's gcs kvstore driver
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "offline",  # TensorStore: no credential lookup
    "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }  # gcsfs: no gRPC bucket-type probe (the emulator is HTTP)
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  server = create_server("localhost", port, in_memory=True, default_bucket="bucket")
  server.start()
  import fsspec

  fsspec.AbstractFileSystem.clear_instance_cache()
  try:
    yield fsspec.filesystem("gs")
  finally:
    server.stop()
    objects.download = download
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    fsspec.AbstractFileSystem.clear_instance_cache()


# ------------------------------------------------------------------------------------------ meshes, batches, configs


def mesh_of(sizes: dict):
  """A mesh of exactly prod(sizes) of the (fake) devices."""
  from meddiff_jax import sharding

  return sharding.make_mesh(sizes, jax.devices()[: int(np.prod(list(sizes.values())))])


def build_step(config, mesh_sizes: dict, trainee=None) -> types.SimpleNamespace:
  """The training setup as train/loop.py builds it (default trainee: pretraining) for a typed `config` (`tiny`),
  on `mesh_of(mesh_sizes)`: mesh, rules, trainee, state, shardings, labels, step (jitted, state donated),
  batch_shardings (per key)."""
  from meddiff_jax import sharding
  from meddiff_jax.train import loop
  from meddiff_jax.train import step as step_lib

  mesh = mesh_of(mesh_sizes)
  rules = config.sharding.logical_rules
  trainee = trainee or loop.pretraining(config)
  state, shardings, labels, tx = loop.init_state(config, trainee, mesh, rules)
  fn = step_lib.make_train_step(trainee.apply_fn, trainee.schedule, tx, config, rules, labels)
  batch_shardings = sharding.input_shardings(mesh, rules, step_lib.batch_spec(config))
  return types.SimpleNamespace(
    mesh=mesh,
    rules=rules,
    trainee=trainee,
    state=state,
    shardings=shardings,
    labels=labels,
    step=step_lib.jit_train_step(fn, shardings, batch_shardings, mesh, labels),
    batch_shardings=batch_shardings,
  )


def fixed_batch(config, seed: int = 0) -> dict:
  """The first training batch of a typed config's data (numpy), the keys the step takes (train/step.batch_spec:
  without the host-side 'operation' tag of finished samples; shipped ones decode by it)."""
  from meddiff_jax.data import pipeline
  from meddiff_jax.train import step as step_lib

  ds = pipeline.make_dataset(
    pipeline.make_store(config.data), config.data, batch_size=config.training.batch_size, seed=seed
  )
  keys = step_lib.batch_spec(config)
  return {k: v for k, v in next(iter(ds)).items() if k in keys}


def model_batch(config, seed: int = 0) -> dict:
  """`fixed_batch` as the model receives it: decoded on the device when samples ship the store's values
  (data.decode_on_device: train/step.decode_inputs), else as shipped."""
  from meddiff_jax.train import step as step_lib

  batch = {k: jnp.asarray(v) for k, v in fixed_batch(config, seed).items()}
  return {k: np.asarray(v) for k, v in step_lib.decode_inputs(config)(batch).items()}


def sample_spec(patch: int, **kw):
  """data/multilevel.SampleSpec of side `patch`: no structures, uniform operations, no hint, then `kw`."""
  from meddiff_jax.data import multilevel

  base = dict(
    lut=None,
    num_groups=0,
    operation_probs=(1 / 3, 1 / 3, 1 / 3),
    hint="",
    sr_factor=5,
    structure_labels=False,
    positive_fraction=0.0,
    pack_structures=False,
    decode_on_device=False,  # the host path: the reference the device path is tested against (test_decode.py)
    resize_on_device=False,
    hu_dtype="int16",
  )
  return multilevel.SampleSpec(patch=patch, **{**base, **kw})


class MinimalStore:
  """The parts of the VolumeStore protocol (data/pipeline.py) a test store that defines `__len__` and `load`
  does not have: no low-resolution partners, no stored whole levels, no recorded splits, no records."""

  def load_lowres(self, index):
    return None

  def load_whole(self, index, size):
    return None

  @property
  def splits(self):
    return [None] * len(self)

  @property
  def records(self):
    return []


def prepare_config(input_dir, output_dir, **kw):
  """configs/prepare.py on these folders with one worker, then `kw`."""
  from meddiff_jax.configs import prepare

  c = prepare.get_config()
  c.input_dir, c.output_dir, c.workers = str(input_dir), str(output_dir), 1
  c.update(kw)
  return c


# ------------------------------------------------------------------------------------------ exact denoisers
# Test data whose posterior is known in closed form. Gaussian data x0 ~ N(mu, s^2) i.i.d. per voxel: E[x0 | x_t]
# is linear in x_t, so the "model" below is the best possible one, and for y = x0 + sigma n the best possible
# estimate of x0 is the Wiener filter with MSE s^2 sigma^2 / (s^2 + sigma^2). A task run with this oracle can be
# checked against both "better than the input" and "close to the optimum"; a pass-through denoiser fails the
# second. A point mass x0 has the exact eps (x_t - sqrt(abar) x0) / sqrt(1 - abar): every sampler must land on x0.


def point_mass_oracle(schedule, x0):
  """(x_t, t) -> the exact eps-prediction for the data distribution that is a point mass at x0."""
  from meddiff_jax.diffusion import schedules

  def fn(x, t):
    abar = schedules.alpha_bar(schedule, t, x.ndim)
    return (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)

  return fn


def gaussian_posterior_mean(schedule, x, t, mu: float, s: float):
  from meddiff_jax.diffusion import schedules

  a = schedules.alpha_bar(schedule, t, x.ndim)
  return mu + s**2 * jnp.sqrt(a) / (a * s**2 + 1.0 - a) * (x - jnp.sqrt(a) * mu)


def gaussian_oracle(schedule, mu: float, s: float, prediction_type: str = "epsilon"):
  """(x_t, t) -> the exact model output for i.i.d. N(mu, s^2) data."""
  from meddiff_jax.diffusion import schedules

  def fn(x, t):
    x0 = gaussian_posterior_mean(schedule, x, t, mu, s)
    a = schedules.alpha_bar(schedule, t, x.ndim)
    one_minus = schedules.one_minus_alpha_bar(schedule, t, x.ndim)
    eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(one_minus)
    if prediction_type == "epsilon":
      return eps
    if prediction_type == "x0":
      return x0
    return jnp.sqrt(a) * eps - jnp.sqrt(one_minus) * x0  # v

  return fn


def identity_denoiser(schedule, prediction_type: str = "epsilon"):
  """A pass-through "model": claims x_t / sqrt(abar) is already clean. Task tests must fail with it."""
  from meddiff_jax.diffusion import schedules

  def fn(x, t):
    a = schedules.alpha_bar(schedule, t, x.ndim)
    if prediction_type == "x0":
      return x / jnp.sqrt(a)
    return jnp.zeros_like(x)  # eps = 0 -> x0_hat = x_t / sqrt(abar)

  return fn


def wiener_mse(s: float, sigma: float) -> float:
  return s**2 * sigma**2 / (s**2 + sigma**2)


def gaussian_problem(shape=(1, 24, 24, 24, 1), mu: float = 0.1, s: float = 0.3, sigma: float = 0.15, seed: int = 0):
  """(x0, y) with x0 ~ N(mu, s^2) and y = x0 + sigma n, float32 jax arrays."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  x0 = mu + s * jax.random.normal(k1, shape)
  return x0, x0 + sigma * jax.random.normal(k2, shape)


def mse(a, b) -> float:
  return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def ddpm_posterior_tables(betas) -> dict[str, np.ndarray]:
  """float64 per-step tables of the DDPM posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020, eq. 6-7), as ADM
  keeps them: mean = coef1 x0 + coef2 x_t, variance (0 at t=0; its log clipped like ADM)."""
  betas = np.asarray(betas, np.float64)
  alphas = 1.0 - betas
  acp = np.cumprod(alphas)
  acp_prev = np.append(1.0, acp[:-1])
  post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
  return dict(
    alphas_cumprod_prev=acp_prev,
    posterior_variance=post_var,
    posterior_log_variance_clipped=np.log(np.append(post_var[1:2], post_var[1:])),
    posterior_mean_coef1=betas * np.sqrt(acp_prev) / (1.0 - acp),
    posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
  )


# ------------------------------------------------------------------------------------------ exact models as checkpoints
# A task's run(spec) loads its model with pretrained.load / load_controlled; these stand-ins carry an exact model of the
# test data (an oracle above, in the checkpoint's parameterisation) and the stored config a task reads (patch size,
# training spacing, structures, prediction_type), so a test runs the whole task (files, grids, windows, sampler).


def exact_config(prediction_type: str = "epsilon", patch: int = 8, spacing=(6.0, 6.0, 6.0), structures: bool = False):
  """configs/pretrain.py:tiny as a checkpoint stores it: data.spacing the training spacing."""
  from meddiff_jax.configs import pretrain

  c = pretrain.get_config("tiny")
  c.data.patch_size = patch
  c.data.spacing = tuple(float(s) for s in spacing)
  c.data.use_structures = structures
  c.model.structure_channels = pretrain.NUM_STRUCTURE_CHANNELS if structures else 0
  c.diffusion.prediction_type = prediction_type
  return c


def exact_pretrained(apply, **config_kw):
  """A pretrained.Pretrained whose network is `apply(x, t, cond)` (`exact_config(**config_kw)`)."""
  from meddiff_jax import pretrained
  from meddiff_jax.data.spec import DataSpec
  from meddiff_jax.diffusion.spec import DiffusionSpec
  from meddiff_jax.models import unet3d

  config = exact_config(**config_kw)

  class Exact(pretrained.Pretrained):
    def apply_with(self, params, x, t, cond):
      return apply(x, t, cond)

  diffusion = DiffusionSpec.from_config(config.diffusion)
  return Exact(
    None,
    unet3d.UNetSpec.from_config(config.model),
    None,
    diffusion,
    DataSpec.from_config(config.data),
    diffusion.make_schedule(),
    config,
  )


def exact_controlled(apply, branch_spacing=None, **config_kw):
  """A pretrained.Controlled whose base + branch is `apply(x, t, cond)` (cond has the 'hint'); the branch run's
  training spacing `branch_spacing` (default: the base's)."""
  from meddiff_jax import pretrained

  pre = exact_pretrained(apply, **config_kw)
  config = exact_config(**config_kw)
  if branch_spacing is not None:
    config.data.spacing = tuple(float(s) for s in branch_spacing)

  class Exact(pretrained.Controlled):
    def apply_fn(self, scale: float = 1.0):
      return lambda params, x, t, cond: apply(x, t, cond)

  return Exact(pre, None, None, config)


def to_prediction(schedule, prediction_type: str, x, t, x0, eps):
  """A model output in `prediction_type` from the exact (x0, eps) pair at (x_t, t)."""
  from meddiff_jax.diffusion import schedules

  if prediction_type == "epsilon":
    return eps
  if prediction_type == "x0":
    return x0
  a = schedules.alpha_bar(schedule, t, x.ndim)
  return jnp.sqrt(a) * eps - jnp.sqrt(schedules.one_minus_alpha_bar(schedule, t, x.ndim)) * x0


def point_mass_prediction(schedule, x, t, target, prediction_type: str = "epsilon"):
  """The exact model output for data that is a point mass at `target` (broadcast like x)."""
  from meddiff_jax.diffusion import schedules

  a = schedules.alpha_bar(schedule, t, x.ndim)
  eps = (x - jnp.sqrt(a) * target) / jnp.sqrt(schedules.one_minus_alpha_bar(schedule, t, x.ndim))
  return to_prediction(schedule, prediction_type, x, t, jnp.broadcast_to(target, x.shape), eps)


# ------------------------------------------------------------------------------------------ float64 references
# Written from the papers' equations (and the authors' code where the paper leaves a choice), never from ours:
# the tests compare the implementation with these, on the cosine schedule (T = 1000) of the tasks' checkpoints.


@functools.lru_cache(maxsize=1)
def _cosine_abar64() -> np.ndarray:
  from meddiff_jax.diffusion import schedules

  return schedules.tables(schedules.make_betas("cosine", 1000))["alphas_cumprod"]


def abar64(t) -> float:
  """abar_t of the cosine schedule, float64; abar_{-1} = 1 (the clean image)."""
  return 1.0 if t < 0 else float(_cosine_abar64()[int(t)])


def gaussian_posterior_mean64(x, t, mu, s):
  """E[x0 | x_t] for x0 ~ N(mu, s^2) i.i.d. (mu may be a per-voxel array): the exact model, float64."""
  a = abar64(t)
  return mu + s**2 * np.sqrt(a) / (a * s**2 + 1 - a) * (np.asarray(x, np.float64) - np.sqrt(a) * mu)


def forward_matched_start64(y, sigma_y, t, z):
  """x_t with the marginal of q(x_t | x0) (DDPM, Ho et al. 2020 eq. 4: N(sqrt(abar) x0, (1 - abar) I)) from
  y = x0 + sigma_y n: sqrt(abar) y already carries abar sigma_y^2 of the 1 - abar, fresh noise z adds the rest."""
  a = abar64(t)
  return np.sqrt(a) * np.asarray(y, np.float64) + np.sqrt(max(0.0, 1 - a - a * sigma_y**2)) * z


def diffpir64(img_l, noise_level_img, n_steps, lambda_, model_x0, *, rho_scale=1.0, fresh_noise=False, z=None):
  """DiffPIR (Zhu et al. 2023, Algorithm 1) for the identity operator, zeta = 0 (deterministic), float64, in the
  conventions of the authors' code (yuanzhi-zhu/DiffPIR main_ddpir_*.py): images in [0, 1] with AWGN of std
  `noise_level_img`, the model on [-1, 1] (y = 2 img - 1), reduced_alpha_cumprod = sqrt(1 - abar) / sqrt(abar)
  the model-scale noise std, t_start = find_nearest(reduced_alpha_cumprod, 2 noise_level_img),
  rho_t = lambda sigma^2 / sigma_k^2 with sigma = noise_level_img, data step (mask y + rho x0) / (mask + rho) with
  mask = 1, x0 = model_x0(x, t) clipped (clip_denoised), the last step returns the data-step x0. The start has
  q(x_t | x0)'s noise (`forward_matched_start64`); all n_steps are spent uniformly in [0, t_start].
  Returns (x0, t_start, grid). rho_scale / fresh_noise (+ z): known-wrong variants."""
  acp = np.array([abar64(t) for t in range(1000)])
  reduced = np.sqrt(1 - acp) / np.sqrt(acp)
  t_start = int(np.argmin(np.abs(reduced - 2 * noise_level_img)))
  seq = np.unique(np.round(np.linspace(0, t_start, min(n_steps, t_start + 1))).astype(int))[::-1]
  y = np.asarray(img_l, np.float64) * 2 - 1
  if fresh_noise:  # the start before #14: all of q's noise added on top of y's own
    x = np.sqrt(abar64(t_start)) * y + np.sqrt(1 - abar64(t_start)) * z
  else:
    x = forward_matched_start64(y, 2 * noise_level_img, t_start, np.zeros_like(y) if z is None else z)
  x0_p = y
  for i, t in enumerate(seq):
    t_im1 = seq[i + 1] if i + 1 < len(seq) else -1
    a, ap = abar64(t), abar64(t_im1)
    x0 = np.clip(model_x0(x, t), -1, 1)
    rho = rho_scale * lambda_ * noise_level_img**2 / ((1 - a) / a)
    x0_p = (y + rho * x0) / (1 + rho)
    eps = (x - np.sqrt(a) * x0_p) / np.sqrt(1 - a)
    x = np.sqrt(ap) * x0_p + np.sqrt(1 - ap) * eps
  return x0_p, t_start, seq


def ddim64(x, seq, model_x0):
  """Deterministic DDIM (Song et al. 2021, eq. 12 with sigma = 0) from x at seq[0] down to the clean image (abar = 1
  after the last step); x0 = model_x0(x, t) clipped to [-1, 1] with eps recomputed from it (ADM)."""
  x = np.asarray(x, np.float64)
  for i, t in enumerate(seq):
    tp = seq[i + 1] if i + 1 < len(seq) else -1
    a, ap = abar64(int(t)), abar64(int(tp))
    x0 = np.clip(model_x0(x, int(t)), -1, 1)
    eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
    x = np.sqrt(ap) * x0 + np.sqrt(1 - ap) * eps
  return x


def repaint_walk(t_t: int, jump_length: int, jump_n_sample: int) -> list[int]:
  """RePaint's `get_schedule_jump_paper` (andreas128/RePaint guided_diffusion/scheduler.py) with t_T, jump length
  and resample count as arguments: grid indices from t_T - 1 down to -1, jumps included."""
  jumps = {j: jump_n_sample - 1 for j in range(0, t_t - jump_length, jump_length)}
  t, ts = t_t, []
  while t >= 1:
    t = t - 1
    ts.append(t)
    if jumps.get(t, 0) > 0:
      jumps[t] = jumps[t] - 1
      for _ in range(jump_length):
        t = t + 1
        ts.append(t)
  ts.append(-1)
  return ts
