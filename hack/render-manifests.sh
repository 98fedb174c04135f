#!/usr/bin/env bash
# Render manifests/base from the Helm chart (one source): `helm template` with the chart's
# default values, one file per chart template (no Helm hooks), for kustomize and Argo CD users. Run by
# `make crds`; tests/integration/test_chart.py fails when the committed files drift.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
helm=${RLOPS_HELM:-$(bash "$root/hack/build-binaries.sh")/helm}
out=${1:-$root/manifests/base}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$helm" template rlops "$root/charts/rlops" --namespace rlops-system --no-hooks --output-dir "$tmp" >/dev/null
for f in "$tmp"/rlops/templates/*.yaml; do
  name=$(basename "$f")
  {
    echo "# Generated from charts/rlops/templates/$name by hack/render-manifests.sh (make crds):"
    echo "# edit the chart, not this file."
    grep -v '^# Source: ' "$f"
  } >"$out/$name"
  echo "wrote $out/$name"
done
