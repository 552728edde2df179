// Package conntrack lists, filters and flushes the conntrack table for operators.
package conntrack

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/ctd-dev/ctd/control/ifnames"
	"github.com/ctd-dev/ctd/control/ipproto"
	"github.com/ctd-dev/ctd/datapath/cgroupv2"
	"github.com/ctd-dev/ctd/datapath/ctmap"
)

// Filter selects flows. The zero Filter selects every flow; each set field
// narrows the selection further.
type Filter struct {
	// Proto is an IP protocol number; 0 matches any protocol.
	Proto uint8
	// Addr matches flows that have it as either endpoint; the zero Addr
	// matches any address.
	Addr netip.Addr
	// Port matches flows that have it as either endpoint's port (for ICMP
	// echo flows: the echo identifier); 0 matches any port.
	Port uint16
	// Comm matches flows whose local owner has this command name; the
	// zero Comm matches any flow.
	Comm ctmap.Comm
	// CgroupID matches flows whose local owner is in this cgroup (not in
	// one below it); 0 matches any flow.
	CgroupID uint64
}

// ParseOwner sets the owner fields of f from the --comm and --cgroup flag
// values (a path below the cgroup v2 mount, as ct list shows it); an empty
// string leaves that field unset.
func (f *Filter) ParseOwner(comm, cgroup string) error {
	if comm != "" {
		c, ok := ctmap.CommOf(comm)
		if !ok {
			return fmt.Errorf("invalid --comm %q: valid is a command name of 1 to 15 bytes (the kernel keeps no more)", comm)
		}
		f.Comm = c
	}
	if cgroup != "" {
		root, err := cgroupv2.Mount()
		if err != nil {
			return fmt.Errorf("invalid --cgroup %q: %w", cgroup, err)
		}
		if !strings.HasPrefix(cgroup, "/") {
			return fmt.Errorf("invalid --cgroup %q: valid is a cgroup's path below %s starting with /, as ct list shows it (e.g. /system.slice/nginx.service)", cgroup, root)
		}
		id, err := cgroupv2.ID(filepath.Join(root, filepath.Clean(cgroup)))
		if err != nil {
			return fmt.Errorf("invalid --cgroup %q: no such cgroup below %s", cgroup, root)
		}
		f.CgroupID = id
	}
	return nil
}

// ParseFilter parses the --proto, --addr and --port flag values; an empty
// string leaves that field unset.
func ParseFilter(proto, addr, port string) (Filter, error) {
	var f Filter
	if proto != "" {
		protos, err := ipproto.Load(ipproto.File)
		if err != nil {
			return Filter{}, err
		}
		p, err := protos.Parse(proto)
		if err != nil {
			return Filter{}, fmt.Errorf("invalid --proto %q: valid are a protocol name (tcp, udp, icmp, icmpv6, sctp, gre, ...) or a number 1-255", proto)
		}
		f.Proto = p
	}
	if addr != "" {
		a, err := netip.ParseAddr(addr)
		if err != nil || a.Zone() != "" {
			return Filter{}, fmt.Errorf("invalid --addr %q: valid is an IPv4 or IPv6 address without zone, e.g. 198.51.100.1 or fd00::1", addr)
		}
		f.Addr = a.Unmap()
	}
	if port != "" {
		n, err := strconv.ParseUint(port, 10, 16)
		if err != nil || n == 0 {
			return Filter{}, fmt.Errorf("invalid --port %q: valid is a port number 1-65535", port)
		}
		f.Port = uint16(n)
	}
	return f, nil
}

// Match reports whether fl is selected by f.
func (f Filter) Match(fl ctmap.Flow) bool {
	if f.Proto != 0 && fl.Proto != f.Proto {
		return false
	}
	if f.Addr.IsValid() && fl.Src != f.Addr && fl.Dst != f.Addr {
		return false
	}
	if f.Port != 0 && fl.Sport != f.Port && fl.Dport != f.Port {
		return false
	}
	if f.Comm != (ctmap.Comm{}) && fl.Comm != f.Comm {
		return false
	}
	if f.CgroupID != 0 && fl.CgroupID != f.CgroupID {
		return false
	}
	return true
}

