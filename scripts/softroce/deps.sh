#!/usr/bin/env bash
# Installs what the rdma feature build and the soft-RoCE suite need on Debian 12 (root).
# Build: cmake, clang, libclang-dev (sideway builds rdma-core-mummy with cmake and bindgen).
# Suite: qemu, busybox, iproute2 (ip, rdma), perftest (ib_write_bw), rdma-core userspace (rxe).
set -euo pipefail
pkgs="cmake clang libclang-dev qemu-system-x86 busybox-static kmod iproute2 cpio
      ibverbs-utils ibverbs-providers libibverbs1 rdmacm-utils perftest"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "${FERRY_SOFTROCE_NO_APT:-0}" = 1 ]; then
        echo "deps: missing packages:$missing (FERRY_SOFTROCE_NO_APT=1)" >&2
        exit 1
    fi
    echo "deps: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
