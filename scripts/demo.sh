#!/usr/bin/env bash
# `make demo`: the whole story on the embedded defaults (simulated TEE, SQLite, CIFAR-10).
#   Act 1  the owner assesses where the darknet zoo model can be split        (scripts/demo_assess.sh)
#   Act 2  partition, sim-TEE server, deploy, encrypted inference              (scripts/demo_serve.sh)
#   Act 3  CalTrain: three participants, one poisoning; trace names the poisoner (scripts/demo_caltrain.sh)
# Everything it writes goes under out/demo/. The `enclaveml` CLI must be on PATH (the Makefile does it).
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-$PWD/out/demo}
export ENCLAVEML_HOME=${ENCLAVEML_HOME:-$OUT/home}
mkdir -p "$OUT"

if [ -z "${DATA:-}" ]; then
  if [ -d ../shared/data/cifar10/train ]; then
    DATA=$(cd ../shared/data/cifar10 && pwd)
    echo "== data: CIFAR-10 from $DATA"
  else
    DATA=$(python -c 'from enclaveml.data.packaged import packaged_imagefolder; print(packaged_imagefolder("foolbox-cifar10"))')
    echo "== data: ../shared/data/cifar10 is not here (a user's clone), so this demo uses the 20 real"
    echo "   CIFAR-10 test images that ship inside the foolbox package: $DATA"
    echo "   Figures from so few images are illustrations, not measurements."
  fi
fi
export DATA
export ASSESSMENT="$OUT/assess/assessment.json"

for act in assess serve caltrain; do
  script="scripts/demo_$act.sh"
  if [ "$act" = caltrain ] && [ ! -d "$DATA/train" ]; then
    echo
    echo "(skipping caltrain: training three participants needs a CIFAR-10 train/ split, and the"
    echo " images packaged with pip are too few; run DATA=/path/to/cifar10 make demo for that act)"
    continue
  fi
  if [ -f "$script" ]; then
    echo
    echo "================ enclaveml demo: $act ================"
    bash "$script"
  else
    echo "(skipping $act: $script is not in this checkout)"
  fi
done
echo
echo "Demo finished. Outputs are under $OUT."
