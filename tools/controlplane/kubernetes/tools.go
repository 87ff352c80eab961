//go:build tools

// Package tools pins the Kubernetes control-plane and node commands (and kubectl) that the
// Counterweight e2e tests run. Nothing here is product code.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	// kubectl renders the manifests (`kubectl kustomize`) and applies them in
	// the e2e tests; built here so it matches the apiserver's version exactly.
	_ "k8s.io/kubernetes/cmd/kubectl"
	// The real-node e2e tests run a kubelet and kube-proxy at the same version
	// (tools/controlplane/node.sh).
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
