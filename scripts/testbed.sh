#!/usr/bin/env bash
# Ferry's several-NIC testbed on one machine: two network namespaces ("hosts") joined by K veth
# pairs, each pair rate-limited with tc tbf on the egress of both ends, so "4 NICs of 500 Mbit/s"
# is real traffic through real kernel queues.
#
#   testbed.sh up        --name N --nics K --rate R[,R2,...]   create <N>-src and <N>-dst
#   testbed.sh set-rate  --name N --nic I --rate R             change one link's rate (both ends)
#   testbed.sh link-down --name N --nic I                      take one link down (both ends)
#   testbed.sh link-up   --name N --nic I                      bring it back
#   testbed.sh show      --name N                              links, addresses, qdiscs
#   testbed.sh down      --name N                              remove everything (idempotent)
#
# Addressing (inside 198.18.0.0/15, the benchmarking range): NIC I (0-based) is the interface
# `nicI` in both namespaces, 198.18.I.1/24 on the source side and 198.18.I.2/24 on the destination
# side. Nothing is created in the root namespace: the veth ends are created directly inside the
# namespaces, so eth0 and the root namespace's routes are never touched.
#
# Rates: tc-style bit rates (`500mbit`, `1gbit`, `2.5gbit`, `100000kbit`, `123bit`) or `none`
# (no limit). With fewer rates than NICs the last one repeats. tbf's bucket holds 4 ms of the rate
# (at least 64 KiB, so that a veth GSO packet of up to 64 KiB passes whole) and its queue 20 ms;
# measured with iperf3 this gives about 0.95 of the nominal rate.
#
# Run processes in a namespace with `ip netns exec <N>-src CMD...`.
set -Eeuo pipefail

PROG=testbed.sh
MAX_NICS=64

die() {
    echo "$PROG: $*" >&2
    exit 1
}

usage() {
    cat >&2 <<'EOF2'
usage: testbed.sh up        --name N --nics K --rate R[,R2,...]
       testbed.sh set-rate  --name N --nic I --rate R
       testbed.sh link-down --name N --nic I
       testbed.sh link-up   --name N --nic I
       testbed.sh show      --name N
       testbed.sh down      --name N
EOF2
    exit 2
}

# ---- argument checks -------------------------------------------------------------------------

check_name() {
    # Namespace names <name>-src/<name>-dst; keep them short and shell/ip safe.
    [[ "$1" =~ ^[a-z][a-z0-9]{0,11}$ ]] || die "bad --name '$1' (1-12 characters: a-z then a-z, 0-9)"
}

check_nic_count() {
    [[ "$1" =~ ^[0-9]+$ ]] && (($1 >= 1 && $1 <= MAX_NICS)) || die "bad --nics '$1' (1..$MAX_NICS)"
}

# Print a rate in bit/s (integer), or "none"; fail on anything else.
rate_bits() {
    local r=$1
    if [[ "$r" == none ]]; then
        echo none
        return
    fi
    [[ "$r" =~ ^([0-9]+(\.[0-9]+)?)(bit|kbit|mbit|gbit|tbit)$ ]] || die "bad rate '$r' (like 500mbit, 1gbit, 2.5gbit, or none)"
    local num=${BASH_REMATCH[1]} unit=${BASH_REMATCH[3]} mult
    case $unit in
        bit) mult=1 ;;
        kbit) mult=1000 ;;
        mbit) mult=1000000 ;;
        gbit) mult=1000000000 ;;
        tbit) mult=1000000000000 ;;
    esac
    local bits
    bits=$(awk -v n="$num" -v m="$mult" 'BEGIN { printf "%.0f", n * m }')
    ((bits >= 8000)) || die "rate '$r' is below 8kbit"
    echo "$bits"
}

ns_src() { echo "$NAME-src"; }
ns_dst() { echo "$NAME-dst"; }

ns_exists() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -qx -- "$1"
}

require_testbed() {
    ns_exists "$(ns_src)" && ns_exists "$(ns_dst)" || die "testbed '$NAME' is not up"
}

check_nic_index() {
    [[ "$1" =~ ^[0-9]+$ ]] && (($1 < MAX_NICS)) || die "bad --nic '$1'"
    ip -n "$(ns_src)" link show "nic$1" >/dev/null 2>&1 || die "testbed '$NAME' has no nic$1"
}

# ---- tbf -------------------------------------------------------------------------------------

# Apply (add or change) the rate limit of one interface in one namespace.
apply_rate() {
    local ns=$1 dev=$2 bits=$3
    # Delete and add, never `replace`: replacing a tbf under load stalls the link on this kernel
    # (a flow through it made no progress for minutes; measured with iperf3).
    tc -n "$ns" qdisc del dev "$dev" root 2>/dev/null || true
    if [[ "$bits" == none ]]; then
        return
    fi
    local bytes_per_s=$((bits / 8))
    # Bucket: 4 ms of traffic, at least 64 KiB + headers (one GSO packet), so tbf neither
    # throttles below the rate nor has to split GSO packets.
    local burst=$((bytes_per_s / 250))
    ((burst >= 66000)) || burst=66000
    # Queue: 20 ms at the rate beyond the bucket (latency-based limit).
    tc -n "$ns" qdisc add dev "$dev" root tbf rate "${bits}bit" burst "$burst" latency 20ms
}

