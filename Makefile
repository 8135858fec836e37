# The two commands: `make demo` (Envoy + mock provider + traffic) and `make test` (every test).
WASM := target/wasm32-wasip1/release/llm_ratelimit.wasm
# The wasm features rustc's wasm32-wasip1 target emits, which Envoy's V8 runs.
WASM_FEATURES := --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int \
	--enable-mutable-globals --enable-multivalue --enable-reference-types
MOCK := target/release/mock-provider

.PHONY: demo test build setup bench clean rls fuzz soak

demo: setup build
	python3 scripts/demo.py $(DEMO_ARGS)

test: build
	scripts/setup.sh --test
	cargo test --workspace -- --test-threads=1
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
		cargo test --lib --target wasm32-unknown-unknown

build: setup
	cargo build --release --target wasm32-wasip1 -p llm-ratelimit
	@# Binaryen's size pass takes about a fifth off what rustc leaves (setup.sh installs it).
	@# Flattening and re-looping first, then -Oz to a fixed point, takes ~5.5 KB more than one -Oz.
	@if command -v wasm-opt >/dev/null; then wasm-opt -Oz --flatten --rereloop -Oz --merge-similar-functions -Oz --converge $(WASM_FEATURES) $(WASM) -o $(WASM).opt && mv $(WASM).opt $(WASM); \
	 else echo "==> wasm-opt not found: the .wasm is not size-optimized"; fi
	cargo build --release -p mock-provider -p llm-ratelimit-rls
	@ls -l $(WASM) | awk '{printf "==> %s: %d bytes\n", $$9, $$5}'

setup:
	@scripts/setup.sh

clean:
	cargo clean

# Envoy without a rate-limit filter vs Envoy's native local_ratelimit vs ours; writes BENCHMARKS.md.
bench: build
	bench/install-tools.sh
	python3 bench/run.py
	python3 bench/ablation.py
	python3 bench/ablation.py --tokens --together --append

# The rate limit service (rls/): one limit across many Envoy instances, over Redis.
rls:
	cargo build --release -p llm-ratelimit-rls

# libFuzzer on every parser that sees outside input (needs nightly and cargo-fuzz:
# `rustup toolchain install nightly --profile minimal && cargo install cargo-fuzz`);
# FUZZ_SECONDS per target, default 60. Results: fuzz/RESULTS.md.
fuzz:
	fuzz/run.sh

# Envoy + mock provider under mixed traffic for SOAK_MINUTES (default 10): fails on RSS growth
# over 5% after warm-up, a queue left non-empty, a VM failure or panic, or a lost request.
# Writes reliability/soak.csv, soak.png, soak-summary.md (see RELIABILITY.md).
SOAK_MINUTES ?= 10
soak: build
	SOAK_MINUTES=$(SOAK_MINUTES) python3 scripts/soak.py
