//go:build tools

// Package tools pins the Kubernetes control-plane commands that the
// Counterweight e2e tests run. Nothing here is product code.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