# Wait (up to 5 s) until nic$1 is UP with carrier on both ends.
wait_carrier() {
    local try ns ok
    for try in $(seq 1 100); do
        ok=1
        for ns in "$(ns_src)" "$(ns_dst)"; do
            [[ $(ip -n "$ns" -o link show "nic$1") == *" state UP "* ]] || ok=0
        done
        ((ok == 1)) && return 0
        sleep 0.05
    done
    die "nic$1 of '$NAME' did not come up"
}

# ---- commands ----------------------------------------------------------------------------------

cmd_down() {
    local ns
    for ns in "$(ns_src)" "$(ns_dst)"; do
        if ns_exists "$ns"; then
            # Deleting a namespace destroys its veth ends (and so their peers).
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
    # Wait briefly until both names are gone (processes still inside keep a namespace alive, but
    # not its name).
    local i
    for i in $(seq 1 50); do
        if ! ns_exists "$(ns_src)" && ! ns_exists "$(ns_dst)"; then
            return 0
        fi
        sleep 0.1
    done
    die "could not remove the namespaces of '$NAME'"
}

cmd_up() {
    check_nic_count "$NICS"
    [[ -n "$RATES" ]] || die "up needs --rate"
    local src dst
    src=$(ns_src)
    dst=$(ns_dst)
    if ns_exists "$src" || ns_exists "$dst"; then
        die "testbed '$NAME' already exists (run: $PROG down --name $NAME)"
    fi
    local -a rates bits
    IFS=, read -r -a rates <<<"$RATES"
    ((${#rates[@]} >= 1)) || die "empty --rate"
    ((${#rates[@]} <= NICS)) || die "${#rates[@]} rates for $NICS NICs"
    local i last
    for ((i = 0; i < NICS; i++)); do
        if ((i < ${#rates[@]})); then
            last=$(rate_bits "${rates[$i]}")
        fi
        bits[i]=$last
    done

    # From here on, a failure (or a signal) removes what was made.
    UP_OK=0
    trap 'if [[ $UP_OK != 1 ]]; then echo "$PROG: setting up testbed $NAME failed; removing it" >&2; cmd_down || true; fi' EXIT
    trap 'exit 130' INT TERM
    ip netns add "$src"
    ip netns add "$dst"
    local ns
    for ns in "$src" "$dst"; do
        ip -n "$ns" link set lo up
        ip netns exec "$ns" sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 >/dev/null
    done
    for ((i = 0; i < NICS; i++)); do
        ip link add "nic$i" netns "$src" type veth peer name "nic$i" netns "$dst"
        ip -n "$src" addr add "198.18.$i.1/24" dev "nic$i"
        ip -n "$dst" addr add "198.18.$i.2/24" dev "nic$i"
        ip -n "$src" link set "nic$i" up
        ip -n "$dst" link set "nic$i" up
        apply_rate "$src" "nic$i" "${bits[$i]}"
        apply_rate "$dst" "nic$i" "${bits[$i]}"
    done
    # Wait until every link reports carrier on both ends, so that a caller can use it at once.
    for ((i = 0; i < NICS; i++)); do
        wait_carrier "$i"
    done
    UP_OK=1
    trap - EXIT INT TERM
    for ((i = 0; i < NICS; i++)); do
        echo "nic$i 198.18.$i.1 198.18.$i.2 ${bits[$i]}"
    done
}

cmd_set_rate() {
    require_testbed
    check_nic_index "$NIC"
    [[ -n "$RATES" ]] || die "set-rate needs --rate"
    local b
    b=$(rate_bits "$RATES")
    apply_rate "$(ns_src)" "nic$NIC" "$b"
    apply_rate "$(ns_dst)" "nic$NIC" "$b"
}

cmd_link() {
    require_testbed
    check_nic_index "$NIC"
    ip -n "$(ns_src)" link set "nic$NIC" "$1"
    ip -n "$(ns_dst)" link set "nic$NIC" "$1"
    if [[ $1 == up ]]; then
        wait_carrier "$NIC"
    fi
}

cmd_show() {
    require_testbed
    local ns
    for ns in "$(ns_src)" "$(ns_dst)"; do
        echo "== $ns"
        ip -n "$ns" -br addr show | grep -v '^lo ' || true
        tc -n "$ns" qdisc show | grep -v ' dev lo ' || true
    done
}

# ---- main --------------------------------------------------------------------------------------

(($# >= 1)) || usage
CMD=$1
shift
NAME="" NICS=1 RATES="" NIC=""
while (($# > 0)); do
    case $1 in
        --name) NAME=${2-}; shift 2 || die "--name needs a value" ;;
        --nics) NICS=${2-}; shift 2 || die "--nics needs a value" ;;
        --rate) RATES=${2-}; shift 2 || die "--rate needs a value" ;;
        --nic) NIC=${2-}; shift 2 || die "--nic needs a value" ;;
        -h | --help) usage ;;
        *) die "unknown argument '$1'" ;;
    esac
done
[[ -n "$NAME" ]] || die "--name is required"
check_name "$NAME"
[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, tc)"

case $CMD in
    up) cmd_up ;;
    down) cmd_down ;;
    set-rate) cmd_set_rate ;;
    link-down) cmd_link down ;;
    link-up) cmd_link up ;;
    show) cmd_show ;;
    *) die "unknown command '$CMD' (up, down, set-rate, link-down, link-up, show)" ;;
esac
