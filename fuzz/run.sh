#!/usr/bin/env bash
# Runs each fuzz target for FUZZ_SECONDS (default 60; FUZZ_TIMEOUT, default 10, is how long one input
# may take before it is reported: raise it on a loaded machine), one after the other on one core, starting
# from the committed corpus/<target>/, in one process (libFuzzer's default: one core; -jobs=N would
# spawn workers logging to fuzz-N.log instead); new inputs go to work/<target>/ (not committed), crashes to
# artifacts/<target>/. Prints one line per target: seconds, executions, crashes. Exits non-zero
# if any target found a crash.
#
#   fuzz/run.sh                 every target, FUZZ_SECONDS each
#   fuzz/run.sh usage dates     only these
#   fuzz/run.sh seed            rebuild the seeds (seeds.py) and minimize them into corpus/
#   fuzz/run.sh cmin            minimize corpus/ plus work/ back into corpus/
#
# Needs a nightly toolchain and cargo-fuzz:
#   rustup toolchain install nightly --profile minimal && cargo install cargo-fuzz
# Without them, `cargo test --no-default-features` in fuzz/ runs the corpus through the same
# checks on stable.
set -euo pipefail
cd "$(dirname "$0")"
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
TOOLCHAIN="${FUZZ_TOOLCHAIN:-nightly}"
ALL=(signals_headers signals_body config estimate usage dates rls_answer)

fuzz() { cargo "+$TOOLCHAIN" fuzz "$@"; }

minimize() { # target, source folders...
    local target="$1"; shift
    local fresh="work/cmin-$target"
    rm -rf "$fresh" && mkdir -p "$fresh" "corpus/$target"
    fuzz run -O "$target" "$fresh" "$@" -- -set_cover_merge=1 -timeout=10 >"work/cmin-$target.log" 2>&1
    rm -rf "corpus/$target" && mv "$fresh" "corpus/$target"
    echo "$target: $(ls "corpus/$target" | wc -l) inputs, $(du -sk "corpus/$target" | cut -f1) KiB"
}

mkdir -p work
case "${1:-}" in
seed)
    python3 seeds.py
    fuzz build -O
    for t in "${ALL[@]}"; do minimize "$t" "seeds/$t" "corpus/$t"; done
    exit 0
    ;;
cmin)
    fuzz build -O
    for t in "${ALL[@]}"; do minimize "$t" "corpus/$t" "work/$t"; done
    exit 0
    ;;
esac

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${ALL[@]}")
fuzz build -O
failed=0
for t in "${targets[@]}"; do
    mkdir -p "work/$t" "corpus/$t" "artifacts/$t"
    log="work/$t.log"
    status=0
    fuzz run -O "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$FUZZ_SECONDS" -timeout="${FUZZ_TIMEOUT:-10}" -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | awk '{print $5}' | tail -1 || true)
    crashes=$(ls "artifacts/$t" | wc -l)
    printf '%-16s %6ss %12s execs  %s artifact(s)  exit %s  (log: fuzz/%s)\n' \
        "$t" "${secs:-<=$FUZZ_SECONDS}" "${runs:-?}" "$crashes" "$status" "$log"
    [ "$status" -ne 0 ] && failed=1
done
exit "$failed"
