#!/usr/bin/env bash
# Local services on 127.0.0.1 for users without AWS: an S3-compatible server (moto, server mode, in memory)
# and an MLflow tracking server (sqlite store, artifacts in s3://$SSL_BUCKET on that server).
#   bash infra/local/services.sh start|stop|status     (make services / make services-stop)
# Settings (environment): SSL_S3_PORT (9000), SSL_MLFLOW_PORT (5000), SSL_BUCKET (ssl-platform),
# VENV (.venv: moto_server, mlflow and python are taken from $VENV/bin). Pid files and logs: .services/.
# moto keeps objects in memory: they are gone after `stop` (use real S3 or MinIO for anything you keep).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
BIN="$VENV/bin"
DIR="$ROOT/.services"
S3_PORT="${SSL_S3_PORT:-9000}"
MLFLOW_PORT="${SSL_MLFLOW_PORT:-5000}"
BUCKET="${SSL_BUCKET:-ssl-platform}"
S3_URL="http://127.0.0.1:$S3_PORT"
MLFLOW_URL="http://127.0.0.1:$MLFLOW_PORT"
# Fake credentials for the local moto server only (it accepts any).
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"

alive() { [[ -f "$DIR/$1.pid" ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

wait_http() {  # wait_http URL NAME: up to 60 s
  for _ in $(seq 1 120); do
    if "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  echo "error: $2 did not answer at $1 within 60 s; see $DIR/$2.log" >&2
  return 1
}

start_one() {  # start_one NAME COMMAND...: in its own session, so that stop ends its whole process group
  local name="$1"; shift
  if alive "$name"; then echo "$name already running (pid $(cat "$DIR/$name.pid"))"; return 0; fi
  setsid "$@" >"$DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$DIR/$name.pid"
}

start() {
  mkdir -p "$DIR"
  for tool in moto_server mlflow python; do
    [[ -x "$BIN/$tool" ]] || { echo "error: $BIN/$tool not found (run \`make install\` or set VENV)" >&2; exit 1; }
  done
  start_one moto "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
  wait_http "$S3_URL/moto-api/" moto
  "$BIN/python" - "$S3_URL" "$BUCKET" <<'PY'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
if sys.argv[2] not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket=sys.argv[2])
PY
  # MLflow 3's job runners (GenAI jobs: 5 extra processes, ~275 MB each) serve nothing a training run uses
  MLFLOW_S3_ENDPOINT_URL="$S3_URL" MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start_one mlflow "$BIN/mlflow" server \
    --backend-store-uri "sqlite:///$DIR/mlflow.db" --artifacts-destination "s3://$BUCKET/mlflow-artifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
  wait_http "$MLFLOW_URL/health" mlflow
  cat <<ENV
services up: S3 (moto) $S3_URL, bucket $BUCKET; MLflow $MLFLOW_URL (logs and pids in .services/)
export these to use them (checkpoints on S3, runs in the MLflow server):
  export AWS_ENDPOINT_URL_S3=$S3_URL AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION
  python -m ssl_platform run experiments/mae_vit_tiny_digits.yaml checkpoint.uri=s3://$BUCKET/checkpoints tracking.uri=$MLFLOW_URL
  python -m ssl_platform chain experiments/chains/salt_digits.yaml checkpoint.uri=s3://$BUCKET/chains tracking.uri=$MLFLOW_URL
ENV
}

stop_one() {
  local name="$1" pid
  if alive "$name"; then
    pid="$(cat "$DIR/$name.pid")"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "$name stopped"
  else
    echo "$name not running"
  fi
  rm -f "$DIR/$name.pid"
}

status() {
  for name in moto mlflow; do
    if alive "$name"; then echo "$name running (pid $(cat "$DIR/$name.pid"), log $DIR/$name.log)"; else echo "$name not running"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop_one mlflow; stop_one moto ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
