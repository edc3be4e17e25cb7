#!/usr/bin/env bash
# A local multi-node Ray cluster on loopback addresses: a head node (GCS, dashboard, job drivers) and worker
# nodes, each a separate `ray start` with its own IP (127.0.0.x), ports and temp dir, token auth on.
#   bash infra/local/cluster.sh start              (make cluster)       head + 2 worker nodes
#   bash infra/local/cluster.sh stop [NODE...]     (make cluster-stop)  every node (or the named ones)
#   bash infra/local/cluster.sh add NODE IP        start one more worker node (e.g. to replace a lost one)
#   bash infra/local/cluster.sh kill NODE          SIGKILL one node's processes (simulates losing a machine)
#   bash infra/local/cluster.sh status | env
# Settings (environment): SSL_HEAD_IP (127.0.0.2), SSL_WORKER_IPS ("127.0.0.3 127.0.0.4"), SSL_RAY_PORT (6390),
# SSL_DASHBOARD_PORT (8265), SSL_HEAD_CPUS (0: the head runs job drivers, not Train workers), SSL_WORKER_CPUS (2),
# SSL_CLUSTER_DIR (.cluster: pids, token, logs, env file), SSL_CLUSTER_TMP (Ray temp dirs; short, under /tmp:
# Ray's unix socket paths have a length limit), VENV (.venv). Only the nodes started here are ever stopped
# (their process groups); `ray stop` would stop every Ray process of the machine.
# Why loopback 127.0.0.2+: Ray replaces 127.0.0.1 with the machine's address, so two nodes could not be told
# apart; every 127.x address is the local machine. Nodes run the venv's python: a job's `python` is the node's.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
BIN="$VENV/bin"
DIR="${SSL_CLUSTER_DIR:-$ROOT/.cluster}"
TMP_ROOT="${SSL_CLUSTER_TMP:-/tmp/sslc-$(id -u)-$(printf '%s' "$DIR" | cksum | cut -c1-6)}"
HEAD_IP="${SSL_HEAD_IP:-127.0.0.2}"
WORKER_IPS="${SSL_WORKER_IPS:-127.0.0.3 127.0.0.4}"
RAY_PORT="${SSL_RAY_PORT:-6390}"
DASHBOARD_PORT="${SSL_DASHBOARD_PORT:-8265}"
HEAD_CPUS="${SSL_HEAD_CPUS:-0}"
WORKER_CPUS="${SSL_WORKER_CPUS:-2}"
DASHBOARD="http://$HEAD_IP:$DASHBOARD_PORT"

export PATH="$BIN:$PATH" RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token
unset RAY_ADDRESS PYTHONPATH

