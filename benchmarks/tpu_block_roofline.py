"""The TPU compiler's bytes / FLOPs / optimal_seconds of ONE block's forward + backward at the paper's
shapes, on v5p:2x2x1 with depth split 4 ways (as the paper step runs): the plain formulation (repeat + conv;
concat + ResBlock) against the one in models/unet3d.py. A few minutes per block where the whole paper step
takes 30-70 min to compile on a shared 2-core host, so a change can be judged before the full measurement.

  ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu python benchmarks/tpu_block_roofline.py BLOCK

BLOCK: old_up / new_up (up1_upsample: repeat + conv vs the sub-pixel conv), old_res / new_res (up0_res0 on
concat(h, skip) vs on the parts (h, skip), both with the fused norm), plain_res0 / new_res0 (down0_res0 with
flax's GroupNorm + SiLU + scale-shift vs the fused norm_act), fold2_res0 / fold4_res0 (down0_res0 on W folded
into channels by 2 / 4: models/fold.py, conv_impl='folded').
--data: the *_res0 blocks with each chip holding one whole sample (batch 4) instead of a quarter of one.
--remat: the block as one rematerialised segment (forward, then forward again + backward), as the paper step
runs each level with model.remat='full'.
--ops N: also print the N ops that move the most bytes, and the bytes per op kind.
"""

import dataclasses
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from meddiff_jax import config_files  # noqa: E402
from meddiff_jax.models import fold, unet3d  # noqa: E402
from meddiff_jax.train import tpu_compile  # noqa: E402

devs = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
mesh = jax.sharding.Mesh(np.array(devs).reshape(4), ("spatial",))
spec = dataclasses.replace(
  unet3d.UNetSpec.from_config(config_files.load("configs/pretrain.py:paper").model), conv_impl="xla", remat="none"
)
which = sys.argv[1]  # then --ops N: list the N top ops


class OldUp(nn.Module):
  @nn.compact
  def __call__(self, x):
    for a in (1, 2, 3):
      x = jnp.repeat(x, 2, axis=a)
    return unet3d.conv3d(x.shape[-1], 3, spec, name="conv")(x)


class OldRes(nn.Module):  # concat then the block
  @nn.compact
  def __call__(self, h, s, emb):
    return unet3d.ResBlock(spec, 32, name="b")(jnp.concatenate([h, s], -1), emb)


class NewRes(nn.Module):
  @nn.compact
  def __call__(self, h, s, emb):
    return unet3d.ResBlock(spec, 32, name="b")((h, s), emb)


class PlainRes0(nn.Module):
  """down0_res0 as first written: flax nn.GroupNorm in float32 -> SiLU -> conv, scale-shift, ... (the
  reference of tests/test_fused_blocks.py)."""

  @nn.compact
  def __call__(self, x, emb):
    def norm(name, h):
      return nn.GroupNorm(num_groups=8, epsilon=1e-5, dtype=jnp.float32, name=name)(h.astype(jnp.float32))

    h = unet3d.conv3d(32, 3, spec, name="conv1")(nn.silu(norm("norm1", x)).astype(jnp.bfloat16))
    scale, shift = jnp.split(nn.Dense(64, dtype=jnp.bfloat16)(nn.silu(emb))[:, None, None, None], 2, axis=-1)
    h = norm("norm2", h).astype(jnp.bfloat16) * (1 + scale) + shift
    return x + unet3d.conv3d(32, 3, spec, name="conv2")(nn.silu(h))


class NewRes0(nn.Module):
  @nn.compact
  def __call__(self, x, emb):
    return unet3d.ResBlock(spec, 32, name="b")(x, emb)


class FoldRes0(nn.Module):
  """down0_res0 as the model runs it on the folded layout (models/fold.py): W sub-positions in channels."""

  f: int

  @nn.compact
  def __call__(self, x, emb):
    return unet3d.ResBlock(spec, 32, layout=fold.Layout(self.f, (32,)), name="b")(x, emb)


