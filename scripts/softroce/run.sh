#!/usr/bin/env bash
# Soft-RoCE suite: boots a stock Debian kernel under qemu (TCG) with rdma_rxe, and inside it runs
# ib_write_bw (the reference), the rdma backend's conformance and fault tests, end-to-end live
# migrations of the synthetic guest through the product's MigrationServer listening on rdma and tcp
# at once (byte-identical over each; QP fault mid-migration), and our
# RDMA WRITE throughput at the same message size. Prints both throughputs side by side (table + JSON) and
# exits non-zero on any failure, on a missing result marker, or on timeout.
#
# Usage (root, Debian 12; installs what it needs with apt-get):
#   scripts/softroce/run.sh [--size BYTES] [--seconds N] [--iters N] [--timeout SECONDS]
#   (--seconds: one run of ours; --iters: ib_write_bw's message count; --rounds: alternating
#   runs of each, medians compared)
# Environment:
#   CARGO_TARGET_DIR          where cargo builds (default: <repo>/target)
#   FERRY_SOFTROCE_CACHE      kernel package cache (default: /var/cache/ferry-softroce)
#   FERRY_SOFTROCE_MIN_RATIO  fail if ours/ib_write_bw is below this (default 0: report only)
#   FERRY_SOFTROCE_NO_APT=1   do not run apt-get (everything already installed)
#   FERRY_SOFTROCE_TESTS      test name filter passed to the conformance binary (debugging)
#   FERRY_SOFTROCE_BASE_BW    another build's rdma_bw (e.g. main's, before a change): run in the
#                             same rounds as ours, reported beside it (before/after ratios)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
size=1048576
seconds=4
iters=40
rounds=5
tests="${FERRY_SOFTROCE_TESTS:-}"
timeout_s=330
while [ $# -gt 0 ]; do
    case "$1" in
        --size) size="$2"; shift 2 ;;
        --seconds) seconds="$2"; shift 2 ;;
        --iters) iters="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --timeout) timeout_s="$2"; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
min_ratio="${FERRY_SOFTROCE_MIN_RATIO:-0}"
cache="${FERRY_SOFTROCE_CACHE:-/var/cache/ferry-softroce}"
build="$here/build"
t0=$(date +%s)
log() { echo "softroce[$(( $(date +%s) - t0 ))s]: $*"; }

# ---- 1. packages ---------------------------------------------------------------------------
"$here/deps.sh"

# ---- 2. build the test binaries on the host ------------------------------------------------
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
log "building test binaries (feature rdma) in $CARGO_TARGET_DIR"
cd "$repo"
# The executables' paths from cargo's JSON messages (its human output may print them relative).
test_exe() {
    local out
    out=$(cargo test "$@" --no-run --message-format=json 2>/dev/null) || { cargo test "$@" --no-run; return 1; }
    echo "$out" | grep -o '"executable":"[^"]*"' | sed 's/"executable":"//; s/"$//' | tail -1
}
conf_bin=$(test_exe -p ferry-transport --features rdma --test conformance_rdma)
mig_bin=$(test_exe -p ferry-migrate --features rdma --test live_rdma)
cargo build -q -p ferry-transport --profile test --features rdma --example rdma_bw
bw_bin="$CARGO_TARGET_DIR/debug/examples/rdma_bw"
[ -x "$conf_bin" ] && [ -x "$mig_bin" ] && [ -x "$bw_bin" ] || { echo "test binaries not found ($conf_bin, $mig_bin, $bw_bin)" >&2; exit 1; }

# ---- 3. guest kernel (downloaded once, never installed on the host) ------------------------
mkdir -p "$cache" "$build"
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
[ -n "$kpkg" ] || kpkg=$(ls "$cache"/linux-image-*-amd64_*.deb 2>/dev/null | head -1 | xargs -r basename | cut -d_ -f1)
[ -n "$kpkg" ] || { echo "cannot determine the Debian kernel package" >&2; exit 1; }
deb=$(ls "$cache/${kpkg}"_*.deb 2>/dev/null | tail -1 || true)
if [ -z "$deb" ]; then
    log "downloading $kpkg"
    (cd "$cache" && apt-get download "$kpkg" >/dev/null)
    deb=$(ls "$cache/${kpkg}"_*.deb | tail -1)
fi
kver="${kpkg#linux-image-}"
kroot="$cache/root-$kver"
if [ ! -e "$kroot/.done" ]; then
    log "unpacking $(basename "$deb")"
    rm -rf "$kroot"; mkdir -p "$kroot"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$kroot" --wildcards './boot/vmlinuz-*' './lib/modules/*'
    touch "$kroot/.done"