free_ports() {  # free_ports N: N free TCP ports
  "$BIN/python" - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

alive() { [[ -f "$DIR/$1.pgid" ]] && kill -0 -- "-$(cat "$DIR/$1.pgid")" 2>/dev/null; }

token() {  # the cluster's token: RAY_AUTH_TOKEN if set, else one generated once in $DIR/auth_token
  if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then printf '%s' "$RAY_AUTH_TOKEN"; return; fi
  if [[ ! -s "$DIR/auth_token" ]]; then
    (umask 077; "$BIN/python" -c "import secrets; print(secrets.token_hex(32))" >"$DIR/auth_token")
  fi
  tr -d '\n' <"$DIR/auth_token"
}

start_node() {  # start_node NAME IP RAY_START_ARGS...: one node in its own session (stop ends its process group)
  local name="$1" ip="$2"; shift 2
  if alive "$name"; then echo "node $name already running"; return 0; fi
  local attempt
  # `ray start` gives a raylet 30 s (fixed) to register with the GCS; a busy machine can miss that: try again
  for attempt in 1 2 3; do
    if start_node_once "$name" "$ip" "$@"; then echo "node $name up at $ip"; return 0; fi
    signal_node "$name" KILL
    echo "node $name ($ip): start attempt $attempt failed (see $DIR/$name.log)" >&2
  done
  tail -20 "$DIR/$name.log" >&2
  return 1
}

start_node_once() {
  local name="$1" ip="$2"; shift 2
  local p; read -r -a p <<<"$(free_ports 5)"
  rm -rf "${TMP_ROOT:?}/$name"
  mkdir -p "$TMP_ROOT/$name"
  # fixed default ports (dashboard agent 52365, ...) would collide between nodes of one machine: pick free ones
  setsid "$BIN/ray" start --node-ip-address "$ip" --temp-dir "$TMP_ROOT/$name" \
    --dashboard-agent-listen-port "${p[0]}" --dashboard-agent-grpc-port "${p[1]}" --metrics-export-port "${p[2]}" \
    --runtime-env-agent-port "${p[3]}" --object-store-memory $((200 * 1024 * 1024)) --disable-usage-stats "$@" \
    >>"$DIR/$name.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$DIR/$name.pgid"
  echo "$ip" >"$DIR/$name.ip"
  wait "$pid"
}

wait_ready() {  # wait_ready N: N alive nodes and a job runs (the head's job agent starts after `ray start` returns)
  "$BIN/python" - "$DASHBOARD" "$1" <<'PY'
import sys, time, requests
from ray.job_submission import JobSubmissionClient
address, want = sys.argv[1], int(sys.argv[2])
import os
headers = {"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"}
deadline = time.monotonic() + 240
def alive_nodes():
    r = requests.get(f"{address}/nodes?view=summary", headers=headers, timeout=10).json()
    return sum(1 for n in r["data"]["summary"] if n["raylet"]["state"] == "ALIVE")
while True:
    try:
        n = alive_nodes()
        if n >= want:
            c = JobSubmissionClient(address, headers=headers)
            job = c.submit_job(entrypoint="python -c pass")
            while str(c.get_job_status(job).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
                time.sleep(0.5)
            if str(c.get_job_status(job).value) == "SUCCEEDED":
                break
    except Exception as err:  # noqa: BLE001 - not up yet
        n = f"not answering ({type(err).__name__})"
    if time.monotonic() > deadline:
        sys.exit(f"error: cluster at {address} not ready after 240 s (alive nodes: {n}, want {want})")
    time.sleep(1)
PY
}

write_env() {
  cat >"$DIR/env" <<ENV
# the Ray job CLI and `ssl_platform submit/status/logs/stop` use RAY_API_SERVER_ADDRESS (RAY_ADDRESS would also
# redirect a local `ssl_platform run`); the token is sent because of RAY_AUTH_MODE=token
export RAY_API_SERVER_ADDRESS=$DASHBOARD RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/auth_token
ENV
}

start() {
  mkdir -p "$DIR"
  [[ -x "$BIN/ray" ]] || { echo "error: $BIN/ray not found (run \`make install\` or set VENV)" >&2; exit 1; }
  RAY_AUTH_TOKEN="$(token)"; export RAY_AUTH_TOKEN
  local p; read -r -a p <<<"$(free_ports 1)"
  start_node head "$HEAD_IP" --head --port "$RAY_PORT" --dashboard-host "$HEAD_IP" --dashboard-port "$DASHBOARD_PORT" \
    --include-dashboard true --ray-client-server-port "${p[0]}" --num-cpus "$HEAD_CPUS"
  local i=1 ip
  for ip in $WORKER_IPS; do
    start_node "w$i" "$ip" --address "$HEAD_IP:$RAY_PORT" --num-cpus "$WORKER_CPUS"
    i=$((i + 1))
  done
  wait_ready "$i"
  write_env
  cat <<ENV
cluster up: head $HEAD_IP (dashboard $DASHBOARD, GCS $HEAD_IP:$RAY_PORT), worker nodes: $WORKER_IPS ($WORKER_CPUS CPUs each)
use it (token in $DIR/auth_token; the Ray CLI needs RAY_AUTH_MODE=token):
  source $DIR/env
  ray job submit --working-dir . -- python -m ssl_platform run experiments/mae_vit_tiny_digits.yaml
  python -m ssl_platform submit experiments/mae_vit_tiny_digits.yaml --follow
stop it: make cluster-stop
ENV
}

add() {  # add NAME IP: one more worker node
  [[ $# -eq 2 ]] || { echo "usage: $0 add NODE IP" >&2; exit 2; }
  mkdir -p "$DIR"
  RAY_AUTH_TOKEN="$(token)"; export RAY_AUTH_TOKEN
  start_node "$1" "$2" --address "$HEAD_IP:$RAY_PORT" --num-cpus "$WORKER_CPUS"
}

signal_node() {  # signal_node NAME SIGNAL: signal the node's process group; wait until it is gone
  local name="$1" sig="$2" pgid
  [[ -f "$DIR/$name.pgid" ]] || { echo "node $name not started here"; return 0; }
  pgid="$(cat "$DIR/$name.pgid")"
  kill "-$sig" -- "-$pgid" 2>/dev/null || true
  for _ in $(seq 1 20); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pgid" 2>/dev/null || true
}

stop() {
  local names=("$@")
  if [[ ${#names[@]} -eq 0 ]]; then
    mapfile -t names < <(cd "$DIR" 2>/dev/null && ls ./*.pgid 2>/dev/null | sed 's|^\./||; s|\.pgid$||' | sort -r)
  fi
  local name
  for name in "${names[@]}"; do  # worker nodes first ("w*" sorts after "head" in reverse)
    if alive "$name"; then signal_node "$name" TERM; echo "node $name stopped"; else echo "node $name not running"; fi
    rm -f "$DIR/$name.pgid" "$DIR/$name.ip"
    rm -rf "${TMP_ROOT:?}/$name"
  done
  rmdir "$TMP_ROOT" 2>/dev/null || true
}

status() {
  local f name
  for f in "$DIR"/*.pgid; do
    [[ -e "$f" ]] || { echo "no node started from $DIR"; return 0; }
    name="$(basename "$f" .pgid)"
    if alive "$name"; then echo "node $name running at $(cat "$DIR/$name.ip") (log $DIR/$name.log)"; else echo "node $name not running"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) shift; stop "$@" ;;
  add) shift; add "$@" ;;
  kill) [[ $# -eq 2 ]] || { echo "usage: $0 kill NODE" >&2; exit 2; }; signal_node "$2" KILL; echo "node $2 killed" ;;
  status) status ;;
  env) cat "$DIR/env" ;;
  *) echo "usage: $0 start|stop [NODE...]|add NODE IP|kill NODE|status|env" >&2; exit 2 ;;
esac
