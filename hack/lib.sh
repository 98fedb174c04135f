# Shared shell helpers for the dev scripts (sourced, not run).
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${RLOPS_CACHE:-$HOME/.cache/rlops}
cluster_name=${RLOPS_CLUSTER_NAME:-rlops}
export KWOK_WORKDIR="$cache/kwok"
# Each named cluster keeps its kubeconfig, pids, logs and state apart (the tests use their own).
clusterdir="$cache/clusters/$cluster_name"
export KUBECONFIG="$clusterdir/kubeconfig"
bindir="$cache/bin/current"
rundir="$clusterdir/run"
venv="$root/.venv"
kubectl() { "$bindir/kubectl" "$@"; }
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# start_bg NAME LOGFILE CMD...: run CMD in its own session, record its pid under $rundir.
start_bg() {
  local name=$1 logfile=$2; shift 2
  mkdir -p "$rundir" "$(dirname "$logfile")"
  if [ -f "$rundir/$name.pid" ] && kill -0 "$(cat "$rundir/$name.pid")" 2>/dev/null; then
    say "$name already running (pid $(cat "$rundir/$name.pid"))"; return 0
  fi
  setsid "$@" >>"$logfile" 2>&1 < /dev/null &
  echo $! > "$rundir/$name.pid"
  say "started $name (pid $!, log $logfile)"
}

# stop_bg NAME: stop a process started with start_bg (its whole process group).
stop_bg() {
  local pidfile="$rundir/$1.pid" pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# apt_install PKG...: Debian packages, as root, without starting their services (a temporary
# policy-rc.d answers "forbidden"); refreshes the package lists once if the first try fails.
apt_install() {
  local added=0 rc=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; added=1; fi
  say "installing $* (Debian packages)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null || rc=$?
  }
  [ $added = 1 ] && rm -f /usr/sbin/policy-rc.d
  return $rc
}

# buildah with its image store under the cache, so that a second run of a machine (or of CI with
# ~/.cache kept) reuses the image layers. (Install checks use `type -P buildah`: this is a function.)
buildah() { command buildah --root "$cache/buildah/storage" --runroot /run/rlops-buildah "$@"; }