fi
vmlinuz="$kroot/boot/vmlinuz-$kver"

# ---- 4. initramfs --------------------------------------------------------------------------
log "building initramfs"
ird="$build/initramfs"
rm -rf "$ird"
mkdir -p "$ird"/{bin,sbin,usr/bin,usr/sbin,etc/libibverbs.d,proc,sys,dev,tmp,run,tests,lib/modules/$kver}
cp /bin/busybox "$ird/bin/busybox"
for a in sh mount mkdir cat echo sleep grep awk sed cut tr head tail poweroff ln ls modprobe insmod timeout seq date kill wc sort printf env; do
    ln -sf busybox "$ird/bin/$a"
done
copy_with_libs() { # copy binaries and every library ldd lists, at the same paths
    for f in "$@"; do
        mkdir -p "$ird$(dirname "$f")"
        cp -L "$f" "$ird$f"
        ldd "$f" 2>/dev/null | grep -o '/[^ ]*' | while read -r l; do
            [ -e "$ird$l" ] || { mkdir -p "$ird$(dirname "$l")"; cp -L "$l" "$ird$l"; }
        done
    done
}
rxe_so=$(ls /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so | head -1)
copy_with_libs /usr/bin/ip /usr/bin/rdma /usr/bin/ib_write_bw /usr/bin/ibv_devinfo \
    /usr/lib/x86_64-linux-gnu/libibverbs.so.1 "$rxe_so"
cp /etc/libibverbs.d/rxe.driver "$ird/etc/libibverbs.d/"
cp "$conf_bin" "$ird/tests/conformance_rdma"
cp "$bw_bin" "$ird/tests/rdma_bw"
base_bw="${FERRY_SOFTROCE_BASE_BW:-}"
if [ -n "$base_bw" ]; then
    [ -x "$base_bw" ] || { echo "FERRY_SOFTROCE_BASE_BW=$base_bw is not an executable" >&2; exit 1; }
    cp "$base_bw" "$ird/tests/rdma_bw_base"
fi
cp "$mig_bin" "$ird/tests/live_rdma"
for b in "$conf_bin" "$mig_bin" "$bw_bin"; do # their libraries, at the host's paths
    ldd "$b" | grep -o '/[^ ]*' | while read -r l; do
        [ -e "$ird$l" ] || { mkdir -p "$ird$(dirname "$l")"; cp -L "$l" "$ird$l"; }
    done
