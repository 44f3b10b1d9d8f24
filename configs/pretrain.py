"""Pretraining the MedDiff-FM backbone.

Presets (`--config=pretrain:PRESET`):
  tiny   CPU / CI smoke runs: 16^3 patches of small phantoms, an 8-channel UNet, float32.
  base   one GPU: 64^3 patches, 32-channel 4-level UNet, bfloat16 compute.
  paper  MedDiff-FM's hyper-parameters: 128^3 patches at 1 mm, base 32, mult (1,2,4,8), 1 res block per
         level, attention at level 3 (16^3), cosine schedule, eps target, L1 loss, Adam 1e-4, effective batch
         4 = 1 sample x 4 accumulation steps. Every device shares that one sample along depth
         (mesh.spatial=-1), so it runs unchanged on 1, 2, 4 or 8 devices.
         Needs prepared data: --config.data.source=prepared --config.data.prepared_dir=DIR.
  paper256  the paper model on 256^3 windows, each sample split over 8 devices along depth (mesh.spatial=8).
Append `+classes` (e.g. `--config=pretrain:paper+classes`) for the paper's structure conditioning: all 117
TotalSegmentator classes + body as one label-id channel with a learned 8-wide embedding, instead of the
default grouped one-hot channels (data.structure_groups). A 118-channel one-hot would be 0.99 GB (float32)
per 128^3 sample; the label map is 2 MiB and its embedding 8 channels.
Override anything with --config.KEY=VALUE; unknown keys are an error.
Check a plan before paying for a slice: --config.dry_run=True compiles the step for the devices present
and prints params, FLOPs, memory per device and the projected step time (train/dry_run.py);
--config.dry_run_topology=v5p:4x4x4 compiles it for that TPU slice instead, on any host with libtpu.
"""

from __future__ import annotations

import ml_collections

from meddiff_jax import sections
from meddiff_jax.data import preprocess

