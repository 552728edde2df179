package policy

import (
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/datapath/config"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/policymap"
)

func TestParseSelector(t *testing.T) {
	in, eg := bpf.Ingress, bpf.Egress
	allow, deny, unset := policymap.Allow, policymap.Deny, policymap.VerdictUnset
	for _, tc := range []struct {
		in       string
		optional bool // verdict optional (policy del)
		want     Rule
		wantErr  string
	}{
		{"ingress id=42 tcp/8080 allow", false, Rule{Dir: in, Identity: 42, Proto: 6, Port: 8080, Verdict: allow}, ""},
		{"egress id=7 udp deny", false, Rule{Dir: eg, Identity: 7, Proto: 17, Verdict: deny}, ""},
		{"ingress any deny", false, Rule{Dir: in, Verdict: deny}, ""},
		{"ingress id=any any/53 allow", false, Rule{Dir: in, Port: 53, Verdict: allow}, ""},
		{"ingress id=world icmp deny", false, Rule{Dir: in, Identity: 2, Proto: 1, Verdict: deny}, ""},
		{"egress id=host icmpv6 allow", false, Rule{Dir: eg, Identity: 1, Proto: 58, Verdict: allow}, ""},
		{"ingress id=1 tcp/65535 allow", false, Rule{Dir: in, Identity: 1, Proto: 6, Port: 65535, Verdict: allow}, ""},
		{"ingress id=4294967295 any allow", false, Rule{Dir: in, Identity: 4294967295, Verdict: allow}, ""},
		{"ingress id=42 tcp/8080", true, Rule{Dir: in, Identity: 42, Proto: 6, Port: 8080, Verdict: unset}, ""},
		{"ingress id=42 tcp/8080 deny", true, Rule{Dir: in, Identity: 42, Proto: 6, Port: 8080, Verdict: deny}, ""},
		{"ingress any", true, Rule{Dir: in, Verdict: unset}, ""},

		{"ingress id=42 tcp/8080", false, Rule{}, "missing verdict"},
		{"ingress", false, Rule{}, "incomplete rule"},
		{"", true, Rule{}, "incomplete rule"},
		{"inbound id=42 allow", false, Rule{}, `invalid direction "inbound"`},
		{"ingress 42 allow", false, Rule{}, `invalid remote "42"`},
		{"ingress id=0 allow", false, Rule{}, "0 is never a valid identity"},
		{"ingress id=-1 allow", false, Rule{}, "negative"},
		{"ingress id=4294967296 allow", false, Rule{}, "out of range"},
		{"ingress id=abc allow", false, Rule{}, `invalid identity "abc"`},
		{"ingress id=42 sctp allow", false, Rule{Dir: in, Identity: 42, Proto: 132, Verdict: allow}, ""},
		{"ingress id=42 sctp/3868 allow", false, Rule{Dir: in, Identity: 42, Proto: 132, Port: 3868, Verdict: allow}, ""},
		{"ingress id=42 47 allow", false, Rule{Dir: in, Identity: 42, Proto: 47, Verdict: allow}, ""},
		{"ingress id=42 gre allow", false, Rule{Dir: in, Identity: 42, Proto: 47, Verdict: allow}, ""},
		{"egress any esp deny", false, Rule{Dir: eg, Proto: 50, Verdict: deny}, ""},
		{"ingress id=42 TCP allow", false, Rule{Dir: in, Identity: 42, Proto: 6, Verdict: allow}, ""},
		{"ingress id=42 253 allow", false, Rule{Dir: in, Identity: 42, Proto: 253, Verdict: allow}, ""},
		{"ingress id=42 tcpp allow", false, Rule{}, `invalid protocol "tcpp"`},
		{"ingress id=42 0 allow", false, Rule{}, `invalid protocol "0"`},
		{"ingress id=42 256 allow", false, Rule{}, "or a number 1-255"},
		{"ingress id=42 icmp/8 allow", false, Rule{}, "icmp has no ports; a port goes only with tcp, udp, sctp or any"},
		{"ingress id=42 icmpv6/1 allow", false, Rule{}, "icmpv6 has no ports"},
		{"ingress id=42 gre/1 allow", false, Rule{}, "gre has no ports"},
		{"ingress id=42 47/1 allow", false, Rule{}, "gre has no ports"},
		{"ingress id=42 tcp/0 allow", false, Rule{}, "want a number 1-65535"},
		{"ingress id=42 tcp/65536 allow", false, Rule{}, "want a number 1-65535"},
		{"ingress id=42 tcp/-1 allow", false, Rule{}, "want a number 1-65535"},
		{"ingress id=42 tcp/ allow", false, Rule{}, "want a number 1-65535"},
		{"ingress id=42 tcp/http allow", false, Rule{}, "want a number 1-65535"},
		{"ingress id=42 tcp/80 udp/53 allow", false, Rule{}, `unexpected "udp/53"`},
		{"ingress id=42 tcp/80 allow please", false, Rule{}, "missing verdict"},
		{"ingress id=42 tcp/80 permit", false, Rule{}, "missing verdict"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseSelector(strings.Fields(tc.in), tc.optional)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("unexpected error: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
			}
			if got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
			if err == nil && got.Verdict != unset {
				// Formatting round-trips.
				back, err := ParseRule(strings.Fields(Format(got)))
				if err != nil || back != got {
					t.Fatalf("Format = %q parses to %+v, %v", Format(got), back, err)
				}
			}
		})
	}
}

