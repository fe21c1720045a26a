#!/bin/sh
# The example script alone, then under `stalwart run` (3 workers, 2 servers) with the
# BatchNorm statistics averaged by the servers and kept local, one run per seed (the
# seed draws each worker's share of the data). Prints each run's final test accuracy.
#   sh examples/compare.sh [EPOCHS] [SEEDS...]      (defaults: 12 epochs, seeds 0 1 2)
set -e
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EPOCHS=${1:-12}
[ $# -gt 0 ] && shift
SEEDS=${*:-0 1 2}
OUT=${OUT:-runs/compare}
echo "alone: $($PY examples/train_digits.py --epochs "$EPOCHS" | tail -1)"
for buffers in average local; do
  for seed in $SEEDS; do
    rm -rf "$OUT/digits-$buffers-s$seed"
    .venv/bin/stalwart run --workers 3 --servers 2 --seed "$seed" --buffers "$buffers" --quiet \
        --out "$OUT" --name "digits-$buffers-s$seed" \
        -- "$PY" examples/train_digits_stalwart.py --epochs "$EPOCHS" > /dev/null
    $PY -c "import json,sys; s=json.load(open(sys.argv[1])); print('stalwart run, buffers $buffers, seed $seed:', 'final accuracy %.3f' % s['final_accuracy'], 'wall %.1f s' % s['wall_s'])" "$OUT/digits-$buffers-s$seed/summary.json"
  done
done
