//go:build tools

// Package tools pins KubeRay's operator (github.com/ray-project/kuberay/ray-operator) so that
// `go build github.com/ray-project/kuberay/ray-operator` resolves from this module's go.mod /
// go.sum. The cluster tier runs it against the local control plane (hack/kuberay-up.sh).
package tools

import (
	_ "github.com/ray-project/kuberay/ray-operator"
)
