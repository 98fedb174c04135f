#!/usr/bin/env bash
# Stop the real node (hack/node-up.sh): kubelet, kube-proxy (and its iptables rules), the pods'
# containers, containerd; the bridge goes. The image store in ~/.cache/rlops/node stays.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
state=/run/rlops-node sock=/run/rlops-node/containerd.sock
stop_bg kubelet
stop_bg kube-proxy
[ -x "$bindir/kube-proxy" ] && "$bindir/kube-proxy" --cleanup >/dev/null 2>&1 || true
if [ -S "$sock" ]; then  # the pods' sandboxes and containers (their shims outlive containerd)
  for t in $(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null); do ctr -a "$sock" -n k8s.io tasks kill -s KILL "$t" >/dev/null 2>&1 || true; done
  sleep 1
  for c in $(ctr -a "$sock" -n k8s.io containers ls -q 2>/dev/null); do
    ctr -a "$sock" -n k8s.io tasks delete -f "$c" >/dev/null 2>&1 || true
    ctr -a "$sock" -n k8s.io containers delete "$c" >/dev/null 2>&1 || true
  done
fi
stop_bg containerd
pkill -f "containerd-shim-runc-v2 -namespace k8s.io -address $sock" 2>/dev/null || true
grep -E " /var/lib/rlops-kubelet(/| )" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
grep " $state/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
ip link del rlops0 2>/dev/null || true
for table in nat filter mangle; do  # the kubelet's own canary chains (kube-proxy --cleanup took its rules)
  iptables -t "$table" -X KUBE-KUBELET-CANARY 2>/dev/null || true
done
rm -rf "$state/cni-ipam"
say "real node stopped"
