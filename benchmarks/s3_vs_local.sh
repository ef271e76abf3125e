#!/usr/bin/env bash
# `raypdm purify --purifier jpeg` on 204 small images (64x64): local disk vs a real S3 API (a moto server on
# 127.0.0.1, sharing this machine's CPUs), each run into a fresh output, alternated ROUNDS times.
# Needs the dev extra (moto[server], s3fs). Usage: benchmarks/s3_vs_local.sh [ROUNDS]   (from the repo root)
set -euo pipefail
ROUNDS=${1:-3}
PY=${PYTHON:-$(pwd)/.venv/bin/python}
BIN=$(dirname "$PY")
W=$(mktemp -d /tmp/raypdm-s3bench-XXXX)
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN/moto_server" -H 127.0.0.1 -p "$PORT" > "$W/moto.log" 2>&1 &
MOTO=$!
trap 'kill $MOTO 2>/dev/null; rm -rf "$W"' EXIT
sleep 3
export RAY_AUTH_MODE=disabled AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_ACCESS_KEY_ID=bench \
       AWS_SECRET_ACCESS_KEY=bench AWS_DEFAULT_REGION=us-east-1
"$PY" -c "import boto3; s = boto3.client('s3'); [s.create_bucket(Bucket=b) for b in ('bench-in', 'bench-out')]"
cd "$W"
"$BIN/raypdm" data make-synthetic --output data --num-identities 4 --images 17 --size 64 --seed 0 > /dev/null
"$BIN/raypdm" data make-synthetic --output s3://bench-in/data --num-identities 4 --images 17 --size 64 --seed 0 > /dev/null
run() {  # label input output
  export RAY_TMPDIR=$(mktemp -d /tmp/rp-XXXX)
  local t0=$(date +%s.%N)
  "$BIN/raypdm" purify --input "$2" --output "$3" --purifier jpeg --lpips random --no-faithfulness --no-progress \
    | grep -E "^│ jpeg" | awk -F'│' -v l="$1" -v t0="$t0" '{ "date +%s.%N" | getline t1;
        printf "%-6s stage %5.1f s  %6.2f images/s   command %5.1f s\n", l, $7, $8, t1 - t0 }'
  rm -rf "$RAY_TMPDIR"
}
for i in $(seq 1 "$ROUNDS"); do
  run local data "out-$i"
  run s3 s3://bench-in/data "s3://bench-out/out-$i"
done