func TestParseDefaults(t *testing.T) {
	if _, err := ParseDirection("both"); err == nil {
		t.Error("ParseDirection(both) succeeded")
	}
	if _, err := ParseVerdict("drop"); err == nil {
		t.Error("ParseVerdict(drop) succeeded")
	}
	if v, err := ParseVerdict("deny"); err != nil || v != policymap.Deny {
		t.Errorf("ParseVerdict(deny) = %v, %v", v, err)
	}
}

func newTestMap(t *testing.T) *policymap.Map {
	t.Helper()
	spec, err := bpf.LoadCtd()
	if err != nil {
		t.Fatal(err)
	}
	var maps []*ebpf.Map
	for _, name := range []string{loader.PolicyMap, loader.ConfigMap} {
		m, err := ebpf.NewMap(spec.Maps[name])
		if err != nil {
			t.Fatalf("create %s: %v", name, err)
		}
		t.Cleanup(func() { m.Close() })
		maps = append(maps, m)
	}
	return policymap.New(maps[0], config.New(maps[1], ""))
}

func TestAddDelete(t *testing.T) {
	m := newTestMap(t)
	pol := Policy{Map: m}
	r, _ := ParseRule(strings.Fields("ingress id=42 tcp/8080 allow"))
	if old, err := pol.Add(r); err != nil || old != policymap.VerdictUnset {
		t.Fatalf("Add = %v, %v", old, err)
	}
	flip := r
	flip.Verdict = policymap.Deny
	if old, err := pol.Add(flip); err != nil || old != policymap.Allow {
		t.Fatalf("Add (verdict change) = %v, %v", old, err)
	}
	// del with the wrong verdict changes nothing.
	if _, err := pol.Delete(r); err == nil || !strings.Contains(err.Error(), "is deny, not allow") {
		t.Fatalf("Delete with the wrong verdict: %v", err)
	}
	s, err := Show(m)
	if err != nil || len(s.Rules) != 1 || s.RuleCount != 1 {
		t.Fatalf("Show = %+v, %v", s, err)
	}
	sel, _ := ParseSelector(strings.Fields("ingress id=42 tcp/8080"), true)
	if old, err := pol.Delete(sel); err != nil || old != flip {
		t.Fatalf("Delete = %+v, %v", old, err)
	}
	if _, err := pol.Delete(sel); err == nil || !strings.Contains(err.Error(), `no rule "ingress id=42 tcp/8080"`) {
		t.Fatalf("second Delete: %v", err)
	}
	s, err = Show(m)
	if err != nil || len(s.Rules) != 0 || s.RuleCount != 0 {
		t.Fatalf("Show after delete = %+v, %v", s, err)
	}
	if _, err := pol.Add(sel); err == nil {
		t.Fatal("Add without a verdict succeeded")
	}
}

func TestPolicyStore(t *testing.T) {
	m := newTestMap(t)
	st, err := store.Open(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	pol := Policy{Map: m, Store: st}
	same := func(what string) {
		t.Helper()
		snap, err := st.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		s, err := Show(m)
		if err != nil {
			t.Fatal(err)
		}
		if len(s.Rules) != len(snap.Policy) || s.RuleCount != uint32(len(s.Rules)) {
			t.Fatalf("%s: map rules %v (count %d), stored %v", what, s.Rules, s.RuleCount, snap.Policy)
		}
		for _, r := range s.Rules {
			if v := snap.Policy[keyOf(r)]; policymap.Verdict(v) != r.Verdict {
				t.Fatalf("%s: map rule %q, stored verdict %v", what, Format(r), v)
			}
		}
		for d := range 2 {
			if policymap.Verdict(snap.Defaults[d]) != s.Defaults[d] {
				t.Fatalf("%s: map defaults %v, stored %v", what, s.Defaults, snap.Defaults)
			}
		}
	}
	mustRule := func(s string) Rule {
		r, err := ParseSelector(strings.Fields(s), true)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}

	if old, err := pol.SetDefault(bpf.Ingress, policymap.Deny); err != nil || old != policymap.VerdictUnset {
		t.Fatalf("SetDefault = %v, %v", old, err)
	}
	for _, r := range []string{"ingress id=42 tcp/8080 allow", "egress any udp/53 allow", "ingress id=world deny"} {
		if _, err := pol.Add(mustRule(r)); err != nil {
			t.Fatal(err)
		}
	}
	same("after adds")
	if _, err := pol.Delete(mustRule("egress any udp/53")); err != nil {
		t.Fatal(err)
	}
	same("after delete")

	// A rule only the store has (not restored by the daemon yet) is
	// deleted from the store.
	only := mustRule("ingress id=7 tcp allow")
	if err := st.Update(func(tx *store.Tx) error { return tx.PutRule(keyOf(only), store.Allow) }); err != nil {
		t.Fatal(err)
	}
	if _, err := pol.Delete(mustRule("ingress id=7 tcp deny")); err == nil {
		t.Fatal("Delete with the wrong verdict of a stored-only rule succeeded")
	}
	if old, err := pol.Delete(mustRule("ingress id=7 tcp")); err != nil || old != only {
		t.Fatalf("Delete of a stored-only rule = %+v, %v", old, err)
	}
	same("after deleting a stored-only rule")
}