done
# kernel modules: rdma_rxe and its dependencies, crc32_generic (used but not listed), dummy, veth
mods="rdma_rxe crc32_generic dummy veth"
kmod_dir="$kroot/lib/modules/$kver"
declare -A seen=()
modpath() { find "$kmod_dir/kernel" -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" | head -1; }
queue=($mods)
while [ ${#queue[@]} -gt 0 ]; do
    m="${queue[0]}"; queue=("${queue[@]:1}")
    [ -n "${seen[$m]:-}" ] && continue
    seen[$m]=1
    p=$(modpath "$m")
    [ -n "$p" ] || { echo "module $m not found in $kver" >&2; exit 1; }
    rel="${p#$kroot}"
    mkdir -p "$ird$(dirname "$rel")"
    cp "$p" "$ird$rel"
    for d in $(modinfo -F depends "$p" | tr ',' ' '); do queue+=("$d"); done
done
cp "$kmod_dir"/modules.{order,builtin,builtin.modinfo} "$ird/lib/modules/$kver/" 2>/dev/null || true
depmod -b "$ird" "$kver"
cat > "$ird/init" <<EOF
#!/bin/sh
SIZE=$size
SECS=$seconds
ITERS=$iters
ROUNDS=$rounds
EXPERIMENT="${FERRY_SOFTROCE_EXPERIMENT:-}"
TESTS="$tests"
EOF
cat >> "$ird/init" <<'EOF'
export PATH=/bin:/usr/bin:/sbin:/usr/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
finish() { echo "SOFTROCE_EXIT=$1"; sync; poweroff -f; sleep 5; }
fail() { echo "SOFTROCE_FAIL: $*"; finish 1; }
IP=/usr/bin/ip   # busybox has its own ip applet: use iproute2's by path
$IP link set lo up
modprobe dummy numdummies=0 || fail "modprobe dummy"
modprobe rdma_rxe || fail "modprobe rdma_rxe"
modprobe crc32_generic 2>/dev/null
$IP link add dummy0 type dummy || fail "dummy0"
$IP addr add 169.254.77.1/32 dev dummy0
$IP link set dummy0 up
/usr/bin/rdma link add rxe0 type rxe netdev dummy0 || fail "rdma link add"
sleep 1
GID=""
for i in 0 1 2 3 4 5; do
    g=$(cat /sys/class/infiniband/rxe0/ports/1/gids/$i 2>/dev/null)
    case "$g" in 0000:0000:0000:0000:0000:ffff:*) GID=$i; break ;; esac
done
[ -n "$GID" ] || fail "no IPv4 GID on rxe0"
echo "rxe0 ready, GID index $GID"
# Memory windows (type 1/2) and registration limits as the device reports them (issue 13 notes).
/usr/bin/ibv_devinfo -v -d rxe0 2>/dev/null | grep -i -E "max_mw|max_mr\b|max_mr_size|MEM_WINDOW" | sed 's/^/devinfo: /'

export FERRY_RDMA_DEVICE=rxe0 FERRY_RDMA_GID=$GID RUST_BACKTRACE=1
echo "=== rdma conformance and fault tests"
/tests/conformance_rdma --test-threads=1 --nocapture $TESTS
TRC=$?
echo "=== end-to-end live migration through the migration server (rdma and tcp listeners)"
/tests/live_rdma --test-threads=1 --nocapture $TESTS
MRC=$?
[ $MRC -eq 0 ] || TRC=$MRC
# Throughput: ib_write_bw (reference) and ours alternate, ROUNDS times each, same message size;
# the medians are compared (the host is shared: single runs under TCG are noisy).
ref_run() {
    ib_write_bw -d rxe0 -x $GID -s $SIZE -n $ITERS -t 16 --report_gbits > /tmp/ibw_srv.txt 2>&1 &
    SRV=$!
    sleep 1
    ib_write_bw -d rxe0 -x $GID -s $SIZE -n $ITERS -t 16 --report_gbits 169.254.77.1 > /tmp/ibw.txt 2>&1
    R=$?
    wait $SRV
    [ $R -eq 0 ] || { cat /tmp/ibw.txt; return 1; }
    awk -v s=$SIZE '$1==s {print $4}' /tmp/ibw.txt | tail -1
}
our_run() {
    /tests/rdma_bw --size $SIZE --seconds $SECS > /tmp/bw.txt 2>&1 || { cat /tmp/bw.txt; return 1; }
    grep '^{"bench":"rdma_bw"' /tmp/bw.txt | sed 's/.*"gbps":\([0-9.]*\).*/\1/'
}
median() { tr ' ' '\n' | grep . | sort -n | awk '{v[NR]=$1} END { if (NR == 0) print 0; else if (NR % 2) print v[(NR+1)/2]; else printf "%.6f\n", (v[NR/2]+v[NR/2+1])/2 }'; }
echo "=== throughput: ib_write_bw -s $SIZE -n $ITERS -t 16 vs rdma_bw --size $SIZE --seconds $SECS, $ROUNDS rounds"
REFS=""; OURS_L=""; BRC=0
for r in $(seq 1 $ROUNDS); do
    # ib_write_bw refuses to report when its clock calibration is noisy ("Correlation coefficient
    # r^2 < 0.9", seen under TCG on a loaded host): a run that fails is tried again, twice.
    v=$(ref_run) || v=$(ref_run) || v=$(ref_run) || { echo "$v"; fail "ib_write_bw failed"; }
    REFS="$REFS $v"
    w=$(our_run) || { echo "$w"; BRC=1; w=0; }
    OURS_L="$OURS_L $w"
    echo "round $r: ib_write_bw $v Gb/s, ferry rdma $w Gb/s"
done
if [ -n "$EXPERIMENT" ]; then # tuning runs (FERRY_SOFTROCE_EXPERIMENT=1), not part of the verdict
    for v in "FERRY_RDMA_POST_CHUNK=1" "FERRY_RDMA_BUSY_POLL=1" "FERRY_RDMA_INFLIGHT=16" "FERRY_RDMA_POST_CHUNK=1 FERRY_RDMA_BUSY_POLL=1" "X=1"; do
        echo "experiment $v: $(env $v /tests/rdma_bw --size $SIZE --seconds $SECS | grep '^{')"
    done
    echo "experiment ref: $(ref_run)"
fi
# Per-round memory windows: ours again, a round (windows invalidated and bound anew) every 16
# messages (16 MiB at the default size), as often as a migration's later rounds could end.
PR_L=""; BASE_L=""
for r in $(seq 1 $ROUNDS); do
    if [ -x /tests/rdma_bw_base ]; then
        w=$(/tests/rdma_bw_base --size $SIZE --seconds $SECS > /tmp/bwb.txt 2>&1 && grep '^{"bench":"rdma_bw"' /tmp/bwb.txt | sed 's/.*"gbps":\([0-9.]*\).*/\1/') || { cat /tmp/bwb.txt; BRC=1; w=0; }
        BASE_L="$BASE_L $w"
    fi
    w=$(/tests/rdma_bw --size $SIZE --seconds $SECS --round-batches 16 > /tmp/bwr.txt 2>&1 && grep '^{"bench":"rdma_bw"' /tmp/bwr.txt | sed 's/.*"gbps":\([0-9.]*\).*/\1/') || { cat /tmp/bwr.txt; BRC=1; w=0; }
    PR_L="$PR_L $w"
done
REF=$(echo $REFS | median)
OURS=$(echo $OURS_L | median)
PR=$(echo $PR_L | median)
PR_RATIO=$(awk -v a=$PR -v b=$REF 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "0" }')
RATIO=$(awk -v a=$OURS -v b=$REF 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "0" }')
echo "=== soft-RoCE throughput, message size $SIZE bytes (median of $ROUNDS)"
printf '%-22s %12s   %s\n' "what" "Gb/s" "samples"
printf '%-22s %12s   %s\n' "ib_write_bw" "$REF" "$REFS"
printf '%-22s %12s   %s\n' "ferry rdma (WRITE)" "$OURS" "$OURS_L"
printf '%-22s %12s\n' "ratio" "$RATIO"
printf '%-22s %12s   %s\n' "ferry rdma, round/16" "$PR" "$PR_L"
printf '%-22s %12s\n' "ratio round/16" "$PR_RATIO"
BASE_JSON=""
if [ -n "$BASE_L" ]; then
    BASE=$(echo $BASE_L | median)
    BASE_RATIO=$(awk -v a=$BASE -v b=$REF 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "0" }')
    printf '%-22s %12s   %s\n' "base rdma_bw" "$BASE" "$BASE_L"
    printf '%-22s %12s\n' "ratio base" "$BASE_RATIO"
    BASE_JSON=",\"base_rdma_gbps\":$BASE,\"ratio_base\":$BASE_RATIO"
fi
J_REFS=$(echo $REFS | tr ' ' ','); J_OURS=$(echo $OURS_L | tr ' ' ',')
echo "SOFTROCE_JSON={\"msg_bytes\":$SIZE,\"ib_write_bw_gbps\":$REF,\"ferry_rdma_gbps\":$OURS,\"ratio\":$RATIO,\"ferry_rdma_round16_gbps\":$PR,\"ratio_round16\":$PR_RATIO,\"ib_write_bw_samples\":[$J_REFS],\"ferry_rdma_samples\":[$J_OURS],\"tests_rc\":$TRC,\"bench_rc\":$BRC$BASE_JSON}"
RC=0
[ $TRC -eq 0 ] || RC=1
[ $BRC -eq 0 ] || RC=1
finish $RC
EOF
chmod +x "$ird/init"
(cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) > "$build/initramfs.cpio.gz"
log "initramfs $(du -h "$build/initramfs.cpio.gz" | cut -f1)"

# ---- 5. boot -------------------------------------------------------------------------------
console="$build/console.log"
log "booting $kver under qemu (TCG, 2 vCPUs), timeout ${timeout_s}s"
set +e
timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 2G -smp 2 \
    -kernel "$vmlinuz" -initrd "$build/initramfs.cpio.gz" \
    -append 'console=ttyS0 panic=-1 quiet' -nographic -no-reboot -nic none </dev/null 2>&1 | tee "$console"
qrc=${PIPESTATUS[0]}
set -e
marker=$(grep -a -o 'SOFTROCE_EXIT=[0-9]*' "$console" | tail -1 | cut -d= -f2)
json=$(grep -a -o 'SOFTROCE_JSON=.*' "$console" | tail -1 | cut -d= -f2- | tr -d '\r')
log "done (qemu rc $qrc)"
if [ -z "$marker" ]; then
    echo "softroce: FAILED: no SOFTROCE_EXIT marker (qemu rc $qrc; timeout is rc 124)" >&2
    exit 1
fi
[ -n "$json" ] && echo "softroce result: $json"
if [ "$marker" != 0 ]; then
    echo "softroce: FAILED (SOFTROCE_EXIT=$marker)" >&2
    exit 1
fi
if [ -n "$json" ] && [ "$min_ratio" != 0 ]; then
    ratio=$(echo "$json" | sed 's/.*"ratio":\([0-9.]*\).*/\1/')
    if awk -v r="$ratio" -v m="$min_ratio" 'BEGIN { exit !(r < m) }'; then
        echo "softroce: FAILED: throughput ratio $ratio below $min_ratio" >&2
        exit 1
    fi
fi
echo "softroce: PASSED in $(( $(date +%s) - t0 ))s"
