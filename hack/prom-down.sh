#!/usr/bin/env bash
# Stop the Prometheus and Alertmanager started by hack/prom-up.sh (same RLOPS_STATE_DIR), and only
# them: each was started with setsid, so its pid is its process group; TERM, then KILL after 10s.
# Data, configs and logs stay in the state dir (delete it to start from scratch).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

state=${RLOPS_STATE_DIR:-$cache/services}

stop() {
  local name=$1 pidfile="$state/$1.pid" pid
  [ -f "$pidfile" ] || { say "$name not running"; return 0; }
  pid=$(cat "$pidfile")
  # Only a process of that name: the pid may have been reused since.
  if kill -0 "$pid" 2>/dev/null && [[ $(readlink -f "/proc/$pid/exe" 2>/dev/null) == *"$2" ]]; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    say "$name stopped (pid $pid)"
  else
    say "$name not running (stale pid file)"
  fi
  rm -f "$pidfile"
}

stop prometheus /prometheus
stop alertmanager /prometheus-alertmanager
