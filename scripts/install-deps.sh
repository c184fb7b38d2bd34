#!/usr/bin/env bash
# Install what Ferry's benches and tests need on a bare Debian 12 machine (run as root).
# binutils: the KVM guest program is checked against its source (vmm-glue/src/kvm/guest.S).
# gcc, g++, make, cmake: aws-lc-sys (the AES-GCM, HKDF and TLS crypto) compiles AWS-LC from C; under a
# sanitizer (the fuzz targets' build) it must use its cmake build.
# Idempotent: installs only what is missing.
set -euo pipefail
need=()
for pkg in iperf3 iproute2 procps binutils gcc g++ make cmake libc6-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "install-deps: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v cargo-fuzz >/dev/null 2>&1 && [[ "${FERRY_SKIP_FUZZ:-0}" != 1 ]]; then
    echo "install-deps: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi
