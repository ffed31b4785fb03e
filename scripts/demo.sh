#!/usr/bin/env bash
# `make demo`: the whole story on the embedded defaults (simulated TEE, SQLite, CIFAR-10).
#   Act 1  the owner assesses where the darknet zoo model can be split        (scripts/demo_assess.sh)
#   Act 2  partition, sim-TEE server, deploy, encrypted inference              (scripts/demo_serve.sh)
#   Act 3  CalTrain: three participants, one mislabelling, one poisoning; the trace names the poisoner and
#          the enclave's signed label audit the mislabeller (scripts/demo_caltrain.sh; in a clone without
#          CIFAR-10's train/ split it runs on scikit-learn's packaged 8x8 digits)
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
