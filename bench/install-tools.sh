#!/usr/bin/env bash
# Installs the benchmark's load generators if they are missing; idempotent and quiet when done.
#   wrk  (Debian package)  closed-loop maximum throughput
#   oha  (crates.io)       open-loop fixed-rate latency with coordinated-omission correction
# Envoy, the Rust targets, the .wasm and the mock provider come from `make build` (scripts/setup.sh).
set -euo pipefail
OHA_VERSION=1.16.0

step() { printf '==> %s\n' "$*"; }

if ! command -v wrk >/dev/null; then
  step "installing wrk (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
fi

oha_bin() { command -v oha 2>/dev/null || { [ -x "$HOME/.cargo/bin/oha" ] && echo "$HOME/.cargo/bin/oha"; } || true; }
have=$("$(oha_bin)" --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$OHA_VERSION" ]; then
  step "installing oha $OHA_VERSION (cargo install; compiles for several minutes once)"
  cargo install --quiet --locked oha --version "$OHA_VERSION"
fi
