#!/usr/bin/env bash
# Stop KubeRay's operator (hack/kuberay-up.sh). Its CRDs and RayClusters stay with the cluster.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
stop_bg kuberay
