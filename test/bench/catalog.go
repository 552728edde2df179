package bench

import "time"

// PacketKind is the packet a per-packet case sends through ctd's programs.
type PacketKind int

const (
	// TCPEstablishedOrig is an ACK from a tracked flow's originator, on egress.
	TCPEstablishedOrig PacketKind = iota
	// TCPEstablishedReply is an ACK from a tracked flow's responder, on ingress.
	TCPEstablishedReply
	// TCPNew is the SYN of a flow ctd has not seen, on ingress: conntrack
	// miss, two ipcache lookups, policy, insert, counters, and a flow-new
	// event when a consumer listens.
	TCPNew
	// UDPEstablished is a datagram of a tracked flow from its originator, on egress.
	UDPEstablished
	// ICMPEstablished is an echo request of a tracked exchange, on egress.
	ICMPEstablished
	// TCP6EstablishedOrig is TCPEstablishedOrig over IPv6.
	TCP6EstablishedOrig
	// TCP6New is TCPNew over IPv6.
	TCP6New
	// TCP6EstablishedReply is TCPEstablishedReply over IPv6.
	TCP6EstablishedReply
)

// New reports whether every packet of the kind opens a flow.
func (k PacketKind) New() bool { return k == TCPNew || k == TCP6New }

// PacketCase is one per-packet figure: a kind of packet run through the real
// ctd program with BPF_PROG_TEST_RUN against tables of a given size, next to
// an empty TC program run on the same packet in the same loop.
type PacketCase struct {
	Name     string     // sub-benchmark of BenchmarkPacket
	Title    string     // row label in the table
	Kind     PacketKind //
	Flows    int        // conntrack entries in the table
	Prefixes int        // ipcache prefixes per family
	// Policy sets ingress default deny with allow rules (one per source
	// identity, 64 in all) that match the packets, so that a new flow takes
	// a policy lookup; without it the datapath is in its default-allow
	// configuration with no rules.
	Policy bool
	// Hot repeats one packet of one flow inside a single BPF_PROG_TEST_RUN
	// (instructions with warm caches); otherwise every run is a different
	// flow drawn from the whole table, one run per syscall.
	Hot bool
	// Listener registers an event consumer (as ctd monitor does) with the
	// event rate limit off, so that every new flow writes its event to the
	// ring; otherwise nobody listens and the datapath writes no events.
	Listener bool
	// Flood fills the unconfirmed conntrack table with half-open flows
	// first, as a SYN flood leaves it.
	Flood bool
	// V1 runs the first release's datapath (test/first-release.commit,
	// layout v1) on the same packets in the same rounds, filled the same
	// (its one conntrack table holds the flood's half-open flows too; its
	// tries hold the host entries too), and reports it beside ctd's.
	V1 bool
	// Owner says what the attribution of local flows to their owner
	// (bpf/owner.h) finds; the zero value is the datapath's default with no
	// local socket for the packets (at ingress, a socket lookup that misses).
	Owner OwnerMode
	Goal  time.Duration // allowed cost over the empty program; 0 when the issue sets none
}

// OwnerMode is what a per-packet case's attribution of local flows finds.
type OwnerMode int

const (
	// OwnerNoSocket: attribution on, no socket for the packets.
	OwnerNoSocket OwnerMode = iota
	// OwnerListener: a listening socket with an owner (the socket owner
	// programs attached when it was made) receives the new flows, in the
	// network namespace the case runs in: lookup, storage, copy.
	OwnerListener
	// OwnerOff: attribution switched off (config_v1's owner_off), the
	// figure without it.
	OwnerOff
)

// Units that BenchmarkPacket reports besides ns/op (the ctd program's median).
const (
	UnitFloor = "floor-ns/op" // the empty TC program's median on the same packets
	UnitOver  = "over-ns/op"  // median over rounds of (ctd median - floor median)
	// The first release's datapath on the same packets (PacketCase.V1).
	UnitV1     = "v1-ns/op"
	UnitV1Over = "v1-over-ns/op"
)

// Table sizes used by the per-packet cases.
const (
	DefaultFlows    = 1000
	DefaultPrefixes = 1000
)

