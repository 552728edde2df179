package policymap

import (
	"errors"
	"slices"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/config"
	"github.com/ctd-dev/ctd/datapath/loader"
)

func newTestMap(t *testing.T) *Map {
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
	return New(maps[0], config.New(maps[1], ""))
}

func (m *Map) rawConfig(t *testing.T) Config {
	t.Helper()
	c, err := m.config.Read()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestRulesKeepCount(t *testing.T) {
	m := newTestMap(t)
	// Fields of config_v1 this package does not own must survive.
	if err := m.config.Update(func(c *Config) { *c = Config{EventsRate: 1000, EventsBurst: 50} }); err != nil {
		t.Fatal(err)
	}
	rules := []Rule{
		{Dir: bpf.Ingress, Identity: 42, Proto: 6, Port: 80, Verdict: Allow},
		{Dir: bpf.Ingress, Identity: AnyIdentity, Proto: 17, Verdict: Deny},
		{Dir: bpf.Egress, Identity: 7, Proto: AnyProto, Port: 53, Verdict: Allow},
		{Dir: bpf.Ingress, Identity: 42, Proto: 6, Verdict: Deny},
	}
	for i, r := range rules {
		if err := m.Put(r); err != nil {
			t.Fatalf("Put(%+v): %v", r, err)
		}
		if c := m.rawConfig(t); c.PolicyRules != uint32(i+1) {
			t.Fatalf("after %d puts PolicyRules = %d", i+1, c.PolicyRules)
		}
	}
	// Changing a verdict is no new rule.
	flip := rules[0]
	flip.Verdict = Deny
	if err := m.Put(flip); err != nil {
		t.Fatal(err)
	}
	if got, err := m.Get(Rule{Dir: bpf.Ingress, Identity: 42, Proto: 6, Port: 80}); err != nil || got != flip {
		t.Fatalf("Get = %+v, %v; want %+v", got, err, flip)
	}
	c := m.rawConfig(t)
	if c.PolicyRules != uint32(len(rules)) || c.EventsRate != 1000 || c.EventsBurst != 50 {
		t.Fatalf("config after updates = %+v", c)
	}

	got, err := m.List()
	if err != nil {
		t.Fatal(err)
	}
	want := slices.Clone(rules)
	want[0] = flip
	slices.SortFunc(want, Compare)
	if !slices.Equal(got, want) {
		t.Fatalf("List = %+v\nwant %+v", got, want)
	}

	for i, r := range rules {
		if err := m.Delete(r); err != nil {
			t.Fatalf("Delete(%+v): %v", r, err)
		}
		if c := m.rawConfig(t); c.PolicyRules != uint32(len(rules)-i-1) {
			t.Fatalf("after %d deletes PolicyRules = %d", i+1, c.PolicyRules)
		}
	}
	if err := m.Delete(rules[0]); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleting a missing rule: %v, want ErrNotFound", err)
	}
	if c := m.rawConfig(t); c.EventsRate != 1000 || c.EventsBurst != 50 {
		t.Fatalf("event rate limit clobbered: %+v", c)
	}
}

func TestPutRejects(t *testing.T) {
	m := newTestMap(t)
	for _, r := range []Rule{
		{Dir: bpf.Ingress, Verdict: VerdictUnset},
		{Dir: bpf.Ingress, Verdict: 3},
		{Dir: 2, Verdict: Allow},
	} {
		if err := m.Put(r); err == nil {
			t.Errorf("Put(%+v) succeeded", r)
		}
	}
	if n, _ := m.RuleCount(); n != 0 {
		t.Errorf("PolicyRules = %d after rejected puts", n)
	}
}

func TestDefaults(t *testing.T) {
	m := newTestMap(t)
	d, err := m.Defaults()
	if err != nil || d != [2]Verdict{VerdictUnset, VerdictUnset} {
		t.Fatalf("fresh defaults = %v, %v", d, err)
	}
	if d[bpf.Ingress].Effective() != Allow {
		t.Fatalf("unset default is %v, want allow", d[bpf.Ingress].Effective())
	}
	if err := m.config.Update(func(c *Config) { *c = Config{PolicyRules: 3, EventsRate: 9, EventsBurst: 4} }); err != nil {
		t.Fatal(err)
	}
	if err := m.SetDefault(bpf.Ingress, Deny); err != nil {
		t.Fatal(err)
	}
	if err := m.SetDefault(bpf.Egress, Allow); err != nil {
		t.Fatal(err)
	}
	if d, _ := m.Defaults(); d != [2]Verdict{Deny, Allow} {
		t.Fatalf("defaults = %v", d)
	}
	if c := m.rawConfig(t); c.PolicyRules != 3 || c.EventsRate != 9 || c.EventsBurst != 4 {
		t.Fatalf("SetDefault changed other fields: %+v", c)
	}
	if err := m.SetDefault(bpf.Ingress, VerdictUnset); err == nil {
		t.Fatal("SetDefault(unset) succeeded")
	}
	// SyncRuleCount repairs a count that disagrees with the table.
	if err := m.SyncRuleCount(); err != nil {
		t.Fatal(err)
	}
	if n, _ := m.RuleCount(); n != 0 {
		t.Fatalf("PolicyRules = %d after sync of an empty table", n)
	}
}
