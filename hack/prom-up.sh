#!/usr/bin/env bash
# Start Prometheus and Alertmanager (Debian's packages, hack/install-services.sh) as local
# processes, idempotently, with configs rendered from hack/prometheus/*.tmpl.
#
#   bash hack/prom-up.sh       # prints the URLs; again later: re-renders the configs and reloads
#   bash hack/prom-down.sh     # stops both
#
# Env (defaults in brackets):
#   RLOPS_STATE_DIR            configs, data, logs, pid files [${RLOPS_CACHE:-~/.cache/rlops}/services]
#   RLOPS_PROMETHEUS_PORT      Prometheus's port [9090]
#   RLOPS_PROMETHEUS_ADDR      Prometheus's listen address [127.0.0.1] (the cluster tier: the real
#                              node's bridge address, so that the operator's pod reaches it)
#   RLOPS_ALERTMANAGER_PORT    Alertmanager on 127.0.0.1 [9093]
#   RLOPS_SCRAPE_TARGETS       comma-separated host:port list scraped as job `rlops-serving`
#                              [127.0.0.1:${RLOPS_RAY_METRICS_PORT:-8081}, hack/ray-up.sh's metrics agent]
#   RLOPS_PROMETHEUS_RULES     rule file [manifests/prometheus/rules.yaml]
#   RLOPS_ALERT_WEBHOOK_URL    where Alertmanager POSTs rollback alerts
#                              [http://127.0.0.1:8090/api/v1/alerts, the operator's receiver]
#   RLOPS_ALERT_TOKEN_FILE     file holding the receiver's bearer token [<state dir>/alert-token,
#                              generated (32 random bytes, hex) when missing]
#   RLOPS_SCRAPE_INTERVAL, RLOPS_EVALUATION_INTERVAL   [2s, 2s]  (production: 15s, 15s)
#   RLOPS_GROUP_WAIT, RLOPS_GROUP_INTERVAL, RLOPS_REPEAT_INTERVAL   [1s, 1s, 1m]
#                              (production: 10s, 1m, 15m)
#   RLOPS_ALERTMANAGER_LOG_LEVEL   [info] (debug logs every notification sent)
#   RLOPS_PROMETHEUS_BIN, RLOPS_ALERTMANAGER_BIN   [/usr/bin/prometheus, /usr/bin/prometheus-alertmanager]
# Two instances with different state dirs and ports can run side by side (the tests use their own).
# Ports and data dirs are fixed at start: after changing a port, run prom-down.sh first.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

