#!/usr/bin/env bash
# Builds the pinned control-plane binaries (kube-apiserver, kube-controller-manager, kube-scheduler,
# etcd, kwok) and kubectl from the Go module proxy into a cache outside the checkout, keyed by
# version, and prints the directory that holds them. A warm cache costs nothing.
#
#   tools/controlplane/build.sh            # build what is missing, print bin dir
#   COUNTERWEIGHT_CACHE=/path build.sh     # choose the cache root
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${COUNTERWEIGHT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/counterweight}
bin="$cache/controlplane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"
mkdir -p "$bin"

# Strip symbols: the tests never debug these, and it halves link time and size.
build() { # module-dir output package ldflags
  local dir=$1 out=$2 pkg=$3 ldflags=$4
  if [ -x "$bin/$out" ]; then return 0; fi
  echo "building $out from $pkg ..." >&2
  local start=$SECONDS
  (cd "$here/$dir" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w $ldflags" -o "$bin/$out.tmp" "$pkg")
  mv "$bin/$out.tmp" "$bin/$out"
  echo "built $out in $((SECONDS - start))s" >&2
}

# Kubernetes reads its version from ldflags; without them it reports v0.0.0 and
# clients that check the server version misbehave.
kver="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"

build etcd etcd go.etcd.io/etcd/server/v3 ""
build kwok kwok sigs.k8s.io/kwok/cmd/kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
build kubernetes kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kver"
build kubernetes kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$kver"
build kubernetes kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$kver"
# kubectl at the same version (version skew policy: exact match is always
# supported). The manifests e2e test renders the Kustomize tree with
# `kubectl kustomize` (embedded kustomize v5) and applies it with it. Last,
# so that it reuses the packages the control-plane builds left in the Go
# build cache (client-go, apimachinery, component-base).
build kubernetes kubectl k8s.io/kubernetes/cmd/kubectl "$kver"

echo "$bin"
