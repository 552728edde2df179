#!/usr/bin/env bash
# ctd demo: builds ctd (unless $CTD_BIN names a binary), creates two network
# namespaces joined by a veth, attaches ctd to one end, sends TCP, UDP and
# ICMP traffic in both address families, prints the conntrack table, shows
# identity-aware policy at work (ipcache, default deny, an allow rule), the
# live event stream, the maps and the counters, and removes everything it
# created, also when a step fails.
#
#   A (ctd0: 198.51.100.1/24, fd00:c7d::1/64)  <-- veth -->  B (ctd1: 198.51.100.2/24, fd00:c7d::2/64)
#   ctd attached to ctd0, ingress and egress
#
# Needs root. Run as `make demo` (installs the system packages first).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" -ne 0 ]; then
	echo "demo.sh: needs root (network namespaces, tc, bpffs): run it as root, e.g. sudo make demo" >&2
	exit 1
fi
for tool in ip nsenter ping socat ss; do
	if ! command -v "$tool" >/dev/null; then
		echo "demo.sh: $tool not found: run 'make deps' (or 'make demo', which does)" >&2
		exit 1
	fi
done

suffix=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
NS_A=ctd-demo-a-$suffix
NS_B=ctd-demo-b-$suffix
PIN=/sys/fs/bpf/ctd-demo-$suffix
TMP=$(mktemp -d /tmp/ctd-demo-XXXXXXXX)
PIDS=()