// List calls fn for every flow of m that f selects, reading the table in
// batches without holding it in memory. It stops at the first error fn
// returns and returns that error.
func List(m *ctmap.Map, f Filter, fn func(ctmap.Flow) error) error {
	var fnErr error
	err := m.Iterate(func(k *ctmap.Key, e *ctmap.Entry) bool {
		fl := ctmap.FlowOf(k, e)
		if !f.Match(fl) {
			return true
		}
		fnErr = fn(fl)
		return fnErr == nil
	})
	if fnErr != nil {
		return fnErr
	}
	return err
}

// Flush deletes every flow of m that f selects and returns how many entries
// it deleted. Flows created while it runs may survive.
func Flush(m *ctmap.Map, f Filter) (int, error) {
	var keys []ctmap.Key
	err := m.Iterate(func(k *ctmap.Key, e *ctmap.Entry) bool {
		if f.Match(ctmap.FlowOf(k, e)) {
			keys = append(keys, *k)
		}
		return true
	})
	if err != nil {
		return 0, err
	}
	return m.Delete(keys)
}

// Revoked says what Revoke did: Revoked flows are cut (including those
// cut before), Kept flows the policy in force still allows.
type Revoked struct {
	Revoked int `json:"revoked"`
	Kept    int `json:"kept"`
}

// Revoke judges every flow of m that f selects again against the policy in
// force, and marks those it now denies revoked: the datapath drops both
// directions of a revoked flow and no pickup re-creates it (see
// ctmap.Revoker). Flows created while it runs are judged at creation.
func Revoke(m *ctmap.Map, rv *ctmap.Revoker, f Filter) (Revoked, error) {
	var (
		res      Revoked
		keys     = make([]ctmap.Key, 0, ctmap.RevokeBatch)
		verdicts = make([]ctmap.Verdict, ctmap.RevokeBatch)
		runErr   error
	)
	flush := func() bool {
		if runErr = rv.Revoke(keys, verdicts); runErr != nil {
			return false
		}
		for _, v := range verdicts[:len(keys)] {
			switch v {
			case ctmap.Revoked, ctmap.AlreadyRevoked:
				res.Revoked++
			case ctmap.Kept:
				res.Kept++
			}
		}
		keys = keys[:0]
		return true
	}
	err := m.Iterate(func(k *ctmap.Key, e *ctmap.Entry) bool {
		if !f.Match(ctmap.FlowOf(k, e)) {
			return true
		}
		keys = append(keys, *k)
		return len(keys) < ctmap.RevokeBatch || flush()
	})
	if err == nil && runErr == nil {
		flush()
	}
	return res, errors.Join(err, runErr)
}

// Row is one flow as ctd prints it in JSON.
type Row struct {
	Proto        string   `json:"proto"` // tcp, udp, icmp, icmpv6, sctp or the protocol number
	Src          string   `json:"src"`   // originator: sent the first packet ctd saw
	Sport        uint16   `json:"sport"`
	Dst          string   `json:"dst"`
	Dport        uint16   `json:"dport"`
	State        string   `json:"state"`
	PacketsOrig  uint64   `json:"packets_orig"`
	BytesOrig    uint64   `json:"bytes_orig"`
	PacketsReply uint64   `json:"packets_reply"`
	BytesReply   uint64   `json:"bytes_reply"`
	FirstSeen    string   `json:"first_seen"` // RFC 3339, wall clock
	LastSeen     string   `json:"last_seen"`  // RFC 3339, wall clock
	Iface        string   `json:"iface"`      // name, or the ifindex where no interface has it
	SrcIdentity  uint32   `json:"src_identity"`
	DstIdentity  uint32   `json:"dst_identity"`
	Flags        []string `json:"flags"` // opened_ingress, pickup, related, revoked
	// The local socket's owner, only when the flow has one.
	Pid      uint32 `json:"pid,omitempty"`
	Comm     string `json:"comm,omitempty"`
	Cgroup   string `json:"cgroup,omitempty"` // path below the cgroup v2 mount, or id:N where none has it
	CgroupID uint64 `json:"cgroup_id,omitempty"`
	RTT      uint32 `json:"rtt_us,omitempty"` // TCP handshake round trip, µs
}