# --data: the 4 chips take one whole sample each (batch 4 over the mesh) instead of sharing one along depth
DATA = "--data" in sys.argv
sh = NamedSharding(mesh, P("spatial") if DATA else P(None, "spatial"))
rep = NamedSharding(mesh, P())
if which in ("old_up", "new_up"):
  m = OldUp() if which == "old_up" else unet3d.Upsample(spec)
  args = (jax.ShapeDtypeStruct((1, 64, 64, 64, 64), jnp.bfloat16, sharding=sh),)
  out = (1, 128, 128, 128, 64)
elif which in ("plain_res0", "new_res0"):
  m = PlainRes0() if which == "plain_res0" else NewRes0()
  n = 4 if DATA else 1
  args = (
    jax.ShapeDtypeStruct((n, 128, 128, 128, 32), jnp.bfloat16, sharding=sh),
    jax.ShapeDtypeStruct((n, 128), jnp.bfloat16, sharding=sh if DATA else rep),
  )
  out = (n, 128, 128, 128, 32)
elif which.startswith("fold"):  # fold2_res0, fold4_res0
  f = int(which[4])
  m = FoldRes0(f)
  n = 4 if DATA else 1
  args = (
    jax.ShapeDtypeStruct((n, 128, 128, 128 // f, 32 * f), jnp.bfloat16, sharding=sh),
    jax.ShapeDtypeStruct((n, 128), jnp.bfloat16, sharding=sh if DATA else rep),
  )
  out = (n, 128, 128, 128 // f, 32 * f)
else:
  m = OldRes() if which == "old_res" else NewRes()
  args = (
    jax.ShapeDtypeStruct((1, 128, 128, 128, 64), jnp.bfloat16, sharding=sh),
    jax.ShapeDtypeStruct((1, 128, 128, 128, 32), jnp.bfloat16, sharding=sh),
    jax.ShapeDtypeStruct((1, 128), jnp.bfloat16, sharding=rep),
  )
  out = (1, 128, 128, 128, 32)
params = jax.eval_shape(lambda *a: m.init(jax.random.key(0), *a), *args)["params"]
params = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=rep), nn.meta.unbox(params))
dy = jax.ShapeDtypeStruct(out, jnp.bfloat16, sharding=sh)


REMAT = "--remat" in sys.argv  # the block as one rematerialised segment, as the paper step (remat full) runs it


def f(p, dy, *a):  # the block's backward for a bf16 cotangent, as in the step
  block = lambda p, x: m.apply({"params": p}, x, *a[1:])
  y, vjp = jax.vjp(jax.checkpoint(block) if REMAT else block, p, a[0])
  return (y, vjp(dy)) if REMAT else vjp(dy)  # the output too: else the first forward is dead code


f = jax.jit(f)
t0 = time.time()
c = f.lower(params, dy, *args).compile()
cost = c.cost_analysis()
cost = cost[0] if isinstance(cost, list) else cost
print(
  json.dumps(
    {
      "block": which,
      "GB": round(cost["bytes accessed"] / 1e9, 3),
      "TFLOP": round(cost["flops"] / 1e12, 4),
      # XLA's estimate; negative (not given) for the folded blocks
      "optimal_ms": round(cost["optimal_seconds"] * 1e3, 3) if cost.get("optimal_seconds", 0) > 0 else None,
      "compile_s": round(time.time() - t0),
    }
  )
)
if "--ops" in sys.argv:  # the ops that move the most bytes, and bytes by op kind
  ops = tpu_compile.hlo_ops(c.as_text())
  for o in sorted(ops, key=lambda o: -o["bytes"])[: int(sys.argv[sys.argv.index("--ops") + 1])]:
    print(f"  {o['bytes'] / 1e9:7.3f} GB  {o['kind']:22s} {o['shape'][:80]:80s} {o['op_name'][-60:]}")
  print({k: round(v / 1e9, 2) for k, v in tpu_compile.by_key(ops, lambda o: o["kind"]).items()})
