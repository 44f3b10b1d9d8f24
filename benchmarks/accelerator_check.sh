#!/usr/bin/env bash
# The one prepared run on a lent accelerator (benchmarks/RESULTS.md "#27, on a lent H200"): the paper preset's
# train step (samples/s, TFLOP/s, MFU; as 1 x 4 accumulation, without remat, as one micro-step of 4, folded) and one
# whole-volume sampler step of the paper model over a 512 x 512 x 300 CT. Each part has its own time limit
# within the budget and writes as it goes, so what finished comes back if a later part runs out of time.
#
#   OUT=DIR benchmarks/accelerator_check.sh [BUDGET_SECONDS]
#   PARTS="infer train_remat_none": some parts, in that order; PRESET=tiny SIZES=32: a quick local try
#
# Wheels in .whl/ (packages the accelerator's image lacks) are installed to /tmp/site first.
set -u
budget=${1:-540}
preset=${PRESET:-paper}
sizes=${SIZES:-512x512x300}
out=${OUT:-/tmp/accelerator_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"
} > "$out/env.txt" 2>&1

part() {  # NAME LIMIT_SECONDS COMMAND...: run it for at most LIMIT (less if the budget has less left)
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  local left=$((budget - SECONDS - 5))
  if ((left < 30)); then
    echo "$name: skipped, ${left} s of the budget left" >> "$out/summary.txt"
    return
  fi
  ((limit > left)) && limit=$left
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name: rc=$? in $((SECONDS - t0)) s (limit $limit s): $*" >> "$out/summary.txt"
}

train="python3 benchmarks/train_throughput.py --presets=$preset"
for name in ${PARTS:-train infer train_remat_none train_micro4 train_folded}; do
  case $name in
    train) part train 220 $train --steps=5 ;;
    infer) part infer 200 python3 benchmarks/sliding_window.py --checkpoint=preset:$preset --sizes=$sizes --repeats=3 ;;
    train_remat_none) part train_remat_none 150 $train --steps=5 --set=model.remat=none ;;
    train_micro4) part train_micro4 150 $train --steps=3 --set=training.grad_accum_steps=1 ;;
    train_folded) part train_folded 150 $train --steps=3 --set=model.conv_impl=folded ;;
    *) echo "unknown part $name" >> "$out/summary.txt" ;;
  esac
done
cp benchmarks/results/sliding_window.jsonl "$out/" 2>/dev/null
cat "$out/summary.txt"
