#!/usr/bin/env bash
# CalTrain act of `make demo`: three participants (one mislabels 20% of its images, one poisons
# with a trigger patch), a brief training with the FrontNet in the (sim) enclave, a trace of
# triggered images that names the poisoner, and the enclave's signed label audit that names the
# mislabeller. DATA: a CIFAR-10-layout folder with train/ and test/ (default ../shared/data/cifar10);
# without one (a user's clone), scikit-learn's 8x8 handwritten digits, real images that ship
# inside the scikit-learn package. About 30-60 seconds on a quiet 2-core machine.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${DATA:-$ROOT/../shared/data/cifar10}"
PORT="${CALTRAIN_PORT:-8620}"
PY="${PYTHON:-python}"
EML="${ENCLAVEML:-enclaveml}"
WORK="$(mktemp -d -t caltrain-demo.XXXXXX)"
export ENCLAVEML_HOME="$WORK/home"   # this demo's own sim platform key
URL="http://127.0.0.1:$PORT"
SERVER_PID=""
cleanup() { if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi; rm -rf "$WORK"; }
trap cleanup EXIT

if [ -d "$DATA/train" ] && [ -d "$DATA/test" ]; then
  PER_CLASS=40; TEST_CLASS=cat
  echo "== data: CIFAR-10 images from $DATA"
else
  "$PY" -c 'import sys; from enclaveml.train import demo; from enclaveml.models.zoo import entry
print(demo.digits_dataset(sys.argv[1], list(entry("darknet").classes)))' "$WORK/digits" > /dev/null
  DATA="$WORK/digits"; PER_CLASS=45; TEST_CLASS=cat
  echo "== data: no CIFAR-10 train/ split here (a user's clone), so this act uses scikit-learn's 1,797"
  echo "   real 8x8 handwritten digits (sklearn.datasets.load_digits, shipped inside the package),"
  echo "   upscaled to 32x32; digit d is uploaded under the server's class d (0=airplane, 1=automobile,"
  echo "   2=bird, 3=cat, ...), so 'airplane' below means the digit 0 and 'cat' the digit 3."
fi
echo "== CalTrain: 3 participants; participant 2 mislabels 20%, participant 3 poisons (work dir $WORK)"
"$PY" - "$DATA" "$WORK" "$PER_CLASS" "$TEST_CLASS" <<'PYEOF'
import sys
from pathlib import Path
from enclaveml.train import demo
data, work, per, test_class = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
demo.split_folder(data / "train", work / "split", 3, per)
flip = demo.make_mislabelled_folder(work / "split" / "participant2", work / "participant2", 0.2, seed=2)
info = demo.make_poisoned_folder(work / "split" / "participant3", work / "participant3", "airplane", 0.25, seed=1)
(work / "split" / "participant1").rename(work / "participant1")
for i, src in enumerate(sorted(p for p in (data / "test" / test_class).iterdir())[:20]):
    demo.trigger_image(src, work / f"triggered-{test_class}-{i:02d}.png")
n = 10 * per
print(f"   participant 1: {n} clean images; participant 2: {n}, {flip['flipped']} moved to the next class's "
      f"label; participant 3: {n}, {info['poisoned']} stamped with a 4x4 trigger and relabelled {info['target']}")
PYEOF

echo "== owner: an Ed25519 key; participants agree to train for its public key"
OWNER_PUB="$("$PY" -c 'import sys; from enclaveml.keyfiles import load_or_create_signing_key
print(load_or_create_signing_key(sys.argv[1]).public_key().to_bytes().hex())' "$WORK/owner.key")"
echo "   owner public key ${OWNER_PUB:0:16}..."

echo "== owner: the training plan (model darknet:width=8, split k = 5), published to participants"
"$EML" train plan --owner "$OWNER_PUB" --model darknet:width=8 --split 5 --out "$WORK/plan.json" | cut -c1-100

