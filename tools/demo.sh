#!/usr/bin/env bash
# Counterweight's demo in one command (README.md, "Quickstart"): builds what
# it needs, then runs counterweight-demo: two local clusters, the webhook and
# the controller of each as local processes, a sample EMS, and a live
# handover from east to west.
#
#   tools/demo.sh            # live view until Ctrl-C
#   tools/demo.sh --once     # exit 0 after the handover (CI, scripts)
set -euo pipefail
cd "$(dirname "$0")/.."

command -v go >/dev/null || { echo "Go is required to build the local control planes; install Go >= 1.26" >&2; exit 1; }
command -v cargo >/dev/null || { echo "Rust (cargo) is required; install it with rustup" >&2; exit 1; }

echo "==> control-plane binaries (cached under ~/.cache/counterweight; the first build takes about 6 minutes)" >&2
COUNTERWEIGHT_CONTROLPLANE_BIN=$(tools/controlplane/build.sh)
export COUNTERWEIGHT_CONTROLPLANE_BIN

echo "==> cargo build (controller, webhook, gate, cwctl, demo)" >&2
cargo build --locked -p counterweight-controller -p counterweight-webhook -p counterweight-gate -p counterweight-cli -p counterweight-demo

# cargo run replaces itself with the demo, so Ctrl-C reaches the demo,
# which stops everything it started.
exec cargo run --locked -q -p counterweight-demo -- "$@"
