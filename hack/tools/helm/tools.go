//go:build tools

// Package tools pins helm.sh/helm/v3 so that `go build helm.sh/helm/v3/cmd/helm`
// resolves from this module's go.mod / go.sum.
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
