#!/usr/bin/env bash
# Builds the pinned node binaries (kubelet, kube-proxy) from the same k8s.io/kubernetes wrapper
# module as the API server into the cache that tools/controlplane/build.sh uses, keyed by version,
# and makes sure the container runtime is installed: Debian's containerd, runc,
# containernetworking-plugins (bridge, host-local, loopback, portmap), iptables, conntrack and
# busybox-static. Prints the directory that holds kubelet and kube-proxy. A warm cache costs nothing.
#
#   tools/controlplane/node.sh             # build/install what is missing, print bin dir
#   COUNTERWEIGHT_CACHE=/path node.sh      # choose the cache root
#
# Why Debian's runtime and not containerd v2 from the Go module proxy: Debian ships security
# updates for it, it costs no build (containerd v2 takes ~140 s here), and kubelet 1.36 still
# accepts containerd 1.6 (README.md, "Real nodes").
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${COUNTERWEIGHT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/counterweight}
bin="$cache/node/k8s-$K8S_VERSION"
mkdir -p "$bin"

# The runtime comes from the distribution's packages.
need=()
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
command -v iptables >/dev/null || need+=(iptables)
command -v conntrack >/dev/null || need+=(conntrack)
[ -x /bin/busybox ] || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing ${need[*]} from Debian's packages ..." >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
    # The harness starts containerd itself, inside the namespaces of each cluster; the
    # package's own service would hold /run/containerd on the host.
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
      systemctl disable --now containerd >/dev/null 2>&1 || true
    fi
  else
    echo "missing ${need[*]}: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
fi

build() { # output package ldflags
  local out=$1 pkg=$2 ldflags=$3
  if [ -x "$bin/$out" ]; then return 0; fi
  echo "building $out from $pkg ..." >&2
  local start=$SECONDS
  (cd "$here/kubernetes" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w $ldflags" -o "$bin/$out.tmp" "$pkg")
  mv "$bin/$out.tmp" "$bin/$out"
  echo "built $out in $((SECONDS - start))s" >&2
}

kver="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"

build kubelet k8s.io/kubernetes/cmd/kubelet "$kver"
build kube-proxy k8s.io/kubernetes/cmd/kube-proxy "$kver"

echo "$bin"
