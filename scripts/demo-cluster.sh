#!/usr/bin/env bash
# ctd cluster demo: a three-member etcd and three nodes on this machine.
# Builds ctd (unless $CTD_BIN names a binary) and a small etcd runner
# (three embedded etcd members, test/etcdtest/cmd/etcdcluster), creates
# three network namespaces joined by a bridge (the nodes), runs `ctd daemon
# --kvstore-endpoints ...` in each, and shows cluster mode at work:
# identities allocated for the cluster, endpoints seen by every node, a
# cluster write reaching every node, a cluster policy, `ctd cluster status`
# from the three nodes, and what happens while etcd is away and when it
# returns. Removes everything it created, also when a step fails.
#
#   node0 (eth0: 198.51.100.11/24)  \
#   node1 (eth0: 198.51.100.12/24)   >-- bridge (hub namespace) --- veth --- root namespace: etcd
#   node2 (eth0: 198.51.100.13/24)  /        control plane: fd00:c7d:XXXX::/64
#
# Needs root. Run as `make demo-cluster`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" -ne 0 ]; then
	echo "demo-cluster.sh: needs root (network namespaces, tc, bpffs): run it as root, e.g. sudo make demo-cluster" >&2
	exit 1
fi
for tool in ip nsenter socat go; do
	if ! command -v "$tool" >/dev/null; then
		echo "demo-cluster.sh: $tool not found: run 'make deps' (or 'make demo-cluster', which does)" >&2
		exit 1
	fi
done

suffix=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
HUB=ctd-cdemo-hub-$suffix
ROOT_IF=ctdc${suffix:0:8}
CTL=fd00:c7d:${suffix:0:4}
TMP=$(mktemp -d /tmp/ctd-cdemo-XXXXXXXX)
NODES=(0 1 2)
PIDS=()
ETCD_PID=
DAEMON_PIDS=()

ns() { echo "ctd-cdemo-n$1-$suffix"; }
pin() { echo "/sys/fs/bpf/ctd-cdemo-$1-$suffix"; }
in_node() { local n=$1; shift; nsenter --net="/var/run/netns/$(ns "$n")" -- "$@"; }
# ctd as node N: its namespace, pin path, state dir and etcd.
ctd_on() {
	local n=$1; shift
	in_node "$n" "$CTD" --pin-path "$(pin "$n")" --state-dir "$TMP/state$n" \
		--kvstore-endpoints "$ENDPOINTS" --kvstore-timeout 2s "$@"
}
step() { printf '\n== %s\n' "$*"; }

