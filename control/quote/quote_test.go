package quote

import (
	"fmt"
	"strings"
	"testing"
)

func TestInput(t *testing.T) {
	for _, tc := range []struct {
		in, want string
	}{
		{"", `""`},
		{"10.0.0.0/33", `"10.0.0.0/33"`},
		{strings.Repeat("a", 80), `"` + strings.Repeat("a", 80) + `"`},
		{strings.Repeat("a", 81), `"` + strings.Repeat("a", 80) + `..." (81 bytes)`},
		{strings.Repeat("é", 100), `"` + strings.Repeat("é", 80) + `..." (200 bytes)`},
		{"a\nb", `"a\nb"`},
	} {
		if got := Input(tc.in); got != tc.want {
			t.Errorf("Input(%.20q...) = %s, want %s", tc.in, got, tc.want)
		}
	}
}

func TestMessage(t *testing.T) {
	long := strings.Repeat("x", 200<<10)
	for _, tc := range []struct {
		name, msg, want string
	}{
		{"short", `invalid CIDR "10.0.0.0/33": prefix length`, `invalid CIDR "10.0.0.0/33": prefix length`},
		{"quoted", fmt.Sprintf("line 1: invalid CIDR %q: not an address", long),
			`line 1: invalid CIDR "` + strings.Repeat("x", 80) + `..." (204800 bytes): not an address`},
		{"two quoted", fmt.Sprintf("unexpected %q after %q", long, "a b"),
			`unexpected "` + strings.Repeat("x", 80) + `..." (204800 bytes) after "a b"`},
		{"bare", "unknown flag: --" + long,
			"unknown flag: --" + strings.Repeat("x", 78) + "... (204802 bytes)"},
		{"quoted with escapes", fmt.Sprintf("bad %q", strings.Repeat("\x00", 100)),
			`bad "` + strings.Repeat(`\x00`, 80) + `..." (100 bytes)`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Message(tc.msg)
			if got != tc.want {
				t.Errorf("Message() = %q\nwant %q", got, tc.want)
			}
		})
	}
}
