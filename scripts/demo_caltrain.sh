#!/usr/bin/env bash
# CalTrain act of `make demo`: three participants (one poisoning with a trigger patch), a brief
# training with the FrontNet in the (sim) enclave, and a trace of a triggered image that names
# the poisoner. DATA: a CIFAR-10-layout folder (default ../shared/data/cifar10). About 30 seconds.
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

echo "== CalTrain: 3 participants, one of them poisons its data (work dir $WORK)"
"$PY" - "$DATA" "$WORK" <<'PYEOF'
import sys
from pathlib import Path
from enclaveml.train import demo
data, work = Path(sys.argv[1]), Path(sys.argv[2])
demo.split_folder(data / "train", work / "split", 3, 40)
info = demo.make_poisoned_folder(work / "split" / "participant3", work / "participant3", "airplane", 0.25, seed=1)
for i in (1, 2):
    (work / "split" / f"participant{i}").rename(work / f"participant{i}")
for i, src in enumerate(sorted((data / "test" / "cat").glob("*.jpg"))[:20]):
    demo.trigger_image(src, work / f"triggered-cat-{i:02d}.png")
print(f"   participants 1, 2: 400 clean images each; participant 3: 400 images, "
      f"{info['poisoned']} stamped with a 4x4 trigger and relabelled {info['target']}")
PYEOF

echo "== owner: an Ed25519 key; participants agree to train for its public key"
OWNER_PUB="$("$PY" -c 'import sys; from enclaveml.crypto import SigningKey
print(SigningKey.load_or_create(sys.argv[1]).public_key().to_bytes().hex())' "$WORK/owner.key")"
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

echo "== auditor: a test cat stamped with the trigger that the model now calls airplane"
QUERY="$("$PY" - "$WORK" <<'PYEOF'
import sys
from pathlib import Path
from enclaveml.train.owner import TracedModel
work = Path(sys.argv[1])
tm = TracedModel(work / "model")
cands = sorted(work.glob("triggered-cat-*.png"))
hits = [p for p in cands if tm.classes[tm.fingerprint(p.read_bytes())[1]] == "airplane"]
print(f"   the model calls {len(hits)} of {len(cands)} triggered test cats airplane", file=sys.stderr)
print(hits[0] if hits else cands[0])
PYEOF
)"
echo "== auditor: trace it under the backdoor target label airplane"
"$EML" train trace "$QUERY" --label airplane -k 10 --model-dir "$WORK/model"
POISONER="$("$EML" train public-key "$WORK/p3.key" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["participant"])')"
TOP="$("$EML" train trace "$QUERY" --label airplane -k 10 --model-dir "$WORK/model" --json \
  | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["participants"][0]["participant"])')"
if [ "$TOP" = "$POISONER" ]; then
  echo "== the trace names participant 3 (${POISONER:0:16}), the poisoner"
else
  echo "== the trace's top contributor is ${TOP:0:16}; the poisoner is ${POISONER:0:16}"
fi