cleanup() {
	local rc=$?
	set +e
	for pid in "${DAEMON_PIDS[@]}" "${PIDS[@]}" $ETCD_PID; do
		kill "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	for n in "${NODES[@]}"; do
		if [ -n "${CTD:-}" ] && [ -e "$(pin "$n")" ]; then
			in_node "$n" "$CTD" --pin-path "$(pin "$n")" teardown >/dev/null
		fi
		ip netns del "$(ns "$n")" 2>/dev/null
		[ -e "$(pin "$n")" ] && rm -rf "$(pin "$n")"
	done
	ip netns del "$HUB" 2>/dev/null
	ip link del "$ROOT_IF" 2>/dev/null
	rm -rf "$TMP"
	if [ "$rc" -ne 0 ]; then
		echo "demo-cluster failed (exit $rc); everything it created has been removed" >&2
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "building ctd and the etcd runner"
CTD=${CTD_BIN:-$TMP/ctd}
[ -n "${CTD_BIN:-}" ] || go build -o "$CTD" ./cmd/ctd
go build -o "$TMP/etcdcluster" ./test/etcdtest/cmd/etcdcluster

step "creating three nodes on a bridge, and the control plane $CTL::/64"
ip netns add "$HUB"
ip -n "$HUB" link add br0 type bridge
ip -n "$HUB" link set br0 up
for n in "${NODES[@]}"; do
	ip netns add "$(ns "$n")"
	ip -n "$(ns "$n")" link set lo up
	ip -n "$(ns "$n")" link add eth0 type veth peer name "n$n" netns "$HUB"
	ip -n "$(ns "$n")" addr add "198.51.100.1$((n + 1))/24" dev eth0
	ip -n "$(ns "$n")" addr add "$CTL::1$((n + 1))/64" dev eth0 nodad
	ip -n "$(ns "$n")" link set eth0 up
	ip -n "$HUB" link set "n$n" master br0 up
done
ip -n "$HUB" link add up0 type veth peer name "$ROOT_IF" netns 1
ip -n "$HUB" link set up0 master br0 up
ip addr add "$CTL::fe/64" dev "$ROOT_IF" nodad
ip link set "$ROOT_IF" up

step "starting a three-member etcd on [$CTL::fe]"
BASE=$((20000 + RANDOM % 20000))
start_etcd() {
	"$TMP/etcdcluster" --host "$CTL::fe" --dir "$TMP/etcd" --base-port "$BASE" >"$TMP/etcd.out" 2>"$TMP/etcd.log" &
	ETCD_PID=$!
	for _ in $(seq 300); do
		[ -s "$TMP/etcd.out" ] && break
		kill -0 "$ETCD_PID" 2>/dev/null || { cat "$TMP/etcd.log" >&2; return 1; }
		sleep 0.1
	done
	ENDPOINTS=$(head -1 "$TMP/etcd.out")
	[ -n "$ENDPOINTS" ]
}
start_etcd
echo "endpoints: $ENDPOINTS"

# What every node's datapath resolves an address to.
get_everywhere() {
	for n in "${NODES[@]}"; do
		printf 'node%s: ' "$n"
		ctd_on "$n" ipcache get "$1"
	done
}

wait_synced() {
	for _ in $(seq 150); do
		if ctd_on "$1" cluster status -o json 2>/dev/null | grep -q '"synced": true'; then
			return 0
		fi
		sleep 0.2
	done
	echo "node$1 did not sync; its log:" >&2
	cat "$TMP/node$1.log" >&2
	return 1
}

step "starting ctd daemon on each node (--kvstore-endpoints, --node-name nodeN)"
for n in "${NODES[@]}"; do
	ctd_on "$n" daemon --iface eth0 --node-name "node$n" --kvstore-lease-ttl 5s 2>"$TMP/node$n.log" &
	DAEMON_PIDS+=($!)
done
for n in "${NODES[@]}"; do wait_synced "$n"; done
echo "all three nodes synced"

step "identities for the cluster: the same labels get the same number on every node"
IDS=()
for n in "${NODES[@]}"; do
	id=$(ctd_on "$n" identity allocate "app=demo,node=node$n" -o json | sed -n 's/.*"identity": \([0-9]*\).*/\1/p')
	IDS+=("$id")
	echo "node$n: app=demo,node=node$n -> $id"
done
echo "node2 asks for node=node0,app=demo (other order):"
ctd_on 2 identity allocate "node=node0,app=demo"

step "each node publishes its address as an endpoint; every node maps them"
for n in "${NODES[@]}"; do
	ctd_on "$n" endpoint add "198.51.100.1$((n + 1))" "id=${IDS[$n]}"
done
for n in "${NODES[@]}"; do
	for _ in $(seq 50); do
		[ "$(ctd_on "$n" ipcache list | grep -c '^198.51.100.1[123]/32')" -eq 3 ] && break
		sleep 0.1
	done
done
echo "node0's ipcache (its maps):"
ctd_on 0 ipcache list

step "a cluster write from node2 reaches every node"
ctd_on 2 ipcache add 203.0.113.0/24 id=4000
sleep 0.5
get_everywhere 203.0.113.9

step "cluster policy: ingress default deny, allow node1's identity ${IDS[1]}"
ctd_on 0 policy add ingress "id=${IDS[1]}" allow
ctd_on 0 policy default ingress deny
sleep 0.5
ctd_on 2 policy list
in_node 0 socat TCP-LISTEN:8080,reuseaddr,fork EXEC:cat &
PIDS+=($!)
sleep 0.3
connect() { # node, what
	if in_node "$1" timeout 2 bash -c 'exec 3<>/dev/tcp/198.51.100.11/8080' 2>/dev/null; then
		echo "node$1 -> node0:8080 connected ($2)"
	else
		echo "node$1 -> node0:8080 blocked ($2)"
	fi
}
connect 1 "allowed by the rule"
connect 2 "no rule: default deny"

step "ctd cluster status, from the three nodes"
for n in "${NODES[@]}"; do
	ctd_on "$n" cluster status -o json
done

step "etcd goes away (all members stopped): the nodes keep enforcing"
kill "$ETCD_PID"
wait "$ETCD_PID" 2>/dev/null || true
ETCD_PID=
sleep 3
ctd_on 0 cluster status
connect 1 "etcd away"
connect 2 "etcd away"
echo "a cluster write now fails in one line:"
ctd_on 1 ipcache add 203.0.113.0/24 id=4001 || true

step "etcd returns: every node resyncs"
start_etcd
for n in "${NODES[@]}"; do wait_synced "$n"; done
ctd_on 1 ipcache add 203.0.113.0/24 id=4001
sleep 0.5
get_everywhere 203.0.113.9
for n in "${NODES[@]}"; do
	ctd_on "$n" cluster status -o json
done

step "done; cleaning up"
