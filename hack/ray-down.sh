#!/usr/bin/env bash
# Stop the local Ray head started by hack/ray-up.sh (same RLOPS_RAY_NAME), and only it.
# ray-up.sh starts `ray start --head --block` with setsid, so every process of this instance
# (GCS, raylet, dashboard, and the worker processes the raylet forks, which make their own
# process groups but stay in the session) shares one session id: the recorded pid. Those are
# sent TERM, then KILL after 5 s (raylet, GCS and some workers do not always exit on TERM; a
# dev head's state is disposable). `ray stop` is not used: it kills every Ray process of the
# user, including other instances (the demo's and the tests' heads can run side by side).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

name=${RLOPS_RAY_NAME:-rlops}
raydir="$cache/ray/$name"
pidfile="$raydir/head.pid"

[ -f "$pidfile" ] || { say "Ray head '$name' not running"; exit 0; }
pid=$(cat "$pidfile")

in_session() { pgrep -s "$pid" 2>/dev/null || true; }

procs=$(in_session)
if [ -n "$procs" ]; then
  kill -TERM $procs 2>/dev/null || true
  for _ in $(seq 25); do [ -z "$(in_session)" ] && break; sleep 0.2; done
  procs=$(in_session)
  [ -z "$procs" ] || kill -KILL $procs 2>/dev/null || true
  for _ in $(seq 50); do [ -z "$(in_session)" ] && break; sleep 0.2; done
fi
rm -f "$pidfile"
say "Ray head '$name' stopped"