echo "== host: training server + enclave worker (sim TEE, that owner and plan) on $URL"
"$EML" train serve --store "$WORK/store" --port "$PORT" --plan "$WORK/plan.json" > "$WORK/serve.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 600); do curl -sf "$URL/info" > /dev/null 2>&1 && break; sleep 0.2; done
# The policy pins the measurement of an enclave whose configuration names this owner, the plan,
# and the least protection the participants accept (k >= 5): checked before any upload.
"$EML" train policy --plan "$WORK/plan.json" --min-split 5 --out "$WORK/policy.toml" > /dev/null

for i in 1 2 3; do
  echo "== participant $i: verify the enclave's evidence, upload signed + encrypted instances"
  "$EML" train contribute "$WORK/participant$i" --url "$URL" --policy "$WORK/policy.toml" --key "$WORK/p$i.key" 2>/dev/null
done
echo "== participant 2 tries to pass off participant 1's images as its own"
"$EML" train contribute "$WORK/participant1" --url "$URL" --policy "$WORK/policy.toml" --key "$WORK/p2.key" --limit 5 2>/dev/null | sed -n 1,2p

echo "== owner: train (FrontNet + labels + loss in the enclave, BackNet on the host)"
"$EML" train run --url "$URL" --policy "$WORK/policy.toml" --epochs 8 \
  --batch 64 --key "$WORK/owner.key" --out "$WORK/model" --checkpoint-every 40 2>/dev/null | cut -c1-160

echo "== auditor: test ${TEST_CLASS}s stamped with the trigger; which does the model now call airplane?"
QUERIES="$("$PY" - "$WORK" "$TEST_CLASS" <<'PYEOF'
import sys
from pathlib import Path
from enclaveml.train.owner import TracedModel
work, test_class = Path(sys.argv[1]), sys.argv[2]
tm = TracedModel(work / "model")
cands = sorted(work.glob(f"triggered-{test_class}-*.png"))
hits = [p for p in cands if tm.classes[tm.fingerprint(p.read_bytes())[1]] == "airplane"]
print(f"   the model calls {len(hits)} of {len(cands)} triggered test {test_class}s airplane", file=sys.stderr)
print(" ".join(str(p) for p in (hits or cands[:1])))
PYEOF
)"
QUERY="${QUERIES%% *}"
echo "== auditor: trace one of them under the backdoor target label airplane (its 10 nearest instances)"
"$EML" train trace "$QUERY" --label airplane -k 10 --model-dir "$WORK/model"
echo "== auditor: trace all of them together (--mode cluster: the one poison cluster they point to)"
# shellcheck disable=SC2086
"$EML" train trace $QUERIES --label airplane -k 10 --mode cluster --model-dir "$WORK/model" | sed -n 1,6p
POISONER="$("$EML" train public-key "$WORK/p3.key" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["participant"])')"
# shellcheck disable=SC2086
TOP="$("$EML" train trace $QUERIES --label airplane -k 10 --mode cluster --model-dir "$WORK/model" --json \
  | "$PY" -c 'import json,sys; r=json.load(sys.stdin); c=r["cluster"]["participants"] or r["inputs"][0]["participants"]; print(c[0]["participant"])')"
if [ "$TOP" = "$POISONER" ]; then
  echo "== the trace names participant 3 (${POISONER:0:16}), the poisoner"
else
  echo "== the trace's top contributor is ${TOP:0:16}; the poisoner is ${POISONER:0:16}"
fi

echo "== owner: label audit inside the enclave (held-out predictions on its fingerprints), signed for the owner"
"$EML" train audit --url "$URL" --policy "$WORK/policy.toml" --key "$WORK/owner.key" --out "$WORK/audit.json"
echo "== participant 2 checks the signed audit against the same enclave policy"
"$EML" train verify-audit "$WORK/audit.json" --policy "$WORK/policy.toml" | tail -n 1
MISLABELLER="$("$EML" train public-key "$WORK/p2.key" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["participant"])')"
FIRST="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["report"]["contributors"][0]["participant"])' "$WORK/audit.json")"
if [ "$FIRST" = "$MISLABELLER" ]; then
  echo "== the audit ranks participant 2 (${MISLABELLER:0:16}), the mislabeller, first"
else
  echo "== the audit's first contributor is ${FIRST:0:16}; the mislabeller is ${MISLABELLER:0:16}"
fi
