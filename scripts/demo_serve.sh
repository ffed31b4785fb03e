#!/usr/bin/env bash
# Demo, act 2: Infenclave. The owner partitions darknet (at the assessment's recommended point, or
# k=3 without one), writes a sim attestation policy, starts `enclaveml serve --tee sim`, deploys
# the bundle (key released to the attested enclave only), and a client sends encrypted test images
# and a photo. The server is stopped on exit, whatever happens.
#   DATA        a CIFAR-10-layout folder (DATA/test/<class>/*.jpg, or DATA/<class>/*.jpg)
#   ASSESSMENT  an assessment.json (optional; absent -> fixed k)
#   OUT         where to write (default out/demo); ENCLAVEML_HOME defaults to $OUT/home
# The `enclaveml` CLI and `python` (with enclaveml installed) must be on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA to a CIFAR-10-layout image folder}"
OUT=${OUT:-$PWD/out/demo}
export ENCLAVEML_HOME=${ENCLAVEML_HOME:-$OUT/home}
S="$OUT/serve"
rm -rf "$S" "$S.bundle.modelkey"
mkdir -p "$S"

TEST="$DATA"
[ -d "$DATA/test" ] && TEST="$DATA/test"

echo "== 1. owner: partition darknet"
untrained=()
if ! python -c 'import sys; from enclaveml.models import zoo; sys.exit(0 if zoo.entry("darknet").weights_path.exists() else 1)'; then
  echo "   (darknet has no trained weights in this checkout: using random weights, labels will be noise)"
  untrained=(--untrained)
fi
if [ -n "${ASSESSMENT:-}" ] && [ -f "$ASSESSMENT" ] && \
   python -c 'import json,sys; sys.exit(0 if isinstance(json.load(open(sys.argv[1])).get("recommended"), int) else 1)' "$ASSESSMENT"; then
  enclaveml partition darknet --assessment "$ASSESSMENT" --out "$S/bundle" "${untrained[@]}"
else
  echo "   (no usable assessment at '${ASSESSMENT:-}': splitting at a fixed k=3)"
  enclaveml partition darknet --at 3 --out "$S/bundle" "${untrained[@]}"
fi

echo "== 2. owner: write the sim attestation policy, pinning this model (owner key, bundle id, smallest k)"
enclaveml attest policy --tee sim --model "$S/bundle" --out "$S/policy.toml"

echo "== 3. cloud: start the untrusted host server and its enclave worker"
enclaveml serve --tee sim --port 0 --store "$S/store" > "$S/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill -INT $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null || true' EXIT
PORT=""
for _ in $(seq 1 300); do
  PORT=$(python - "$S/server.log" <<'EOF' 2>/dev/null || true
import json, sys
for line in open(sys.argv[1]):
    if '"event":"listening"' in line:
        print(json.loads(line)["port"]); break
EOF
)
  [ -n "$PORT" ] && break
  kill -0 $SERVER_PID 2>/dev/null || { echo "server died:"; cat "$S/server.log"; exit 1; }
  sleep 0.2
done
[ -n "$PORT" ] || { echo "server did not start"; cat "$S/server.log"; exit 1; }
URL="http://127.0.0.1:$PORT"
python -c 'import httpx,sys; print("   healthz:", httpx.get(sys.argv[1] + "/healthz").json())' "$URL"

echo "== 4. owner: verify the enclave, release the model key, upload the bundle"
enclaveml deploy "$S/bundle" --url "$URL" --policy "$S/policy.toml"

echo "== 5. client: encrypted inference on CIFAR-10 test images"
imgs=()
for cls in airplane cat ship truck; do
  f=$(ls "$TEST/$cls" 2>/dev/null | head -n 1 || true)
  [ -n "$f" ] && imgs+=("$TEST/$cls/$f")
done
[ ${#imgs[@]} -gt 0 ] || mapfile -t imgs < <(find "$TEST" \( -name '*.jpg' -o -name '*.png' \) | sort | head -n 4)
enclaveml infer "${imgs[@]}" --url "$URL" --policy "$S/policy.toml" --top-k 3

echo "== 6. client: a photo (scikit-image's chelsea the cat, PNG, resized inside the enclave)"
if python -c 'import skimage, PIL.Image, sys; PIL.Image.fromarray(skimage.data.chelsea()).save(sys.argv[1])' "$S/chelsea.png" 2>/dev/null; then
  enclaveml infer "$S/chelsea.png" --url "$URL" --policy "$S/policy.toml" --top-k 3 --json
else
  echo "   (scikit-image is not installed: skipping the photo)"
fi

echo "== 7. what the host saw: counters and a log line (no inputs, labels or keys)"
python -c 'import httpx,sys; m=httpx.get(sys.argv[1]+"/metrics", params={"format":"json"}).json(); print("   ", {c["name"]+str(c["labels"]): c["value"] for c in m["counters"] if c["name"]!="http_requests_total"})' "$URL"
grep '"route":"infer"' "$S/server.log" | tail -n 1 | sed 's/^/    /'
echo "   server log: $S/server.log   store: $S/store"
