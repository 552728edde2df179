package ipcache

import (
	"net/netip"
	"strings"
	"testing"
)

func TestParseIdentity(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    uint32
		wantErr string // substring; "" = valid
	}{
		{"1", 1, ""},
		{"42", 42, ""},
		{"4294967295", 4294967295, ""},
		{"world", 2, ""},
		{"host", 1, ""},
		{"0", 0, "0 is never a valid identity"},
		{"-1", 0, "negative"},
		{"4294967296", 0, "out of range"},
		{"99999999999999999999999", 0, "out of range"},
		{"abc", 0, `invalid identity "abc"`},
		{"", 0, "empty identity"},
		{"0x10", 0, "want a number"},
		{"+5", 0, "want a number"},
		{"World", 0, "want a number"},
		{"any", 0, "want a number"},
		{"1.5", 0, "want a number"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseIdentity(tc.in)
			checkErr(t, err, tc.wantErr)
			if got != tc.want {
				t.Errorf("ParseIdentity(%q) = %d, want %d", tc.in, got, tc.want)
			}
		})
	}
}

func TestParsePrefix(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    string
		wantErr string
	}{
		{"10.0.0.0/8", "10.0.0.0/8", ""},
		{"10.0.0.1", "10.0.0.1/32", ""},
		{"0.0.0.0/0", "0.0.0.0/0", ""},
		{"198.51.100.2/32", "198.51.100.2/32", ""},
		{"fd00::/8", "fd00::/8", ""},
		{"fd00::1", "fd00::1/128", ""},
		{"::/0", "::/0", ""},
		{"10.0.0.0/33", "", "prefix length 33 is out of range for IPv4 (0-32)"},
		{"fd00::/129", "", "prefix length 129 is out of range for IPv6 (0-128)"},
		{"10.0.0.1/8", "", "10.0.0.1/8 has host bits set: did you mean 10.0.0.0/8?"},
		{"fd00::1/64", "", "did you mean fd00::/64?"},
		{"fe80::1%eth0", "", "zones"},
		{"fe80::%eth0/64", "", "zones"},
		{"10.0.0.0/", "", "not a number"},
		{"10.0.0.0/08", "", "not a number"},
		{"10.0.0.0/-1", "", "not a number"},
		{"10.0.0.0/+8", "", "not a number"},
		{"10.0.0.0/8/8", "", "not a number"},
		{"10.0.0", "", "not an IPv4 or IPv6 address"},
		{"010.0.0.0/8", "", "not an IPv4 or IPv6 address"},
		{"example.com", "", "not an IPv4 or IPv6 address"},
		{"", "", "not an IPv4 or IPv6 address"},
		{"::ffff:10.0.0.1", "", "write 10.0.0.1"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParsePrefix(tc.in)
			checkErr(t, err, tc.wantErr)
			if tc.wantErr == "" && got != netip.MustParsePrefix(tc.want) {
				t.Errorf("ParsePrefix(%q) = %v, want %s", tc.in, got, tc.want)
			}
		})
	}
}

func TestParseAddr(t *testing.T) {
	for _, tc := range []struct {
		in, wantErr string
	}{
		{"198.51.100.2", ""},
		{"fd00:c7d::2", ""},
		{"10.0.0.0/8", "without a prefix length"},
		{"fe80::1%lo", "zones"},
		{"::ffff:1.2.3.4", "IPv4-mapped"},
		{"nope", "not an IPv4 or IPv6 address"},
	} {
		_, err := ParseAddr(tc.in)
		checkErr(t, err, tc.wantErr)
	}
}

func TestParseEntry(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    Entry
		wantErr string
	}{
		{"10.0.0.0/8 id=5", ent("10.0.0.0/8", 5), ""},
		{"198.51.100.2 id=world", ent("198.51.100.2/32", 2), ""},
		{"fd00::/64 id=host", ent("fd00::/64", 1), ""},
		{"10.0.0.0/8", Entry{}, "missing id=N"},
		{"10.0.0.0/8 5", Entry{}, "missing id=N"},
		{"10.0.0.0/8 identity=5", Entry{}, "missing id=N"},
		{"10.0.0.0/8 id=5 extra", Entry{}, `unexpected "extra"`},
		{"10.0.0.0/8 id=abc", Entry{}, `invalid identity "abc"`},
		{"10.0.0.0/8 id=0", Entry{}, "0 is never a valid identity"},
		{"10.0.0.0/8 id=-1", Entry{}, "negative"},
		{"10.0.0.0/8 id=4294967296", Entry{}, "out of range"},
		{"10.0.0.0/8 id=", Entry{}, "empty identity"},
		{"10.0.0.0/33 id=5", Entry{}, "out of range for IPv4"},
		{"10.0.0.1/8 id=5", Entry{}, "host bits set"},
		{"fe80::1%eth0 id=5", Entry{}, "zones"},
		{"id=5 10.0.0.0/8", Entry{}, "not an IPv4 or IPv6 address"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseEntry(strings.Fields(tc.in))
			checkErr(t, err, tc.wantErr)
			if got != tc.want {
				t.Errorf("ParseEntry(%q) = %v, want %v", tc.in, got, tc.want)
			}
		})
	}
}

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     int // entries
		wantErr  string
	}{
		{"entries and comments", "# ids\n10.0.0.0/8 id=5\n\n  fd00::/8   id=6  # trailing\n10.1.0.0/16 id=world\n", 3, ""},
		{"same line twice counts once", "10.0.0.0/8 id=5\n10.0.0.0/8 id=5\n", 1, ""},
		{"no final newline", "10.0.0.0/8 id=5", 1, ""},
		{"CRLF", "10.0.0.0/8 id=5\r\n10.2.0.0/16 id=6\r\n", 2, ""},
		{"empty", "", 0, "no entries"},
		{"only comments", "# nothing\n\n   \n", 0, "no entries"},
		{"bad line is named", "10.0.0.0/8 id=5\n# c\n\n10.1.0.0/16 id=6\n10.2.0.0/16 id=7\n10.3.0.0/16 id=8\n10.0.0.1/8 id=9\n", 0, "line 7: 10.0.0.1/8 has host bits set"},
		{"conflicting duplicate", "10.0.0.0/8 id=5\n\n10.0.0.0/8 id=6\n", 0, "line 3: 10.0.0.0/8 id=6 conflicts with id=5 on line 1"},
		{"missing id", "10.0.0.0/8\n", 0, "line 1: missing id=N"},
		{"zero id", "10.0.0.0/8 id=0\n", 0, "line 1: invalid identity 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(strings.NewReader(tc.in))
			checkErr(t, err, tc.wantErr)
			if len(got) != tc.want {
				t.Errorf("Parse returned %d entries, want %d: %v", len(got), tc.want, got)
			}
		})
	}
}

func checkErr(t *testing.T, err error, want string) {
	t.Helper()
	switch {
	case want == "" && err != nil:
		t.Fatalf("unexpected error: %v", err)
	case want != "" && err == nil:
		t.Fatalf("no error, want one containing %q", want)
	case want != "" && !strings.Contains(err.Error(), want):
		t.Fatalf("error %q does not contain %q", err, want)
	case err != nil && strings.Contains(err.Error(), "\n"):
		t.Fatalf("error is not one line: %q", err)
	}
}

func ent(prefix string, id uint32) Entry {
	return Entry{Prefix: netip.MustParsePrefix(prefix), Identity: id}
}
