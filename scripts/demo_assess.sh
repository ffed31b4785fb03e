#!/usr/bin/env bash
# Demo: assess the Darknet-like zoo model on CIFAR-10 and write out/demo/assess/{assessment.json,report.html}.
# $DATA: an image-folder root (e.g. ../shared/data/cifar10, or the folder printed by
#   python -c "from enclaveml.data.packaged import packaged_imagefolder as p; print(p('foolbox-cifar10'))").
# A modest sample count and shorter attacks keep it to about 1-2 minutes on 2 CPU cores.
set -euo pipefail
: "${DATA:?set DATA to an image folder root}"
enclaveml assess darknet --data "$DATA" --out out/demo/assess \
  --samples "${SAMPLES:-24}" --decoder-steps "${DECODER_STEPS:-250}" --decoder-train 2000 --rmle-steps 120 "$@"
echo "report: out/demo/assess/report.html"
