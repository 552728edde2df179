package main

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

func TestPolicyCLI(t *testing.T) {
	e := newCLIEnv(t)
	listJSON := func() policyJSON {
		t.Helper()
		var p policyJSON
		if err := json.Unmarshal([]byte(e.must("policy", "list", "-o", "json")), &p); err != nil {
			t.Fatal(err)
		}
		return p
	}

	if _, err := e.run("", "policy", "list"); err == nil || !strings.Contains(err.Error(), "no ctd datapath") {
		t.Fatalf("policy list before anything is pinned: %v", err)
	}
	for _, step := range []struct{ args, want string }{
		{"policy default ingress deny", "default ingress deny (was allow, unset)\n"},
		{"policy add ingress id=42 tcp/8080 allow", "added ingress id=42 tcp/8080 allow\n"},
		{"policy add ingress id=42 tcp/8080 deny", "updated ingress id=42 tcp/8080 deny (was allow)\n"},
		{"policy add ingress id=42 tcp/8080 deny", "unchanged ingress id=42 tcp/8080 deny\n"},
		{"policy add egress any udp/53 allow", "added egress any udp/53 allow\n"},
		{"policy add ingress id=world icmp deny", "added ingress id=2 icmp deny\n"},
		{"policy add egress id=7 any/443 allow", "added egress id=7 any/443 allow\n"},
		{"policy del egress id=7 any/443", "deleted egress id=7 any/443 allow\n"},
		{"policy list", "default ingress deny\ndefault egress allow, unset\ningress id=2 icmp deny\ningress id=42 tcp/8080 deny\negress any udp/53 allow\n"},
	} {
		if out := e.must(strings.Fields(step.args)...); out != step.want {
			t.Errorf("ctd %s printed %q, want %q", step.args, out, step.want)
		}
	}
	want := policyJSON{
		Defaults: map[string]string{"ingress": "deny", "egress": "allow"},
		Rules: []policyRuleJSON{
			{"ingress", 2, "icmp", 0, "deny", "ingress id=2 icmp deny"},
			{"ingress", 42, "tcp", 8080, "deny", "ingress id=42 tcp/8080 deny"},
			{"egress", 0, "udp", 53, "allow", "egress any udp/53 allow"},
		},
	}
	if got := listJSON(); !reflect.DeepEqual(got, want) {
		t.Fatalf("policy list -o json = %+v\nwant %+v", got, want)
	}

	for _, tc := range []struct{ args, wantErr string }{
		{"policy add ingress id=42 tcp/8080", "missing verdict"},
		{"policy add ingress id=42 icmp/8 allow", "icmp has no ports; a port goes only with tcp, udp, sctp or any"},
		{"policy add ingress id=42 gre/1 allow", "gre has no ports"},
		{"policy add ingress id=42 tcp/0 allow", "want a number 1-65535"},
		{"policy add ingress id=42 tcp/65536 allow", "want a number 1-65535"},
		{"policy add ingress id=0 allow", "0 is never a valid identity"},
		{"policy add ingress id=4294967296 allow", "out of range"},
		{"policy add ingress id=abc allow", `invalid identity "abc"`},
		{"policy add sideways any allow", `invalid direction "sideways"`},
		{"policy add ingress any grease allow", `invalid protocol "grease"`},
		{"policy add ingress any tcp/80 udp/53 allow", `unexpected "udp/53"`},
		{"policy del ingress id=42 tcp/8080 allow", "is deny, not allow: nothing deleted"},
		{"policy del ingress id=43 tcp/8080", `no rule "ingress id=43 tcp/8080"`},
		{"policy default ingress", "want 2 argument(s)"},
		{"policy default both deny", `invalid direction "both"`},
		{"policy default ingress drop", `invalid verdict "drop"`},
		{"policy list -o yaml", "invalid --output"},
	} {
		out, err := e.run("", strings.Fields(tc.args)...)
		switch {
		case err == nil:
			t.Errorf("ctd %s succeeded: %q", tc.args, out)
		case !strings.Contains(err.Error(), tc.wantErr) || strings.Contains(err.Error(), "\n"):
			t.Errorf("ctd %s: error %q, want one line containing %q", tc.args, err, tc.wantErr)
		}
		if got := listJSON(); !reflect.DeepEqual(got, want) {
			t.Fatalf("ctd %s failed but changed the policy: %+v", tc.args, got)
		}
	}
}
