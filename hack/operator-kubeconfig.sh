#!/usr/bin/env bash
# Write a kubeconfig that authenticates as the rlops-operator ServiceAccount (a bound token
# from the TokenRequest API), so the locally run operator has exactly the RBAC a Deployment
# would. Prints its path.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
out="$clusterdir/operator.kubeconfig"
token=$(kubectl -n rlops-system create token rlops-operator --duration=48h)
kubectl config view --raw --minify --flatten > "$out.tmp"
admin=$(KUBECONFIG="$out.tmp" kubectl config view -o jsonpath='{.users[0].name}')
KUBECONFIG="$out.tmp" kubectl config unset "users.$admin" >/dev/null
KUBECONFIG="$out.tmp" kubectl config set-credentials rlops-operator --token="$token" >/dev/null
KUBECONFIG="$out.tmp" kubectl config set-context --current --user=rlops-operator >/dev/null
chmod 600 "$out.tmp" && mv "$out.tmp" "$out"
echo "$out"
