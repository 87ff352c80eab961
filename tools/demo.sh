#!/usr/bin/env bash
# Counterweight's demo in one command (README.md, "Quickstart"): builds what
# it needs, then runs counterweight-demo: two local clusters, the webhook and
# the controller of each as local processes, a sample EMS, and a live
# handover from east to west.
#
#   tools/demo.sh            # live view until Ctrl-C
#   tools/demo.sh --once     # exit 0 after the handover (CI, scripts)
#
# With --real-nodes (root): two real-node clusters (containerd, kubelet,
# kube-proxy) and a witness, installed with README.md's "Install on two
# clusters" commands, everything in pods from tools/images.sh's images;
# PostgreSQL rows written on east are read back on west after the handover.
#
#   sudo tools/demo.sh --real-nodes          # live view until Ctrl-C
#   sudo tools/demo.sh --real-nodes --once   # exit 0 once the rows are back
set -euo pipefail
cd "$(dirname "$0")/.."

real=false
for a in "$@"; do
  [ "$a" = --real-nodes ] && real=true
done

command -v go >/dev/null || { echo "Go is required to build the local control planes; install Go >= 1.26" >&2; exit 1; }
command -v cargo >/dev/null || { echo "Rust (cargo) is required; install it with rustup" >&2; exit 1; }

echo "==> control-plane binaries (cached under ~/.cache/counterweight; the first build takes about 6 minutes)" >&2
COUNTERWEIGHT_CONTROLPLANE_BIN=$(tools/controlplane/build.sh)
export COUNTERWEIGHT_CONTROLPLANE_BIN

if $real; then
  [ "$(id -u)" = 0 ] || { echo "--real-nodes needs root (network and mount namespaces, cgroups, containerd): sudo tools/demo.sh --real-nodes" >&2; exit 1; }
  # As tools/test.sh: kubelet and kube-proxy from the same module, Debian's
  # containerd, runc and CNI plugins; then the images the overlays name.
  echo "==> node binaries and container runtime (cached under ~/.cache/counterweight)" >&2
  COUNTERWEIGHT_NODE_BIN=$(tools/controlplane/node.sh)
  export COUNTERWEIGHT_NODE_BIN
  # A COUNTERWEIGHT_IMAGES already set names archives made before (tools/images.sh's directory).
  if [ -z "${COUNTERWEIGHT_IMAGES:-}" ]; then
    echo "==> the images (cached under ~/.cache/counterweight/images; the first build takes about 30 minutes)" >&2
    COUNTERWEIGHT_IMAGES=$(tools/images.sh)
  fi
  export COUNTERWEIGHT_IMAGES
  echo "==> cargo build (cw-certs, cwctl, controller: the guide runs them; demo)" >&2
  cargo build --locked -p counterweight-certs -p counterweight-cli -p counterweight-controller -p counterweight-demo
else
  echo "==> cargo build (controller, webhook, gate, cwctl, demo)" >&2
  cargo build --locked -p counterweight-controller -p counterweight-webhook -p counterweight-gate -p counterweight-cli -p counterweight-demo
fi

# cargo run replaces itself with the demo, so Ctrl-C reaches the demo,
# which stops everything it started.
exec cargo run --locked -q -p counterweight-demo -- "$@"
