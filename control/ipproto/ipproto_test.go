package ipproto

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	dir := t.TempDir()
	custom := filepath.Join(dir, "protocols")
	if err := os.WriteFile(custom, []byte("# local names\nmyproto\t253\tMYPROTO\t# experiment\ntcp 99 # never overrides ctd's names\nmptcp 262 MPTCP\nip 0 IP\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	withFile, err := Load(custom)
	if err != nil {
		t.Fatal(err)
	}
	missing, err := Load(filepath.Join(dir, "missing"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		in   string
		want uint8
		err  string // in the error; "" = no error
		file bool   // only with the custom file
	}{
		{in: "tcp", want: 6}, {in: "UDP", want: 17}, {in: "sctp", want: 132}, {in: "gre", want: 47},
		{in: "esp", want: 50}, {in: "IPSEC-ESP", want: 50}, {in: "icmpv6", want: 58}, {in: "ipv6-icmp", want: 58},
		{in: "47", want: 47}, {in: "1", want: 1}, {in: "255", want: 255},
		{in: "myproto", want: 253, file: true}, {in: "MYPROTO", want: 253, file: true},
		{in: "0", err: `invalid protocol "0"`}, {in: "256", err: "or a number 1-255"},
		{in: "-1", err: "invalid protocol"}, {in: "+6", err: "invalid protocol"}, {in: "", err: "invalid protocol"},
		{in: "ip", err: "invalid protocol"}, {in: "mptcp", err: "invalid protocol"}, {in: "tcpp", err: "invalid protocol"},
	} {
		for _, tab := range []struct {
			name string
			t    *Table
		}{{"file", withFile}, {"no file", missing}} {
			got, err := tab.t.Parse(tc.in)
			wantErr := tc.err
			if tc.file && tab.t == missing {
				wantErr = "invalid protocol"
			}
			switch {
			case wantErr != "":
				if err == nil || !strings.Contains(err.Error(), wantErr) {
					t.Errorf("%s: Parse(%q) = %d, %v; want an error containing %q", tab.name, tc.in, got, err, wantErr)
				}
			case err != nil || got != tc.want:
				t.Errorf("%s: Parse(%q) = %d, %v; want %d", tab.name, tc.in, got, err, tc.want)
			}
		}
	}
}

func TestName(t *testing.T) {
	for p, want := range map[uint8]string{6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 132: "sctp", 47: "gre", 50: "esp", 253: "253"} {
		if got := Name(p); got != want {
			t.Errorf("Name(%d) = %q, want %q", p, got, want)
		}
		if back, err := Builtin().Parse(Name(p)); err != nil || back != p {
			t.Errorf("Parse(Name(%d)) = %d, %v", p, back, err)
		}
	}
}

func TestLoadSystemFile(t *testing.T) {
	tab, err := Load(File)
	if err != nil {
		t.Fatal(err)
	}
	if p, err := tab.Parse("sctp"); err != nil || p != SCTP {
		t.Errorf("Parse(sctp) with %s = %d, %v", File, p, err)
	}
}
