// Package ipproto names IP protocols as /etc/protocols does.
package ipproto

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"strings"
)

// File is the system's protocol table (netbase).
const File = "/etc/protocols"

// IP protocol numbers ctd treats specially.
const (
	TCP    = 6
	UDP    = 17
	ICMP   = 1
	ICMPv6 = 58
	SCTP   = 132
)

// HasPorts reports whether flows of protocol p carry ports that policy can
// match and conntrack keys: TCP, UDP and SCTP.
func HasPorts(p uint8) bool { return p == TCP || p == UDP || p == SCTP }

// builtin is netbase's /etc/protocols (numbers 1-255), the names used when
// the system has no protocol table. ctd's own name icmpv6 comes first.
var builtin = []struct {
	name    string
	num     uint8
	aliases []string
}{
	{"icmpv6", 58, []string{"ipv6-icmp"}},
	{"icmp", 1, nil}, {"igmp", 2, nil}, {"ggp", 3, nil}, {"ipencap", 4, []string{"ip-encap"}},
	{"st", 5, nil}, {"tcp", 6, nil}, {"egp", 8, nil}, {"igp", 9, nil}, {"pup", 12, nil},
	{"udp", 17, nil}, {"hmp", 20, nil}, {"xns-idp", 22, nil}, {"rdp", 27, nil},
	{"iso-tp4", 29, nil}, {"dccp", 33, nil}, {"xtp", 36, nil}, {"ddp", 37, nil},
	{"idpr-cmtp", 38, nil}, {"ipv6", 41, nil}, {"ipv6-route", 43, nil}, {"ipv6-frag", 44, nil},
	{"idrp", 45, nil}, {"rsvp", 46, nil}, {"gre", 47, nil}, {"esp", 50, []string{"ipsec-esp"}},
	{"ah", 51, []string{"ipsec-ah"}}, {"skip", 57, nil}, {"ipv6-nonxt", 59, nil},
	{"ipv6-opts", 60, nil}, {"rspf", 73, []string{"cphb"}}, {"vmtp", 81, nil}, {"eigrp", 88, nil},
	{"ospf", 89, []string{"ospfigp"}}, {"ax.25", 93, nil}, {"ipip", 94, nil}, {"etherip", 97, nil},
	{"encap", 98, nil}, {"pim", 103, nil}, {"ipcomp", 108, nil}, {"vrrp", 112, nil},
	{"l2tp", 115, nil}, {"isis", 124, nil}, {"sctp", 132, nil}, {"fc", 133, nil},
	{"mobility-header", 135, nil}, {"udplite", 136, nil}, {"mpls-in-ip", 137, nil},
	{"manet", 138, nil}, {"hip", 139, nil}, {"shim6", 140, nil}, {"wesp", 141, nil},
	{"rohc", 142, nil}, {"ethernet", 143, nil},
}

// Name names protocol p as the built-in table does (tcp, udp, icmpv6,
// sctp, gre, ...), or gives its number: the same on every host, and read
// back by Parse.
func Name(p uint8) string { return names[p] }

// names is Name's answer for every protocol number, computed once: Name
// runs for every flow `ct list` prints.
var names = func() (n [256]string) {
	for p := range n {
		n[p] = strconv.Itoa(p)
	}
	for i := len(builtin) - 1; i >= 0; i-- { // the first name of a number wins
		n[builtin[i].num] = builtin[i].name
	}
	return n
}()

// Table maps protocol names to numbers 1-255.
type Table struct {
	byName map[string]uint8
}

// Builtin returns the table ctd falls back to without /etc/protocols.
func Builtin() *Table {
	t := &Table{byName: make(map[string]uint8)}
	for _, p := range builtin {
		t.add(p.num, p.name, p.aliases...)
	}
	return t
}

// Load returns the built-in table extended by the names of the protocol
// table at path (File) that it lacks. A missing file leaves the built-in
// table; an unreadable one is an error.
func Load(path string) (*Table, error) {
	t := Builtin()
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return t, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read protocol names: %w", err)
	}
	defer f.Close()
	if err := t.read(f); err != nil {
		return nil, fmt.Errorf("read protocol names from %s: %w", path, err)
	}
	return t, nil
}

// read adds the entries of a protocols(5) file: name number [aliases] [# comment].
func (t *Table) read(r io.Reader) error {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line, _, _ := strings.Cut(sc.Text(), "#")
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		n, err := strconv.ParseUint(f[1], 10, 8)
		if err != nil || n == 0 {
			continue // 0 (ip, hopopt) is no protocol of its own; > 255 is not an IP protocol
		}
		t.add(uint8(n), f[0], f[2:]...)
	}
	return sc.Err()
}

// add names p. Names already taken keep their number: the built-in ones
// (ctd's own, such as icmpv6) come first.
func (t *Table) add(p uint8, name string, aliases ...string) {
	for _, n := range append([]string{name}, aliases...) {
		n = strings.ToLower(n)
		if _, ok := t.byName[n]; !ok {
			t.byName[n] = p
		}
	}
}

// Parse reads a protocol name (any case, aliases included) or a number 1-255.
func (t *Table) Parse(s string) (uint8, error) {
	if p, ok := t.byName[strings.ToLower(s)]; ok {
		return p, nil
	}
	n, err := strconv.ParseUint(s, 10, 8)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("invalid protocol %q: want a name from %s (tcp, udp, icmp, icmpv6, sctp, gre, esp, ...) or a number 1-255", s, File)
	}
	return uint8(n), nil
}