// RTTText is a round trip in µs as the text form shows it, e.g. 20.113ms.
func RTTText(us uint32) string { return (time.Duration(us) * time.Microsecond).String() }

var flagNames = []struct {
	bit  uint8
	name string
}{
	{ctmap.FlagOpenedIngress, "opened_ingress"},
	{ctmap.FlagPickup, "pickup"},
	{ctmap.FlagRelated, "related"},
	{ctmap.FlagRevoked, "revoked"},
}

// FlagNames names the flags set in f (ctmap.Flag*), unknown bits as hex.
func FlagNames(f uint8) []string {
	names := []string{}
	for _, fn := range flagNames {
		if f&fn.bit != 0 {
			names = append(names, fn.name)
			f &^= fn.bit
		}
	}
	if f != 0 {
		names = append(names, fmt.Sprintf("%#x", f))
	}
	return names
}

// RowOf converts fl to its JSON form; bt converts its timestamps to wall
// time, names its interface and cg its cgroup.
func RowOf(fl ctmap.Flow, bt ctmap.Clock, names *ifnames.Cache, cg *cgroupv2.Names) Row {
	r := Row{
		Proto:        ipproto.Name(fl.Proto),
		Src:          fl.Src.String(),
		Sport:        fl.Sport,
		Dst:          fl.Dst.String(),
		Dport:        fl.Dport,
		State:        fl.State.String(),
		PacketsOrig:  fl.PacketsOrig,
		BytesOrig:    fl.BytesOrig,
		PacketsReply: fl.PacketsReply,
		BytesReply:   fl.BytesReply,
		FirstSeen:    bt.Wall(fl.FirstSeen).UTC().Format(time.RFC3339Nano),
		LastSeen:     bt.Wall(fl.LastSeen).UTC().Format(time.RFC3339Nano),
		Iface:        names.Name(fl.Ifindex),
		SrcIdentity:  fl.SrcIdentity,
		DstIdentity:  fl.DstIdentity,
		Flags:        FlagNames(fl.Flags),
		Pid:          fl.Pid,
		Comm:         fl.Comm.String(),
		CgroupID:     fl.CgroupID,
		RTT:          fl.RTT,
	}
	if fl.CgroupID != 0 {
		r.Cgroup = cg.Name(fl.CgroupID)
	}
	return r
}

// Line formats fl as one line in the style of conntrack-tools: the
// originator's direction, then after "|" the reply direction's counters.
//
//	tcp ESTABLISHED src=198.51.100.1 dst=198.51.100.2 sport=40000 dport=8080 packets=5 bytes=400 | packets=4 bytes=300 id=2->2 iface=ctd0 pid=812 comm=curl cgroup=/user.slice rtt=20.113ms
//
// The owner (pid, comm, cgroup) and rtt follow where the flow has them.
func Line(fl ctmap.Flow, names *ifnames.Cache, cg *cgroupv2.Names) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s src=%s dst=%s sport=%d dport=%d packets=%d bytes=%d | packets=%d bytes=%d id=%d->%d iface=%s",
		ipproto.Name(fl.Proto), fl.State, fl.Src, fl.Dst, fl.Sport, fl.Dport,
		fl.PacketsOrig, fl.BytesOrig, fl.PacketsReply, fl.BytesReply,
		fl.SrcIdentity, fl.DstIdentity, names.Name(fl.Ifindex))
	if f := FlagNames(fl.Flags); len(f) > 0 {
		b.WriteString(" flags=" + strings.Join(f, ","))
	}
	if fl.Pid != 0 {
		fmt.Fprintf(&b, " pid=%d", fl.Pid)
	}
	if fl.Comm != (ctmap.Comm{}) {
		b.WriteString(" comm=" + fl.Comm.Text())
	}
	if fl.CgroupID != 0 {
		b.WriteString(" cgroup=" + cg.Name(fl.CgroupID))
	}
	if fl.RTT != 0 {
		b.WriteString(" rtt=" + RTTText(fl.RTT))
	}
	return b.String()
}