state=${RLOPS_STATE_DIR:-$cache/services}
prom_port=${RLOPS_PROMETHEUS_PORT:-9090}
prom_addr=${RLOPS_PROMETHEUS_ADDR:-127.0.0.1}
am_port=${RLOPS_ALERTMANAGER_PORT:-9093}
targets=${RLOPS_SCRAPE_TARGETS-127.0.0.1:${RLOPS_RAY_METRICS_PORT:-8081}}
rules=${RLOPS_PROMETHEUS_RULES:-$root/manifests/prometheus/rules.yaml}
webhook=${RLOPS_ALERT_WEBHOOK_URL:-http://127.0.0.1:8090/api/v1/alerts}
token_file=${RLOPS_ALERT_TOKEN_FILE:-}
prom_bin=${RLOPS_PROMETHEUS_BIN:-/usr/bin/prometheus}
am_bin=${RLOPS_ALERTMANAGER_BIN:-/usr/bin/prometheus-alertmanager}
promtool=$(dirname "$prom_bin")/promtool
amtool=$(dirname "$am_bin")/amtool

for b in "$prom_bin" "$am_bin"; do
  [ -x "$b" ] || { echo "prom-up.sh: $b not found; run: sudo bash hack/install-services.sh" >&2; exit 1; }
done
[ -f "$rules" ] || { echo "prom-up.sh: rule file $rules not found" >&2; exit 1; }
rules=$(cd "$(dirname "$rules")" && pwd)/$(basename "$rules")

mkdir -p "$state/prometheus-data" "$state/alertmanager-data"

if [ -z "$token_file" ]; then
  token_file="$state/alert-token"
  if [ ! -s "$token_file" ]; then
    (umask 077; od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$token_file")
    say "generated the alert token $token_file"
  fi
elif [ ! -r "$token_file" ]; then
  echo "prom-up.sh: RLOPS_ALERT_TOKEN_FILE=$token_file is not a readable file" >&2; exit 1
fi
token_file=$(cd "$(dirname "$token_file")" && pwd)/$(basename "$token_file")

# render TEMPLATE OUT NAME=VALUE...: fill @NAME@ placeholders (quoted, so `&` stays literal).
render() {
  local tmpl=$1 out=$2 text kv; shift 2
  text=$(<"$tmpl")
  for kv in "$@"; do text=${text//"@${kv%%=*}@"/"${kv#*=}"}; done
  if [[ $text =~ @[A-Z_]+@ ]]; then echo "prom-up.sh: unfilled ${BASH_REMATCH[0]} in $tmpl" >&2; exit 1; fi
  printf '%s\n' "$text" >"$out.tmp" && mv "$out.tmp" "$out"
}

# The scrape targets as a YAML flow list: 'a:1,b:2' -> ['a:1', 'b:2'].
target_list=
target_re='^[][A-Za-z0-9._:-]+$'
IFS=, read -r -a parts <<<"$targets"
for t in "${parts[@]}"; do
  t=${t//[[:space:]]/}
  [ -n "$t" ] || continue
  [[ $t =~ $target_re ]] || { echo "prom-up.sh: bad scrape target '$t' (want host:port)" >&2; exit 1; }
  target_list+="${target_list:+, }'$t'"
done

render "$root/hack/prometheus/prometheus.yml.tmpl" "$state/prometheus.yml" \
  "SCRAPE_INTERVAL=${RLOPS_SCRAPE_INTERVAL:-2s}" "EVALUATION_INTERVAL=${RLOPS_EVALUATION_INTERVAL:-2s}" \
  "RULES_FILE=$rules" "ALERTMANAGER_PORT=$am_port" "SCRAPE_TARGETS=[$target_list]"
render "$root/hack/prometheus/alertmanager.yml.tmpl" "$state/alertmanager.yml" \
  "GROUP_WAIT=${RLOPS_GROUP_WAIT:-1s}" "GROUP_INTERVAL=${RLOPS_GROUP_INTERVAL:-1s}" \
  "REPEAT_INTERVAL=${RLOPS_REPEAT_INTERVAL:-1m}" "WEBHOOK_URL=$webhook" "TOKEN_FILE=$token_file"

# Refuse a broken config before touching a running instance.
"$promtool" check config "$state/prometheus.yml" >"$state/check.log" 2>&1 \
  || { cat "$state/check.log" >&2; exit 1; }
"$amtool" check-config "$state/alertmanager.yml" >"$state/check.log" 2>&1 \
  || { cat "$state/check.log" >&2; exit 1; }

# running NAME BINARY: the pid from NAME.pid if that process is alive and runs BINARY.
running() {
  local pidfile="$state/$1.pid" pid
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$2")" ] || { rm -f "$pidfile"; return 1; }
  echo "$pid"
}

ready() { curl -sf -m 2 "http://$1/-/ready" >/dev/null 2>&1; }  # host:port

# wait_ready NAME HOST:PORT PID
wait_ready() {
  for _ in $(seq 120); do
    kill -0 "$3" 2>/dev/null || { tail -30 "$state/$1.log" >&2; echo "prom-up.sh: $1 exited (log $state/$1.log)" >&2; exit 1; }
    ready "$2" && return 0
    sleep 0.5
  done
  tail -30 "$state/$1.log" >&2; echo "prom-up.sh: $1 not ready after 60s (log $state/$1.log)" >&2; exit 1
}

# up NAME BINARY HOST:PORT ARGS...: start (own session, pid file, log) or reload (SIGHUP), then wait.
up() {
  local name=$1 bin=$2 port=$3 pid; shift 3
  if pid=$(running "$name" "$bin"); then
    kill -HUP "$pid"
    say "$name already running (pid $pid): config reloaded"
  else
    if ready "$port"; then
      echo "prom-up.sh: port $port already serves something else (not $state/$name.pid)" >&2; exit 1
    fi
    setsid "$bin" "$@" >>"$state/$name.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$state/$name.pid"
    say "started $name (pid $pid, log $state/$name.log)"
  fi
  wait_ready "$name" "$port" "$pid"
}

up alertmanager "$am_bin" "127.0.0.1:$am_port" \
  --config.file="$state/alertmanager.yml" --storage.path="$state/alertmanager-data" \
  --web.listen-address="127.0.0.1:$am_port" --cluster.listen-address= --log.level="${RLOPS_ALERTMANAGER_LOG_LEVEL:-info}"
up prometheus "$prom_bin" "$prom_addr:$prom_port" \
  --config.file="$state/prometheus.yml" --storage.tsdb.path="$state/prometheus-data" \
  --storage.tsdb.retention.time=2d --web.listen-address="$prom_addr:$prom_port"

say "Prometheus http://$prom_addr:$prom_port (scraping [${target_list}], rules $rules)"
say "Alertmanager http://127.0.0.1:$am_port (rollback alerts -> $webhook, token file $token_file)"