// PacketCases lists the per-packet figures in table order.
var PacketCases = []PacketCase{
	{Name: "tcp-est-orig/flows=1k", Title: "TCP established, originator (egress)", Kind: TCPEstablishedOrig, Flows: 1000, Prefixes: DefaultPrefixes, V1: true, Goal: 60 * time.Nanosecond},
	{Name: "tcp-est-reply/flows=1k", Title: "TCP established, reply (ingress)", Kind: TCPEstablishedReply, Flows: 1000, Prefixes: DefaultPrefixes, V1: true, Goal: 60 * time.Nanosecond},
	{Name: "tcp-est-orig-owner-off/flows=1k", Title: "TCP established, originator (egress), owner attribution off", Kind: TCPEstablishedOrig, Flows: 1000, Prefixes: DefaultPrefixes, Owner: OwnerOff},
	{Name: "tcp-est-orig-hot/flows=1k", Title: "TCP established, originator, one flow repeated in-kernel", Kind: TCPEstablishedOrig, Flows: 1000, Prefixes: DefaultPrefixes, Hot: true},
	{Name: "tcp-est-orig/flows=100k", Title: "TCP established, originator (egress)", Kind: TCPEstablishedOrig, Flows: 100000, Prefixes: DefaultPrefixes},
	{Name: "tcp-est-reply/flows=100k", Title: "TCP established, reply (ingress)", Kind: TCPEstablishedReply, Flows: 100000, Prefixes: DefaultPrefixes},
	{Name: "tcp-est-orig/flows=1M", Title: "TCP established, originator (egress)", Kind: TCPEstablishedOrig, Flows: 1000000, Prefixes: DefaultPrefixes},
	{Name: "tcp-est-reply/flows=1M", Title: "TCP established, reply (ingress)", Kind: TCPEstablishedReply, Flows: 1000000, Prefixes: DefaultPrefixes},
	{Name: "tcp-new/prefixes=1k", Title: "TCP new flow (SYN, ingress)", Kind: TCPNew, Flows: DefaultFlows, Prefixes: 1000},
	{Name: "tcp-new/prefixes=10k", Title: "TCP new flow (SYN, ingress)", Kind: TCPNew, Flows: DefaultFlows, Prefixes: 10000, V1: true, Goal: 250 * time.Nanosecond},
	{Name: "tcp-new-owner/prefixes=10k", Title: "TCP new flow (SYN, ingress) to a local listener: its owner recorded", Kind: TCPNew, Flows: DefaultFlows, Prefixes: 10000, Owner: OwnerListener},
	{Name: "tcp-new-owner-off/prefixes=10k", Title: "TCP new flow (SYN, ingress), owner attribution off", Kind: TCPNew, Flows: DefaultFlows, Prefixes: 10000, Owner: OwnerOff},
	{Name: "tcp-new-listener/prefixes=10k", Title: "TCP new flow (SYN, ingress), an event consumer registered", Kind: TCPNew, Flows: DefaultFlows, Prefixes: 10000, Listener: true},
	{Name: "tcp-new/prefixes=100k", Title: "TCP new flow (SYN, ingress)", Kind: TCPNew, Flows: DefaultFlows, Prefixes: 100000, V1: true, Goal: 250 * time.Nanosecond},
	{Name: "tcp-new/flows=1M", Title: "TCP new flow (SYN, ingress)", Kind: TCPNew, Flows: 1000000, Prefixes: 1000},
	{Name: "tcp-new-policy/prefixes=10k", Title: "TCP new flow, ingress default deny + allow rules", Kind: TCPNew, Flows: DefaultFlows, Prefixes: 10000, Policy: true},
	{Name: "udp-est/flows=1k", Title: "UDP established, originator (egress)", Kind: UDPEstablished, Flows: 1000, Prefixes: DefaultPrefixes},
	{Name: "icmp-est/flows=1k", Title: "ICMP echo request, established (egress)", Kind: ICMPEstablished, Flows: 1000, Prefixes: DefaultPrefixes},
	{Name: "tcp6-est-orig/flows=1k", Title: "IPv6 TCP established, originator (egress)", Kind: TCP6EstablishedOrig, Flows: 1000, Prefixes: DefaultPrefixes, V1: true, Goal: 80 * time.Nanosecond},
	{Name: "tcp6-est-reply/flows=1k", Title: "IPv6 TCP established, reply (ingress)", Kind: TCP6EstablishedReply, Flows: 1000, Prefixes: DefaultPrefixes, V1: true, Goal: 80 * time.Nanosecond},
	{Name: "tcp6-new/prefixes=10k", Title: "IPv6 TCP new flow (SYN, ingress)", Kind: TCP6New, Flows: DefaultFlows, Prefixes: 10000, V1: true, Goal: 300 * time.Nanosecond},
	{Name: "tcp6-new/prefixes=100k", Title: "IPv6 TCP new flow (SYN, ingress)", Kind: TCP6New, Flows: DefaultFlows, Prefixes: 100000, V1: true, Goal: 300 * time.Nanosecond},
	{Name: "tcp-est-orig-flood/flows=1k", Title: "TCP established, originator, unconfirmed table full (SYN flood)", Kind: TCPEstablishedOrig, Flows: 1000, Prefixes: DefaultPrefixes, Flood: true, V1: true},
	{Name: "tcp-new-flood/prefixes=10k", Title: "TCP new flow (SYN), unconfirmed table full: evicts a half-open flow", Kind: TCPNew, Flows: DefaultFlows, Prefixes: 10000, Flood: true, V1: true},
}