cleanup() {
	local rc=$?
	set +e
	for pid in "${PIDS[@]}"; do
		kill "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	if [ -n "${CTD:-}" ] && [ -e "$PIN" ]; then
		in_a "$CTD" --pin-path "$PIN" teardown >/dev/null
	fi
	ip netns del "$NS_A" 2>/dev/null
	ip netns del "$NS_B" 2>/dev/null
	# Only if teardown could not run: nothing else lives there.
	[ -e "$PIN" ] && rm -rf "$PIN"
	rm -rf "$TMP"
	if [ "$rc" -ne 0 ]; then
		echo "demo failed (exit $rc); everything it created has been removed" >&2
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_a() { nsenter --net="/var/run/netns/$NS_A" -- "$@"; }
in_b() { nsenter --net="/var/run/netns/$NS_B" -- "$@"; }
step() { printf '\n== %s\n' "$*"; }

if [ -n "${CTD_BIN:-}" ]; then
	CTD=$(realpath "$CTD_BIN")
else
	step "building ctd"
	go build -o "$TMP/ctd" ./cmd/ctd
	CTD=$TMP/ctd
fi
ctd() { in_a "$CTD" --pin-path "$PIN" --state-dir "$TMP/state" "$@"; }

step "creating namespaces $NS_A and $NS_B joined by a veth"
ip netns add "$NS_A"
ip netns add "$NS_B"
ip -n "$NS_A" link add ctd0 type veth peer name ctd1 netns "$NS_B"
ip -n "$NS_A" addr add 198.51.100.1/24 dev ctd0
ip -n "$NS_A" addr add fd00:c7d::1/64 dev ctd0 nodad
ip -n "$NS_B" addr add 198.51.100.2/24 dev ctd1
ip -n "$NS_B" addr add fd00:c7d::2/64 dev ctd1 nodad
for ns in "$NS_A" "$NS_B"; do
	ip -n "$ns" link set lo up
done
ip -n "$NS_A" link set ctd0 up
ip -n "$NS_B" link set ctd1 up

step "ctd attach --iface ctd0 (pin path $PIN)"
ctd attach --iface ctd0

step "ctd ipcache add: B is identity 42"
ctd ipcache add 198.51.100.2/32 id=42
ctd ipcache add fd00:c7d::2/128 id=42

step "ctd monitor -o json, in the background"
# nsenter execs ctd, so $! is monitor itself (a shell function run in the
# background would be a subshell, and killing it would leave monitor running).
nsenter --net="/var/run/netns/$NS_A" -- "$CTD" --pin-path "$PIN" monitor -o json >"$TMP/monitor.json" 2>"$TMP/monitor.err" &
MONITOR=$!
PIDS+=("$MONITOR")
for i in $(seq 50); do
	grep -q streaming "$TMP/monitor.err" 2>/dev/null && break
	[ "$i" -eq 50 ] && { echo "demo.sh: ctd monitor did not start: $(cat "$TMP/monitor.err")" >&2; exit 1; }
	sleep 0.1
done

step "starting TCP and UDP echo servers (socat) in both namespaces"
for ns in "$NS_A" "$NS_B"; do
	nsenter --net="/var/run/netns/$ns" -- socat TCP6-LISTEN:8080,ipv6only=0,reuseaddr,fork EXEC:cat &
	PIDS+=($!)
	nsenter --net="/var/run/netns/$ns" -- socat UDP6-RECVFROM:5353,ipv6only=0,fork EXEC:cat &
	PIDS+=($!)
done
for ns in "$NS_A" "$NS_B"; do
	for i in $(seq 100); do
		if [ "$(nsenter --net="/var/run/netns/$ns" -- ss -Hltun '( sport = :8080 or sport = :5353 )' | wc -l)" -ge 2 ]; then
			break
		fi
		[ "$i" -eq 100 ] && { echo "demo.sh: echo servers in $ns did not start" >&2; exit 1; }
		sleep 0.1
	done
done

# tcp_echo SRC_NS DST: one TCP connection with bash's /dev/tcp: send a line,
# read the echo, close.
tcp_echo() {
	nsenter --net="/var/run/netns/$1" -- bash -c '
		exec 3<>"/dev/tcp/$1/8080"
		echo "hello over tcp to $1" >&3
		IFS= read -r -t 5 reply <&3
		exec 3<&- 3>&-
		echo "  tcp  -> $1:8080 echoed: $reply"' _ "$2"
}

# udp_echo SRC_NS DST: one datagram there, one back.
udp_echo() {
	local reply
	reply=$(echo "hello over udp to $2" | nsenter --net="/var/run/netns/$1" -- socat -t 0.5 - "UDP:$3:5353")
	echo "  udp  -> $2:5353 echoed: $reply"
}

step "traffic: TCP, UDP and ICMP echo, IPv4 and IPv6, A -> B and B -> A"
tcp_echo "$NS_A" 198.51.100.2
tcp_echo "$NS_A" fd00:c7d::2
tcp_echo "$NS_B" 198.51.100.1
udp_echo "$NS_A" 198.51.100.2 198.51.100.2
udp_echo "$NS_A" fd00:c7d::2 '[fd00:c7d::2]'
udp_echo "$NS_B" fd00:c7d::1 '[fd00:c7d::1]'
in_a ping -n -q -c 3 -i 0.2 -W 2 198.51.100.2 | sed -n 's/^/  /; /packets transmitted/p'
in_b ping -n -q -c 2 -i 0.2 -W 2 fd00:c7d::1 | sed -n 's/^/  /; /packets transmitted/p'
sleep 0.3 # let the last FIN/ACK pass

step "ctd ct list"
ctd ct list

step "ctd ct list -o json --proto udp"
ctd ct list -o json --proto udp

# try_tcp SRC_NS DST: a new TCP connection that may be dropped.
try_tcp() {
	if nsenter --net="/var/run/netns/$1" -- timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/8080"' "$2" 2>/dev/null; then
		echo "  tcp  -> $2:8080 connected"
	else
		echo "  tcp  -> $2:8080 dropped (no answer within 2 s)"
	fi
}

step "ctd policy default ingress deny: A is protected"
ctd policy default ingress deny
tcp_echo "$NS_A" 198.51.100.2
try_tcp "$NS_B" 198.51.100.1

step "ctd policy add ingress id=42 tcp/8080 allow"
ctd policy add ingress id=42 tcp/8080 allow
try_tcp "$NS_B" 198.51.100.1
ctd policy list

step "ctd monitor -o json: the first events it streamed, and the policy drop"
sleep 0.3
head -n 4 "$TMP/monitor.json"
grep -m 1 '"type":"drop"' "$TMP/monitor.json"

step "ctd status"
ctd status

step "ctd maps"
ctd maps

step "ctd metrics"
ctd metrics

step "ctd teardown"
ctd teardown

step "ctd monitor exits by itself once its datapath is torn down"
for i in $(seq 30); do
	kill -0 "$MONITOR" 2>/dev/null || break
	[ "$i" -eq 30 ] && { echo "demo.sh: ctd monitor still runs after the teardown" >&2; exit 1; }
	sleep 0.1
done
tail -n 1 "$TMP/monitor.err"
