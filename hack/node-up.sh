#!/usr/bin/env bash
# A real kubelet node, joined to the local control plane (hack/cluster-up.sh), on this machine:
#   containerd + runc + CNI plugins   Debian's packages (bridge + host-local + portmap + loopback)
#   kubelet + kube-proxy               built from source by hack/build-binaries.sh
#   pause image                        hack/tools/pause, built here (no registry is reachable)
#   rlops images                       hack/images.sh, imported into containerd
# Pods on it are real containers. The kwok GPU nodes stay for scheduling realism (their pods are
# not run); this node has no GPU and takes CPU pods (gpu: 0). Needs root. Idempotent.
#
#   RLOPS_CLUSTER_NAME=rlops-cluster bash hack/node-up.sh
#
# Facts it relies on (docs/install.md, "The real node"): a process here may not lower its
# oom_score_adj, so containerd runs with restrict_oom_score_adj; the node's address is the bridge's
# (the kubelet refuses a loopback node IP); the API server reaches the kubelet by InternalIP with a
# client certificate (cluster-up.sh sets both).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || { echo "hack/node-up.sh needs root (containerd, runc, iptables)" >&2; exit 1; }
node=${RLOPS_NODE_NAME:-rlops-node}
bridge=rlops0 subnet=10.88.0.0/16 node_ip=10.88.0.1
nodedir="$clusterdir/node"
state=/run/rlops-node
croot="$cache/node/containerd"   # image store: kept between runs, so a second start imports nothing
kroot=/var/lib/rlops-kubelet
sock="$state/containerd.sock"
mkdir -p "$nodedir/cni" "$state" "$croot" "$kroot"

need=()
for p in buildah:buildah containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins iptables:iptables conntrack:conntrack; do
  type -P "${p%%:*}" >/dev/null 2>&1 || [ -x "${p%%:*}" ] || need+=("${p#*:}")
done
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
bash "$root/hack/build-binaries.sh" >/dev/null

# --- network: the bridge exists before the kubelet starts (its address is the node IP)
if ! ip link show "$bridge" >/dev/null 2>&1; then
  ip link add "$bridge" type bridge
  ip addr add "$node_ip/16" dev "$bridge"
fi
ip link set "$bridge" up
sysctl -qw net.ipv4.ip_forward=1
# pod -> Service -> pod on the same bridge: replies must pass iptables to be un-NATed
sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || say "warning: net.bridge.bridge-nf-call-iptables unavailable"
cat >"$nodedir/cni/10-rlops.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "rlops", "plugins": [
  {"type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$subnet", "gateway": "$node_ip"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$state/cni-ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}},
  {"type": "loopback"}]}
JSON

# --- containerd
cat >"$nodedir/containerd.toml" <<TOML
version = 2
root = "$croot"
state = "$state/containerd"
[grpc]
  address = "$sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/rlops/pause:1"
  # a process here may not lower its oom_score_adj (the CRI asks for -998 for sandboxes)
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$nodedir/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
TOML
start_bg containerd "$nodedir/containerd.log" containerd --config "$nodedir/containerd.toml"
for _ in $(seq 60); do [ -S "$sock" ] && ctr -a "$sock" version >/dev/null 2>&1 && break; sleep 0.5; done
ctr() { command ctr -a "$sock" -n k8s.io "$@"; }

# --- images: pause (from scratch), then operator and engine
if ! grep -qx localhost/rlops/pause:1 <<<"$(ctr images ls -q)"; then
  say "building the pause image (hack/tools/pause, from scratch)"
  (cd "$root/hack/tools/pause" && GOTOOLCHAIN=local CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$nodedir/pause" .)
  c=$(buildah from scratch)
  buildah copy --quiet "$c" "$nodedir/pause" /pause >/dev/null
  buildah config --entrypoint '["/pause"]' --user 65535:65535 "$c"
  buildah commit --quiet "$c" localhost/rlops/pause:1 >/dev/null
  buildah rm "$c" >/dev/null
  buildah push --quiet localhost/rlops/pause:1 "oci-archive:$nodedir/pause.tar:localhost/rlops/pause:1" >/dev/null
  ctr images import "$nodedir/pause.tar" >/dev/null
  rm -f "$nodedir/pause.tar"
fi
bash "$root/hack/images.sh" load "$sock"

# --- kubelet and kube-proxy: client certificates from the cluster's CA, and kubeconfigs
pki="$KWOK_WORKDIR/clusters/$cluster_name/pki"
if [ -n "$("$venv/bin/python" -W ignore "$root/hack/node_certs.py" "$pki" "$nodedir/pki" "$node")" ]; then
  stop_bg kubelet; stop_bg kube-proxy  # new credentials (a recreated control plane): restart onto them
fi
server=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
for who in kubelet kube-proxy; do
  cat >"$nodedir/$who.kubeconfig" <<EOF2
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "$server", certificate-authority: "$pki/ca.crt"}}]
users: [{name: $who, user: {client-certificate: "$nodedir/pki/$who.crt", client-key: "$nodedir/pki/$who.key"}}]
contexts: [{name: default, context: {cluster: local, user: $who}}]
current-context: default
EOF2
done
cat >"$nodedir/kubelet.yaml" <<EOF2
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failSwapOn: false
failCgroupV1: false
containerRuntimeEndpoint: unix://$sock
address: $node_ip
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$pki/ca.crt"}
authorization: {mode: Webhook}
# the images are imported, not pulled: never collect them
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {"memory.available": "200Mi", "nodefs.available": "2%", "imagefs.available": "2%"}
serializeImagePulls: false
EOF2
start_bg kubelet "$nodedir/kubelet.log" "$bindir/kubelet" --config "$nodedir/kubelet.yaml" \
  --kubeconfig "$nodedir/kubelet.kubeconfig" --hostname-override "$node" --node-ip "$node_ip" \
  --root-dir "$kroot" --cert-dir "$nodedir/kubelet-pki" --node-labels "rlops.dev/node=real" -v 1
start_bg kube-proxy "$nodedir/kube-proxy.log" "$bindir/kube-proxy" --kubeconfig "$nodedir/kube-proxy.kubeconfig" \
  --hostname-override "$node" --proxy-mode iptables --cluster-cidr "$subnet" --conntrack-max-per-core 0 \
  --metrics-bind-address 127.0.0.1:10249 --healthz-bind-address 127.0.0.1:10256

for _ in $(seq 120); do
  [ "$(kubectl get node "$node" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ] && break
  sleep 1
done
kubectl get node "$node" -o wide >&2 || { tail -30 "$nodedir/kubelet.log" >&2; exit 1; }
say "real node '$node' ready (logs: $nodedir/{containerd,kubelet,kube-proxy}.log)"