// FloorOps are the map operations a BenchmarkMapFloor case does, and only those.
type FloorOps int

const (
	// FloorHit: one lookup that hits in the family's confirmed conntrack
	// table (1k flows) and two counter adds in the entry: what any
	// established packet needs at least.
	FloorHit FloorOps = iota
	// FloorNew: a miss in the family's confirmed and unconfirmed tables,
	// then an insert into the unconfirmed one: what any new flow needs at least.
	FloorNew
	// FloorNewIdentities: FloorNew, and both addresses resolved as the
	// datapath does (host hash, then the trie of CIDRs) in an ipcache of 10k
	// prefixes: the new flow's source a host entry, its destination the
	// server under a CIDR, as in the per-packet new-flow rows.
	FloorNewIdentities
	// FloorHashMiss: one lookup that misses in a hash of one entry: a
	// helper call into the hash table code, with no table to walk.
	FloorHashMiss
	// FloorArray: one lookup in an array of one entry, which the verifier
	// inlines (no call), and an add.
	FloorArray
	// FloorArrayTable: one hit in a table the program manages itself in an
	// array map (262144 slots of a 16-byte key and an entry, the slot a
	// multiplicative hash of the key computed in the program, one probe, the
	// key compared), and two counter adds: what an established packet would
	// cost with its flows kept outside the kernel's hash maps.
	FloorArrayTable
)

// FloorCase is one BenchmarkMapFloor figure: what the map operations Ops
// cost alone, measured as the per-packet rows are, beside the per-packet
// row Bounds (a PacketCase name) whose goal they bound from below.
type FloorCase struct {
	Name   string // sub-benchmark of BenchmarkMapFloor
	Title  string
	Ops    FloorOps
	IPv6   bool
	Bounds string // the PacketCase whose figure includes these operations; "" for a reference
}

// FloorCases lists the map-operation floors in table order.
var FloorCases = []FloorCase{
	{Name: "ct4-hit", Title: "one hit in ct4_v2 (1k flows), two counter adds", Ops: FloorHit, Bounds: "tcp-est-orig/flows=1k"},
	{Name: "ct6-hit", Title: "one hit in ct6_v2 (1k flows), two counter adds", Ops: FloorHit, IPv6: true, Bounds: "tcp6-est-orig/flows=1k"},
	{Name: "ct4-new", Title: "a miss in ct4_v2 and in ct4_unconfirmed_v2, an insert into ct4_unconfirmed_v2", Ops: FloorNew, Bounds: "tcp-new/prefixes=10k"},
	{Name: "ct4-new-identities", Title: "the same, and both addresses resolved in an ipcache of 10k prefixes", Ops: FloorNewIdentities, Bounds: "tcp-new/prefixes=10k"},
	{Name: "ct6-new", Title: "a miss in ct6_v2 and in ct6_unconfirmed_v2, an insert into ct6_unconfirmed_v2", Ops: FloorNew, IPv6: true, Bounds: "tcp6-new/prefixes=10k"},
	{Name: "ct6-new-identities", Title: "the same, and both addresses resolved in an ipcache of 10k prefixes", Ops: FloorNewIdentities, IPv6: true, Bounds: "tcp6-new/prefixes=10k"},
	{Name: "hash1-miss", Title: "reference: one miss in a hash of one entry (a helper call, no table to walk)", Ops: FloorHashMiss},
	{Name: "array", Title: "reference: one lookup in an array of one entry (inlined by the verifier) and an add", Ops: FloorArray},
	{Name: "array-table-hit", Title: "reference: one hit among 1k flows in a hash table the program keeps in an array map (hash computed in the program, one probe), two counter adds", Ops: FloorArrayTable},
}

// Setup is one configuration of the receiving side in the real-traffic runs.
type Setup struct {
	Name  string // sub-benchmark of BenchmarkTraffic
	Title string
}

// Setups lists the real-traffic configurations; the first is the baseline.
var Setups = []Setup{
	{Name: "none", Title: "no program"},
	{Name: "ctd-allow", Title: "ctd, default allow"},
	{Name: "ctd-deny-rule", Title: "ctd, ingress default deny + allow rules"},
	{Name: "nf-conntrack", Title: "nf_conntrack (nftables ct state rules)"},
}

// Baseline is the set-up every real-traffic figure is compared with.
const Baseline = "none"

