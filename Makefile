# The two commands: `make demo` (Envoy + mock provider + traffic) and `make test` (every test).
WASM := target/wasm32-wasip1/release/llm_ratelimit.wasm
MOCK := target/release/mock-provider

.PHONY: demo test build setup bench clean

demo: setup build
	python3 scripts/demo.py

test: build
	scripts/setup.sh --test
	cargo test --workspace --all-targets -- --test-threads=1
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
		cargo test --lib --target wasm32-unknown-unknown

build: setup
	cargo build --release --target wasm32-wasip1 -p llm-ratelimit
	cargo build --release -p mock-provider
	@ls -l $(WASM) | awk '{printf "==> %s: %d bytes\n", $$9, $$5}'

setup:
	@scripts/setup.sh

clean:
	cargo clean

# Envoy without a rate-limit filter vs Envoy's native local_ratelimit vs ours; writes BENCHMARKS.md.
bench: build
	bench/install-tools.sh
	python3 bench/run.py
