#!/usr/bin/env bash
# Build the local control plane's binaries from source through the Go module proxy,
# and cache them under ${RLOPS_CACHE:-~/.cache/rlops}/bin/<name>-<version>/.
#
#   etcd                                  hack/tools/etcd        (wrapper main -> etcdmain.Main)
#   kube-apiserver, kube-controller-manager,
#   kube-scheduler, kubectl               hack/tools/kubernetes  (k8s.io/kubernetes, staging modules replaced)
#   kubelet, kube-proxy                   hack/tools/kubernetes  (the real node: hack/node-up.sh)
#   kwok, kwokctl                         hack/tools/kwok        (sigs.k8s.io/kwok)
#   helm                                  hack/tools/helm        (helm.sh/helm/v3)
#   ray-operator (KubeRay)                hack/tools/kuberay     (github.com/ray-project/kuberay/ray-operator)
#
# Versions come from the go.mod of each wrapper module, so the cache key moves with them.
# Nothing is downloaded from release sites. Prints the directory of each binary set.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${RLOPS_CACHE:-$HOME/.cache/rlops}
export GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0

modver() { awk -v m="$2" '$1==m || ($1=="require" && $2==m) {print ($1=="require") ? $3 : $2; exit}' "$1"; }

build() { # name version moddir ldflags pkg...
  local name=$1 version=$2 moddir=$3 ldflags=$4; shift 4
  local out="$cache/bin/$name-$version"
  local missing=0 pkg
  for pkg in "$@"; do [ -x "$out/$(basename "$pkg")" ] || missing=1; done
  if [ $missing = 0 ]; then echo "cached: $out" >&2; echo "$out"; return; fi
  echo "building $name $version -> $out (first time only; several minutes)" >&2
  local start=$SECONDS tmp="$out.tmp.$$"
  mkdir -p "$tmp"
  (cd "$moddir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$tmp/" "$@")
  rm -rf "$out" && mv "$tmp" "$out"
  echo "built $name $version in $((SECONDS - start))s" >&2
  echo "$out"
}

etcd_v=$(modver "$here/tools/etcd/go.mod" go.etcd.io/etcd/server/v3)
k8s_v=$(modver "$here/tools/kubernetes/go.mod" k8s.io/kubernetes)
kwok_v=$(modver "$here/tools/kwok/go.mod" sigs.k8s.io/kwok)
helm_v=$(modver "$here/tools/helm/go.mod" helm.sh/helm/v3)
kuberay_v=$(modver "$here/tools/kuberay/go.mod" github.com/ray-project/kuberay/ray-operator)
minor=$(echo "$k8s_v" | cut -d. -f2)

k8s_ld="-X k8s.io/component-base/version.gitVersion=$k8s_v -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=$k8s_v -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"

build etcd "$etcd_v" "$here/tools/etcd" "" rlops.dev/hack/tools/etcd >/dev/null
# the wrapper's binary is named after its module's last element: etcd
build kwok "$kwok_v" "$here/tools/kwok" "-X sigs.k8s.io/kwok/pkg/consts.Version=$kwok_v" \
  sigs.k8s.io/kwok/cmd/kwok sigs.k8s.io/kwok/cmd/kwokctl >/dev/null
build kubernetes "$k8s_v" "$here/tools/kubernetes" "$k8s_ld" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl >/dev/null
build kubernetes-node "$k8s_v" "$here/tools/kubernetes" "$k8s_ld" \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy >/dev/null

# helm's default Kubernetes version (for `helm template` and lint) is its client-go's, as its Makefile sets it
helm_k8s_minor=$(modver "$here/tools/helm/go.mod" k8s.io/client-go | cut -d. -f2)
helm_ld="-X helm.sh/helm/v3/internal/version.version=$helm_v"
for pkg in lint/rules chartutil; do
  helm_ld="$helm_ld -X helm.sh/helm/v3/pkg/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/$pkg.k8sVersionMinor=$helm_k8s_minor"
done
build helm "$helm_v-k8s1.$helm_k8s_minor" "$here/tools/helm" "$helm_ld" helm.sh/helm/v3/cmd/helm >/dev/null

# KubeRay's operator, for the cluster tier's RayCluster (run as a local process: hack/kuberay-up.sh)
build kuberay "$kuberay_v" "$here/tools/kuberay" "" github.com/ray-project/kuberay/ray-operator >/dev/null

# A stable path for the rest of the tooling: bin/current -> the versioned sets.
cur="$cache/bin/current"; mkdir -p "$cur"
for f in "$cache/bin/etcd-$etcd_v"/etcd "$cache/bin/kwok-$kwok_v"/* "$cache/bin/kubernetes-$k8s_v"/* "$cache/bin/kubernetes-node-$k8s_v"/* \
         "$cache/bin/helm-$helm_v-k8s1.$helm_k8s_minor"/helm "$cache/bin/kuberay-$kuberay_v"/ray-operator; do
  ln -sfn "$f" "$cur/$(basename "$f")"
done
echo "$cur"
