"""Compiled ControlNet train-step memory (XLA memory_analysis): one {base, controlnet} tree with the base
frozen by optax.partition labels vs the previous mechanism (the base as a separate, non-donated jit argument).

PYTHONPATH=. python benchmarks/controlnet_memory.py   # the tiny test config of tests/test_controlnet.py
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import conftest  # noqa: E402,F401  (8 CPU devices, as in the tests)
import jax  # noqa: E402
import test_controlnet as t  # noqa: E402  (the test's config, builder and reference step)

from meddiff_jax import sharding  # noqa: E402


def breakdown(compiled):
  m = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
  out = {f.split("_size")[0]: getattr(m, f) for f in fields}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def main():
  config = t.cn_config(**dict(a.split("=", 1) for a in sys.argv[1:]))
  mesh, rules, trainee, st, shardings, _, jitted, batch_sh = t.build(config, {"data": 1})
  ref_jitted, branch_st = t.separate_argument_step(config, trainee, st, shardings, batch_sh, mesh, rules)
  with sharding.activate(mesh, rules):
    gb = {k: jax.device_put(v, batch_sh) for k, v in t.a_batch(config).items()}
    ours = breakdown(jitted.lower(st, gb).compile())
    ref = breakdown(ref_jitted.lower(branch_st, gb, st.params["base"]).compile())
  print(f"base params {t.n_elements(st.params['base']):,}, branch params {t.n_elements(st.params['controlnet']):,}")
  for name, row in (("separate argument", ref), ("partition", ours)):
    print(f"{name:18s} " + "  ".join(f"{k} {v:,}" for k, v in row.items()))


if __name__ == "__main__":
  main()
