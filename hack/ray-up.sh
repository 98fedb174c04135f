#!/usr/bin/env bash
# Start a local single-node Ray head with Ray Serve's HTTP proxy, idempotently.
#
#   bash hack/ray-up.sh          # prints the dashboard, Serve and metrics URLs
#   bash hack/ray-down.sh        # stops it again
#
# Everything runs as local processes of .venv's `ray` (PyPI's ray[serve]); the dashboard (and its
# Serve REST API, which the operator talks to) listens on 127.0.0.1 only.
#
# Env (defaults in brackets):
#   RLOPS_RAY_NAME             instance name: state dir $RLOPS_CACHE/ray/<name> [rlops]
#   RLOPS_RAY_DASHBOARD_PORT   dashboard + Serve REST API [8265]
#   RLOPS_SERVE_PORT           Serve HTTP proxy (127.0.0.1) [8000]
#   RLOPS_RAY_METRICS_PORT     Prometheus metrics of the Ray metrics agent [8081]
#   RLOPS_RAY_GCS_PORT         GCS (the head's `--port`) [6379]
#   RLOPS_RAY_CLIENT_PORT      Ray client server [10001]
#   RLOPS_RAY_AGENT_PORT       dashboard agent HTTP [52365]
#   RLOPS_RAY_AGENT_GRPC_PORT  dashboard agent gRPC [52366]
#   RLOPS_RAY_RUNTIME_ENV_PORT runtime-env agent [52367]
#   RLOPS_RAY_NUM_CPUS         logical CPUs Ray may schedule [2]
#   RLOPS_RAY_OBJECT_STORE_MB  object store size [512]
# Two instances with different names and ports can run side by side (the tests use their own).
# Ray reads its own RAY_* settings from the environment too (e.g. RAY_metrics_report_interval_ms).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
# Ray turns token authentication on when it finds a token (~/.ray/auth_token, left by any
# earlier ray.init() on this machine); the dashboard's REST API then answers 401 to the operator
# and to this script. This head listens on 127.0.0.1 only: keep it off unless asked for.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

name=${RLOPS_RAY_NAME:-rlops}
dashboard_port=${RLOPS_RAY_DASHBOARD_PORT:-8265}
serve_port=${RLOPS_SERVE_PORT:-8000}
metrics_port=${RLOPS_RAY_METRICS_PORT:-8081}
gcs_port=${RLOPS_RAY_GCS_PORT:-6379}
client_port=${RLOPS_RAY_CLIENT_PORT:-10001}
agent_port=${RLOPS_RAY_AGENT_PORT:-52365}
agent_grpc_port=${RLOPS_RAY_AGENT_GRPC_PORT:-52366}
runtime_env_port=${RLOPS_RAY_RUNTIME_ENV_PORT:-52367}
num_cpus=${RLOPS_RAY_NUM_CPUS:-2}
object_store_mb=${RLOPS_RAY_OBJECT_STORE_MB:-512}

raydir="$cache/ray/$name"
# Ray's session dir holds unix sockets (108-byte path limit), so keep the temp dir short.
tmpdir="$raydir/tmp"
pidfile="$raydir/head.pid"
log="$raydir/head.log"
ray="$venv/bin/ray"
dashboard="http://127.0.0.1:$dashboard_port"

[ -x "$ray" ] || bash "$root/hack/setup-venv.sh"

serve_up() {
  # The Serve REST API answers (200) once the dashboard's serve module is up.
  curl -sf -m 5 "$dashboard/api/serve/applications/" >/dev/null 2>&1
}

# What this head is started with; a running head with other settings is restarted.
want="gcs=$gcs_port dashboard=$dashboard_port serve=$serve_port metrics=$metrics_port client=$client_port agent=$agent_port/$agent_grpc_port runtime_env=$runtime_env_port cpus=$num_cpus store=$object_store_mb"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  if [ "$(cat "$raydir/settings" 2>/dev/null)" = "$want" ] && serve_up; then
    say "Ray head '$name' already running (pid $(cat "$pidfile")): dashboard $dashboard"
    exit 0
  fi
  say "Ray head '$name' is running with other settings or not answering; restarting it"
  bash "$root/hack/ray-down.sh"
fi

mkdir -p "$raydir" "$tmpdir"
say "starting Ray head '$name' (log $log)"
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's single-node mode: without it Ray replaces
# `--node-ip-address 127.0.0.1` with the host's network address; with it every Ray process
# (GCS, raylet, workers, Serve) addresses the others on loopback.
# `--block` keeps `ray start` in the foreground as the parent of the head's processes; setsid
# makes it the leader of a new process group, so ray-down.sh stops exactly this instance
# (never `ray stop`, which kills every Ray process of the user).
setsid env RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$ray" start --head --block \
  --node-ip-address 127.0.0.1 --port "$gcs_port" \
  --num-cpus "$num_cpus" --num-gpus 0 \
  --object-store-memory $((object_store_mb * 1024 * 1024)) \
  --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" \
  --dashboard-agent-listen-port "$agent_port" --dashboard-agent-grpc-port "$agent_grpc_port" \
  --runtime-env-agent-port "$runtime_env_port" --ray-client-server-port "$client_port" \
  --metrics-export-port "$metrics_port" \
  --temp-dir "$tmpdir" --disable-usage-stats --log-style record \
  >>"$log" 2>&1 < /dev/null &
echo $! > "$pidfile"
echo "$want" > "$raydir/settings"

for _ in $(seq 120); do
  kill -0 "$(cat "$pidfile")" 2>/dev/null || { tail -40 "$log" >&2; echo "ray start exited" >&2; exit 1; }
  curl -sf -m 2 "$dashboard/api/version" >/dev/null 2>&1 && break
  sleep 1
done
curl -sf -m 5 "$dashboard/api/version" >/dev/null || { tail -40 "$log" >&2; echo "dashboard did not answer" >&2; exit 1; }

# Start Serve with its HTTP proxy on 127.0.0.1:$serve_port. The HTTP options are fixed when
# Serve starts; the REST adapter keeps them on every PUT.
say "starting Ray Serve (HTTP 127.0.0.1:$serve_port)"
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$venv/bin/serve" start --address "127.0.0.1:$gcs_port" --http-host 127.0.0.1 --http-port "$serve_port" \
  --proxy-location HeadOnly >>"$log" 2>&1 || { tail -40 "$log" >&2; echo "serve start failed" >&2; exit 1; }
for _ in $(seq 60); do serve_up && break; sleep 1; done
serve_up || { tail -40 "$log" >&2; echo "Serve REST API did not answer" >&2; exit 1; }

say "Ray head '$name' up: dashboard + Serve REST API $dashboard, Serve HTTP http://127.0.0.1:$serve_port, metrics http://127.0.0.1:$metrics_port/metrics"
