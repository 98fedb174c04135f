#!/usr/bin/env bash
# Install Debian's Prometheus, Alertmanager and NATS server, idempotently: the local alerting path,
# and the trajectory trigger and events out (nats-server with JetStream).
#
#   sudo bash hack/install-services.sh      # (CI runs it as root on a fresh machine)
#
# Installs the packages `prometheus`, `prometheus-alertmanager` and `nats-server` with apt-get
# when their binaries (/usr/bin/prometheus, /usr/bin/prometheus-alertmanager,
# /usr/sbin/nats-server) are missing; does nothing otherwise. rlops runs them as plain local
# processes (hack/prom-up.sh, the tests' fixtures), never as system
# services, so the packages' own services must not be started by the install:
#   - a temporary /usr/sbin/policy-rc.d answering 101 ("action forbidden") is put in place for
#     the duration of the install when there is none (invoke-rc.d and deb-systemd-invoke both
#     obey it), and removed afterwards;
#   - on a machine booted with systemd, the units the install enabled are disabled and stopped
#     again (only when this script installed the package, so a service someone set up on purpose
#     is left alone).
# Recommends (prometheus-node-exporter, ...) are not installed.
set -euo pipefail

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# package:binary:unit
wanted=(
  "prometheus:/usr/bin/prometheus:prometheus.service"
  "prometheus-alertmanager:/usr/bin/prometheus-alertmanager:prometheus-alertmanager.service"
  "nats-server:/usr/sbin/nats-server:nats-server.service"
)

missing=()
units=()
for w in "${wanted[@]}"; do
  IFS=: read -r pkg bin unit <<<"$w"
  if [ -x "$bin" ]; then
    say "$pkg: already installed ($("$bin" --version 2>&1 | head -1))"
  else
    missing+=("$pkg")
    units+=("$unit")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  say "nothing to install"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-services.sh: need root to apt-get install ${missing[*]} (run it with sudo)" >&2
  exit 1
fi

policy=/usr/sbin/policy-rc.d
own_policy=
cleanup() { if [ -n "$own_policy" ]; then rm -f "$policy"; fi; }
trap cleanup EXIT
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# temporary, from rlops hack/install-services.sh: start no services during the install\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  own_policy=1
  say "temporary $policy in place (no service starts during the install)"
fi

export DEBIAN_FRONTEND=noninteractive
say "apt-get update"
apt-get update -q >&2
say "apt-get install ${missing[*]}"
apt-get install -y -q --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
  "${missing[@]}" >&2

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  for unit in "${units[@]}"; do
    if systemctl is-enabled --quiet "$unit" 2>/dev/null || systemctl is-active --quiet "$unit" 2>/dev/null; then
      say "disabling and stopping the package's $unit (rlops runs it as a local process instead)"
      systemctl disable --now "$unit" >&2 || true
    fi
  done
fi

for w in "${wanted[@]}"; do
  IFS=: read -r pkg bin unit <<<"$w"
  [ -x "$bin" ] || { echo "install-services.sh: $bin still missing after installing $pkg" >&2; exit 1; }
  say "$pkg: installed ($("$bin" --version 2>&1 | head -1))"
done
