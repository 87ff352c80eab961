//go:build tools

// Package tools pins KWOK, which plays the nodes and kubelets of the test
// clusters: pods scheduled to its fake nodes become Running and Ready.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
