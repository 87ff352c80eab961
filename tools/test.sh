#!/usr/bin/env bash
# The project's one test command (README.md, .ci/run): lint, then every test,
# unit to end-to-end, against real control planes built from pinned Go modules.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

command -v go >/dev/null || { echo "Go is required to build the test control planes; install Go >= 1.26" >&2; exit 1; }
command -v cargo >/dev/null || { echo "Rust (cargo) is required; install it with rustup" >&2; exit 1; }

# A real PostgreSQL backs the database checks; Debian packages it.
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  step "installing PostgreSQL from Debian's packages"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "PostgreSQL server binaries are missing: sudo apt-get install postgresql" >&2; exit 1
  fi
fi
# rsync (Debian's package) carries the file replication in the sync e2e.
if ! command -v rsync >/dev/null; then
  step "installing rsync from Debian's packages"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync >/dev/null
  else
    echo "rsync is missing: sudo apt-get install rsync" >&2; exit 1
  fi
fi

step "control-plane binaries (cached under ~/.cache/counterweight)"
COUNTERWEIGHT_CONTROLPLANE_BIN=$(tools/controlplane/build.sh)
export COUNTERWEIGHT_CONTROLPLANE_BIN

# Real nodes (tests/e2e/tests/real_node.rs): kubelet and kube-proxy from the same module,
# Debian's containerd, runc and CNI plugins. They need root; without it those tests skip.
step "node binaries and container runtime (cached under ~/.cache/counterweight)"
if [ "$(id -u)" = 0 ]; then
  COUNTERWEIGHT_NODE_BIN=$(tools/controlplane/node.sh)
  export COUNTERWEIGHT_NODE_BIN
elif COUNTERWEIGHT_NODE_BIN=$(tools/controlplane/node.sh); then
  export COUNTERWEIGHT_NODE_BIN
else
  echo "not root: the real-node tests will skip" >&2
fi

# Every image (tools/images.sh: OCI archives, static musl binaries; the sync images on Debian
# bookworm made with mmdebstrap), which the real-node tests import into each real node's
# containerd: the gate and sync-rsync (real_gate.rs, real_controller.rs) and all of them for the
# install from the manifests (real_install.rs). Cached; the first run compiles the gate for musl
# (about 6 minutes on 2 cores), the release binaries (about 20 more) and bootstraps Debian.
if [ -n "${COUNTERWEIGHT_NODE_BIN:-}" ] && [ "$(id -u)" = 0 ]; then
  step "the images (cached under ~/.cache/counterweight/images)"
  COUNTERWEIGHT_IMAGES=$(tools/images.sh)
  export COUNTERWEIGHT_IMAGES
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The e2e tests run these as real processes (webhook, cw-certs, gate, controller).
step "cargo build --bins"
cargo build --workspace --bins --locked

# CW_STRESS=N runs N CPU-burning loops beside the tests (not the builds), so
# the suite shows what it does on a busy machine: timing budgets must hold
# under load, and a test that needs a retry there is a failing test.
burners=()
stop_burners() { [ ${#burners[@]} -eq 0 ] || kill "${burners[@]}" 2>/dev/null || true; }
trap stop_burners EXIT
stress=${CW_STRESS:-0}
case "$stress" in
  ''|*[!0-9]*) echo "CW_STRESS must be a number of CPU-burning loops, not '$stress'" >&2; exit 2;;
esac
for _ in $(seq "$stress"); do
  sh -c 'while :; do :; done' &
  burners+=($!)
done
[ "$stress" -gt 0 ] && step "stress: $stress CPU-burning loops beside the tests"

step "cargo test"
cargo test --workspace --locked --no-fail-fast
stop_burners
burners=()

# The real-node tests make namespaces, veths, a bridge, cgroups and mounts outside their
# processes; their teardown must leave none (watchdogs finish within ~3 s of a killed test).
step "nothing left behind by the real-node tests"
left=""
for _ in $(seq 20); do
  left=$({
    ls /run/netns 2>/dev/null | grep '^cw' || true
    ls /run/counterweight/undo /run/counterweight/mnt 2>/dev/null | grep -v -e '^/' -e '^$' || true
    ls -d /sys/fs/cgroup/*/counterweight-* 2>/dev/null || true
    ip -o link show 2>/dev/null | grep -oE '^[0-9]+: cw[^:@]*' || true
  })
  [ -z "$left" ] && break
  sleep 0.5
done
if [ -n "$left" ]; then
  echo "left behind:" >&2
  echo "$left" >&2
  exit 1
fi

# The webhook under a flood of maximum-size bodies (webhook/tests/load.rs, issue 17): ordinary
# pod reviews keep p99 under 10 ms and the peak RSS stays under the Deployment's memory limit.
# It runs the binary the Deployment runs, a release build: the image's, when tools/images.sh
# made one above, else a host release build. A step of its own, after the burners have stopped:
# the flood it makes is its load, and beside CPU burners its p99 would measure the kernel's
# scheduler, not the webhook (README.md "Resource bounds" has the figures with CW_STRESS=2).
step "the webhook under load (release build)"
webhook_bin=$PWD/target/x86_64-unknown-linux-musl/release/counterweight-webhook
if [ -z "${COUNTERWEIGHT_IMAGES:-}" ] || [ ! -x "$webhook_bin" ]; then
  cargo build --release --locked -p counterweight-webhook --bin counterweight-webhook
  webhook_bin=$PWD/target/release/counterweight-webhook
fi
COUNTERWEIGHT_WEBHOOK_BIN=$webhook_bin \
  cargo test --locked -p counterweight-webhook --test load -- --ignored --nocapture