NUM_STRUCTURE_CHANNELS = len(preprocess.DEFAULT_STRUCTURE_GROUPS) + 1  # groups + body mask


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset, *options = (arg or "tiny").split("+")
  if preset not in ("tiny", "base", "paper", "paper256"):
    raise ValueError(f"unknown preset {preset!r}; choose tiny, base, paper or paper256")
  if set(options) - {"classes"}:
    raise ValueError(f"unknown preset option(s) {sorted(set(options) - {'classes'})}; the only one is +classes")
  c = ml_collections.ConfigDict()
  c.mode = "train"
  c.preset = preset
  c.seed = 0
  c.dry_run = False  # compile the train step on synthetic inputs, print one JSON line of cost, exit
  # a TPU slice by name (v5p:4x4x4, v5e:2x4, ...: any jax.experimental.topologies name): the dry run compiles for
  # it with the TPU compiler (libtpu, the test extra) on any host, adding HBM fit and a roofline step time
  c.dry_run_topology = ""

  c.model = ml_collections.ConfigDict(
    dict(
      out_channels=1,
      base_channels=32,
      channel_mult=(1, 2, 4, 8),
      num_res_blocks=1,
      attention_levels=(3,),  # 0 = full resolution; 3 = 16^3 at a 128^3 patch
      mid_attention=True,
      num_head_channels=32,
      dropout=0.0,
      norm_groups=8,
      time_embed_mult=4,
      use_position=True,
      pos_num_freqs=8,
      pos_include_input=True,
      use_region=True,
      num_regions=len(preprocess.REGIONS),
      structure_channels=NUM_STRUCTURE_CHANNELS,
      structure_embed_dim=0,  # >0: structures are one label-id channel, embedded (data.structures=classes)
      num_structure_ids=0,  # classes mode: 117 TotalSegmentator classes + background + body = 119
      dtype="bfloat16",
      param_dtype="float32",
      remat="none",  # none | full | dots | dots_no_batch | offload: per whole encoder/decoder level
      # auto (depth_taps on CPU, folded on TPU) | xla | depth_taps (3^3 conv as 2D conv + depth sum; RESULTS #15)
      # | folded (W voxels folded into channels up to 128 lanes at the narrow levels: same params; RESULTS #27)
      conv_impl="auto",
      attention_impl="auto",  # auto (flash on TPU) | xla | flash (Pallas TPU flash attention; RESULTS #27)
    )
  )

  c.diffusion = ml_collections.ConfigDict(
    dict(
      schedule="cosine",
      num_timesteps=1000,
      prediction_type="epsilon",
      loss_type="l1",
      min_snr_gamma=0.0,  # 0 disables; 5.0 is the usual choice
      cond_drop_prob=0.1,  # classifier-free-guidance dropout of region + structures
      structure_drop_prob=0.1,  # organ channels only, region kept: the condition of tasks run without labels
      body_drop_prob=0.3,  # of those, the fraction that also loses the body channel (synthesis without labels)
    )
  )

  c.data = ml_collections.ConfigDict(
    dict(
      source="phantom",  # phantom | prepared
      prepared_dir="",
      class_map="",  # optional class_map json; default: the embedded TotalSegmentator map
      patch_size=128,
      # mm the model is trained at, e.g. (1.0, 1.0, 1.0), or source: the one spacing of the source's volumes (phantom,
      # prepared records); saved with every checkpoint, where the tasks read it
      spacing=sections.keyword("source"),
      use_structures=True,
      structures="grouped",  # grouped: one-hot channels of structure_groups + body | classes: label ids
      # (channel name, TotalSegmentator class-name patterns); first match wins; order = channel order
      structure_groups=tuple(preprocess.DEFAULT_STRUCTURE_GROUPS.items()),
      # grouped: batches carry one uint8 channel per voxel, (group << 1) | body, and the train / eval step expands
      # it to the K + 1 one-hot channels on the accelerator (equal bitwise; 1/13 of the host's bytes and CPU)
      pack_structures=True,
      # samples ship HU (int16 steps of 1/8 HU on the sample's grid) and uint8 label codes; the jitted step windows
      # the HU, thresholds the body, looks up the structure groups and packs them on the accelerator (data/decode.py).
      # False: the host finishes every sample (data/multilevel.py, the reference)
      decode_on_device=True,
      # zoom2's 2P^3 window ships as read (int16) and the accelerator resizes it: less host CPU per sample, but
      # every sample then carries the window (48 MB instead of 6 at P=128), which costs more to batch and copy to
      # the devices than the resize it saves (benchmarks/RESULTS.md "#24")
      resize_on_device=False,
      operation_probs=(1 / 3, 1 / 3, 1 / 3),  # whole, zoom2, patch
      # Grain worker processes, read threads (per worker) and batches read ahead: 'auto' sizes them from the cores
      # this process may use, the processes on its host, a bucket's latency and memory (data/workers.py; printed
      # at start-up with the samples/s to expect)
      num_threads=sections.keyword("auto"),
      prefetch=sections.keyword("auto"),
      worker_count=sections.keyword("auto"),
      # numpy asks the kernel for transparent huge pages for its arrays of >= 4 MB (NUMPY_MADVISE_HUGEPAGE); in the
      # processes that make batches that made stacking and copying a batch 3-5x dearer after zarr reads (every
      # batch is fresh memory), so it is off there; True: numpy's default (benchmarks/RESULTS.md "#24")
      numpy_huge_pages=False,
      val_fraction=0.1,  # stores without recorded splits (phantoms): every k-th volume validates
      # ControlNet fine-tuning only (configs/controlnet.py): the condition volume each sample carries
      hint="",  # '' (none) | lowres (thick slices of the image) | lesion (the lesion mask)
      sr_factor=5,  # lowres: native slices averaged into one thick slice (when no real low-res partner)
      positive_fraction=0.0,  # crops centred on a lesion voxel with this probability (lesion fine-tuning)
      phantom=ml_collections.ConfigDict(
        dict(num_volumes=24, shape=(192, 192, 192), spacing=(1.5, 1.5, 1.5), seed=0, num_lesions=0)
      ),  # lesions per phantom (lesion fine-tuning)
    )
  )

  c.optimizer = ml_collections.ConfigDict(
    dict(
      learning_rate=1e-4,
      schedule="constant",  # constant | cosine
      warmup_steps=500,
      decay_steps=200_000,
      end_lr_factor=0.01,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      grad_clip_norm=1.0,
      trainable=(".*",),  # regexes over param paths ('encoder/conv_in/kernel'); the rest is frozen
    )
  )

  c.training = ml_collections.ConfigDict(
    dict(
      batch_size=4,  # global samples per optimizer step, all micro-batches together
      # micro-batch = batch_size / grad_accum_steps, split over mesh data x fsdp; 'auto': one sample per
      # data x fsdp shard and micro-step (sharding.resolve_plan)
      grad_accum_steps=sections.keyword(1),
      num_steps=200_000,
      ema_decay=0.9999,
      log_every=100,
      max_consecutive_nan=10,
      profile_steps=0,  # >0: jax.profiler trace of that many steps into WORKDIR
    )
  )

  c.eval = ml_collections.ConfigDict(
    dict(
      every_steps=5000,  # validation loss per timestep bucket on held-out volumes (0: off)
      num_batches=4,
      num_buckets=4,
      sample_every_steps=5000,  # preview montage (TensorBoard + WORKDIR/samples/*.png) (0: off)
      sample_steps=50,  # DDIM steps of the preview sampler
    )
  )

  c.restore = True  # resume from the newest checkpoint in WORKDIR/checkpoints that restores
  c.checkpoint = ml_collections.ConfigDict(
    dict(
      every_steps=1000,
      keep=3,
      asynchronous=True,
      # WORKDIR/checkpoints holds steps and none restores into this run (another model, corrupt), or restore=False:
      # fail (a one-line error naming the newest step and why) | start_fresh (move them aside, start at step 0)
      on_unrestorable="fail",
    )
  )
  # jax's persistent compilation cache (a restarted job loads its compiled steps instead of compiling again):
  # auto = WORKDIR/compilation_cache on accelerators, off on CPU | '' = off | a directory or gs:// URL
  c.compilation_cache_dir = "auto"

  # Devices per axis (one may be -1: the rest). spatial: devices that share one sample along depth. data 'auto':
  # as many devices as can each take whole samples of the batch (gcd), the -1 axis the rest (sharding.resolve_plan).
  c.mesh = ml_collections.ConfigDict(dict(data=sections.keyword(-1), fsdp=1, spatial=1, tensor=1))
  c.sharding = ml_collections.ConfigDict(
    dict(
      rules=sections.keyword("default"),  # default: sharding.py DEFAULT_RULES; else ((logical, mesh_axes), ...)
      min_shard_size=2**14,  # params with fewer elements stay replicated
    )
  )

  if preset == "tiny":
    c.model.update(
      base_channels=8, channel_mult=(1, 2), attention_levels=(1,), num_head_channels=8, pos_num_freqs=2, dtype="float32"
    )
    c.data.update(patch_size=16)
    c.data.phantom.update(num_volumes=6, shape=(48, 48, 48), spacing=(6.0, 6.0, 6.0))
    c.optimizer.update(learning_rate=2e-3, warmup_steps=5, schedule="constant")
    c.training.update(batch_size=2, num_steps=20, ema_decay=0.99, log_every=5)
    c.eval.update(every_steps=10, num_batches=1, sample_every_steps=20, sample_steps=10)
    c.checkpoint.update(every_steps=10)
    c.sharding.min_shard_size = 0
  elif preset == "base":
    c.model.update(base_channels=32, channel_mult=(1, 2, 4, 4), attention_levels=(2, 3), pos_num_freqs=6)
    c.data.update(patch_size=64)
    c.data.phantom.update(shape=(128, 128, 128), spacing=(2.5, 2.5, 2.5))
    c.optimizer.update(learning_rate=1e-4, schedule="cosine", warmup_steps=1000, decay_steps=100_000)
    c.training.update(batch_size=8, num_steps=100_000)
  else:  # paper, paper256
    c.data.update(source="prepared", patch_size=128)
    # dots: keep conv outputs, recompute norms and activations (#27: the TPU step's fewest bytes and FLOPs)
    c.model.update(remat="dots")
    c.optimizer.update(learning_rate=1e-4, schedule="constant", warmup_steps=0, grad_clip_norm=0.0)
    # ~150 epochs of 0.9 * 5376 volumes at an effective batch of 4.
    c.training.update(batch_size=4, grad_accum_steps="auto", num_steps=181_000)
    # Samples whole on up to 4 devices (no accumulation on 4: data=4), split along depth over the rest
    # (8 devices: data=4 x spatial=2); one device: the paper's batch 1 x 4 accumulation.
    c.mesh.update(data="auto", spatial=-1)
    if preset == "paper256":  # same architecture: attention_levels keep the paper model's weights usable
      c.data.update(patch_size=256)
      c.mesh.update(data=-1, spatial=8)
  if "classes" in options:
    from meddiff_jax.data import class_map

    c.data.structures = "classes"
    c.model.update(structure_channels=1, structure_embed_dim=8, num_structure_ids=max(class_map.TOTAL) + 2)
  return c
