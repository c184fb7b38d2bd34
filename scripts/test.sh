#!/usr/bin/env bash
# Ferry's whole test suite, on a bare Debian 12 machine of this kind (root). Installs what it
# needs, then: format check, clippy (deny warnings), docs, all tests, fuzz targets built and
# smoke-run, and the soft-RoCE suite inside qemu.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { printf '\n=== %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

step "dependencies"
scripts/install-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

step "cargo test"
cargo test --workspace --no-fail-fast 2>&1 | tee /tmp/ferry-test.log
grep -q "test result" /tmp/ferry-test.log

step "fuzz targets (build + short run)"
if command -v cargo-fuzz >/dev/null 2>&1; then
    (cd fuzz && for t in wire_decode handshake_sequence control_decode exchange_decode session_sequence \
            recv_batch kvm_state_decode quick_image; do
        log="/tmp/ferry-fuzz-$t.log"
        if RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$t" -- -runs=200000 -max_len=4096 >"$log" 2>&1; then
            echo "$t: $(grep -E '^Done' "$log" || tail -1 "$log"), $(grep -oE 'cov: [0-9]+' "$log" | tail -1) edges"
        else
            echo "FUZZ FAILED: $t (full log $log); last lines:"
            tail -60 "$log"
            exit 1
        fi
    done)
else
    echo "SKIP: cargo-fuzz not installed (FERRY_SKIP_FUZZ=1)"
fi

if [[ -x scripts/softroce/run.sh ]]; then
    step "soft-RoCE suite (qemu)"
    scripts/softroce/run.sh
fi
step "all passed"