// TrafficTest is one real-traffic measurement, reported by every
// BenchmarkTraffic sub-benchmark as a metric in Unit.
type TrafficTest struct {
	Name  string
	Title string
	Unit  string
	// MinRatio is the goal for ctd's set-ups as a fraction of the
	// baseline's figure; 0 when the issue sets none.
	MinRatio float64
	// NotBelow names a set-up ctd's set-ups must not fall below; "" for none.
	NotBelow string
}

// TrafficTests lists the real-traffic measurements in table order.
var TrafficTests = []TrafficTest{
	{Name: "tcp_stream", Title: "single-stream TCP throughput", Unit: "Mbit/s", MinRatio: 0.95},
	{Name: "tcp_crr", Title: "TCP connection rate (connect, request, response, close)", Unit: "conn/s", MinRatio: 0.95, NotBelow: "nf-conntrack"},
	{Name: "udp_small", Title: "small UDP packet rate (64-byte payloads)", Unit: "pkt/s"},
}

// ControlCase is one control-plane figure.
type ControlCase struct {
	Name  string
	Title string
	Unit  string        // "s" for durations, else the unit of the figure
	Goal  time.Duration // upper bound for durations; 0 when the issue sets none
}

// ControlCases lists the control-plane figures in table order.
var ControlCases = []ControlCase{
	{Name: "ipcache-load", Title: "ipcache load, 100k prefixes (50k per family)", Unit: "s", Goal: 500 * time.Millisecond},
	{Name: "ipcache-load-per-family", Title: "ipcache load, 100k prefixes per family (200k)", Unit: "s"},
	{Name: "ct-list", Title: "ct list, 1M entries", Unit: "s", Goal: time.Second},
	{Name: "ct-list-json", Title: "ct list -o json, 1M entries", Unit: "s", Goal: time.Second},
	{Name: "ct-top", Title: "ct top, 1M entries", Unit: "s", Goal: time.Second},
	{Name: "gc-pass", Title: "GC pass, 1M entries, half expired", Unit: "s", Goal: time.Second},
	{Name: "daemon-ready", Title: "daemon start → ready, 100k ct + 100k ipcache entries", Unit: "s", Goal: time.Second},
	{Name: "ct-memlock", Title: "memlock per conntrack entry (1M-entry table)", Unit: "B/entry"},
	{Name: "metrics-scrape", Title: "CPU per metrics scrape, 20 concurrent, 1M conntrack entries", Unit: "s", Goal: 50 * time.Millisecond},
	{Name: "metrics-scrape-counted", Title: "CPU per metrics scrape, 20 concurrent, 1M entries, counting every map (before)", Unit: "s"},
	{Name: "cluster-ipcache-load", Title: "cluster: ipcache load of 100k prefixes into etcd (3 members)", Unit: "s", Goal: 3 * time.Second},
	{Name: "cluster-converge", Title: "cluster: new node converges on 100k ipcache entries (start → synced)", Unit: "s", Goal: 2 * time.Second},
	{Name: "cluster-change-p99", Title: "cluster: one change reaches 10 nodes, p99", Unit: "s", Goal: 100 * time.Millisecond},
}

// LookupVariant is one way of resolving an address to its identity that
// BenchmarkIPCacheLookup measures, reported as its metric Unit.
type LookupVariant struct {
	Unit  string
	Title string
}

// LookupVariants are the alternatives BenchmarkIPCacheLookup compares, each
// on every one of LookupCases.
var LookupVariants = []LookupVariant{
	{"trie-host-over-ns", "host entry, one LPM trie of every prefix (first release)"},
	{"hash-host-over-ns", "host entry, host hash (this build)"},
	{"trie-cidr-over-ns", "address under a CIDR, one LPM trie of every prefix (first release)"},
	{"hash-miss-cidr-over-ns", "address under a CIDR, host hash miss then the trie of CIDRs (this build)"},
}

// LookupCase is one ipcache BenchmarkIPCacheLookup resolves addresses in.
type LookupCase struct {
	Name     string // sub-benchmark of BenchmarkIPCacheLookup
	IPv4     bool   // the family of the addresses
	Prefixes int    // ipcache prefixes of the family, 80% host entries, as the per-packet cases
}

// LookupCases lists the ipcaches of BenchmarkIPCacheLookup in table order.
var LookupCases = []LookupCase{
	{Name: "ipv4/prefixes=10k", IPv4: true, Prefixes: 10000},
	{Name: "ipv6/prefixes=10k", Prefixes: 10000},
	{Name: "ipv4/prefixes=100k", IPv4: true, Prefixes: 100000},
	{Name: "ipv6/prefixes=100k", Prefixes: 100000},
}
