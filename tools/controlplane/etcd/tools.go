//go:build tools

// Package tools pins the etcd server that backs each test cluster.
package tools

import _ "go.etcd.io/etcd/server/v3"
