// Package policy parses and applies identity-aware policy rules.
package policy

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/ipcache"
	"github.com/ctd-dev/ctd/control/ipproto"
	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/datapath/policymap"
)

// Rule is one policy rule.
type Rule = policymap.Rule

// Syntax is the rule grammar, for messages and help.
const Syntax = "ingress|egress id=N|any [PROTO[/PORT]|any[/PORT]] allow|deny"

// ParseDirection parses ingress or egress.
func ParseDirection(s string) (bpf.Direction, error) {
	switch s {
	case "ingress":
		return bpf.Ingress, nil
	case "egress":
		return bpf.Egress, nil
	}
	return 0, fmt.Errorf("invalid direction %q: valid are ingress, egress", s)
}

// ParseVerdict parses allow or deny.
func ParseVerdict(s string) (policymap.Verdict, error) {
	switch s {
	case "allow":
		return policymap.Allow, nil
	case "deny":
		return policymap.Deny, nil
	}
	return 0, fmt.Errorf("invalid verdict %q: valid are allow, deny", s)
}

// ProtoName names a rule's protocol: any, a name (tcp, udp, icmpv6, sctp,
// gre, ...; see ipproto.Name) or its number.
func ProtoName(p uint8) string {
	if p == policymap.AnyProto {
		return "any"
	}
	return ipproto.Name(p)
}

// parseRemote parses id=N, id=world, id=host, id=any or any.
func parseRemote(s string) (uint32, error) {
	if s == "any" || s == "id=any" {
		return policymap.AnyIdentity, nil
	}
	v, ok := strings.CutPrefix(s, "id=")
	if !ok {
		return 0, fmt.Errorf("invalid remote %q: want id=N (1-4294967295, world, host) or any", s)
	}
	return ipcache.ParseIdentity(v)
}

// parsePorts parses a protocol (any, a name of /etc/protocols or a number
// 1-255), optionally with /PORT: only for the protocols with ports (tcp,
// udp, sctp) and any.
func parsePorts(s string) (proto uint8, port uint16, err error) {
	name, portStr, hasPort := strings.Cut(s, "/")
	if name != "any" {
		protos, err := ipproto.Load(ipproto.File)
		if err != nil {
			return 0, 0, err
		}
		if proto, err = protos.Parse(name); err != nil {
			return 0, 0, fmt.Errorf("%w, or any", err)
		}
	}
	if !hasPort {
		return proto, policymap.AnyPort, nil
	}
	if proto != policymap.AnyProto && !ipproto.HasPorts(proto) {
		return 0, 0, fmt.Errorf("invalid %q: %s has no ports; a port goes only with tcp, udp, sctp or any", s, ProtoName(proto))
	}
	n, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || n == 0 || portStr[0] == '+' {
		return 0, 0, fmt.Errorf("invalid port %q in %q: want a number 1-65535", portStr, s)
	}
	return proto, uint16(n), nil
}

// ParseSelector parses a rule given as fields, following Syntax. The
// verdict is required unless verdictOptional; without one, the returned
// rule's Verdict is VerdictUnset.
func ParseSelector(fields []string, verdictOptional bool) (Rule, error) {
	var r Rule
	if len(fields) < 2 {
		return Rule{}, fmt.Errorf("incomplete rule %q: want %s", strings.Join(fields, " "), Syntax)
	}
	var err error
	if r.Dir, err = ParseDirection(fields[0]); err != nil {
		return Rule{}, err
	}
	if r.Identity, err = parseRemote(fields[1]); err != nil {
		return Rule{}, err
	}
	rest := fields[2:]
	// The last field is a verdict if it reads like one.
	if n := len(rest); n > 0 && (rest[n-1] == "allow" || rest[n-1] == "deny") {
		r.Verdict, _ = ParseVerdict(rest[n-1])
		rest = rest[:n-1]
	} else if !verdictOptional {
		return Rule{}, fmt.Errorf("missing verdict allow or deny at the end of %q: want %s", strings.Join(fields, " "), Syntax)
	}
	switch len(rest) {
	case 0:
	case 1:
		if r.Proto, r.Port, err = parsePorts(rest[0]); err != nil {
			return Rule{}, err
		}
	default:
		return Rule{}, fmt.Errorf("unexpected %q in %q: want %s", strings.Join(rest[1:], " "), strings.Join(fields, " "), Syntax)
	}
	return r, nil
}

// ParseRule parses a complete rule, verdict included.
func ParseRule(fields []string) (Rule, error) { return ParseSelector(fields, false) }

// Selector formats a rule's selector as ParseSelector reads it.
func Selector(r Rule) string {
	id := "any"
	if r.Identity != policymap.AnyIdentity {
		id = "id=" + strconv.FormatUint(uint64(r.Identity), 10)
	}
	s := r.Dir.String() + " " + id
	switch {
	case r.Port != policymap.AnyPort:
		s += " " + ProtoName(r.Proto) + "/" + strconv.Itoa(int(r.Port))
	case r.Proto != policymap.AnyProto:
		s += " " + ProtoName(r.Proto)
	}
	return s
}

// Format formats a rule as ParseRule reads it.
func Format(r Rule) string { return Selector(r) + " " + r.Verdict.String() }

// Policy is the policy as operators change it: the datapath's maps and,
// when Store is set, the desired-state store, which the daemon restores and
// reconciles the maps from. Each change goes through Store.Change: recorded
// in the store with an intent mark, then applied to the maps, under the
// store's lock, which also keeps other ctd processes from interleaving (the
// rule count in config_v1 is a read-modify-write). A change killed midway
// is finished by the next ctd process; if the maps refuse it, neither keeps
// it.
type Policy struct {
	Map   *policymap.Map
	Store *store.Store // nil: the maps only
	// Finish makes the maps equal to the store: it finishes a change
	// another ctd process left unfinished (see store.Change).
	Finish store.Finisher
}

// change records a change with record (run with a nil Tx without a store)
// and applies it with apply.
func (p Policy) change(what string, record func(tx *store.Tx) error, apply func() error) error {
	if p.Store == nil {
		if err := record(nil); err != nil {
			return err
		}
		return apply()
	}
	return p.Store.Change(store.Change{What: what, Record: record, Apply: apply}, p.Finish)
}

func keyOf(r Rule) store.RuleKey {
	return store.RuleKey{Dir: store.Direction(r.Dir), Identity: r.Identity, Proto: r.Proto, Port: r.Port}
}

// Add inserts a rule or changes the verdict of the rule with its selector,
// and reports the verdict it had before (VerdictUnset when it is new).
func (p Policy) Add(r Rule) (previous policymap.Verdict, err error) {
	if r.Verdict != policymap.Allow && r.Verdict != policymap.Deny {
		return 0, fmt.Errorf("rule %q has no verdict: want allow or deny", Selector(r))
	}
	record := func(tx *store.Tx) error {
		old, err := p.Map.Get(r)
		if err != nil && !errors.Is(err, policymap.ErrNotFound) {
			return err
		}
		previous = old.Verdict
		if tx == nil {
			return nil
		}
		return tx.PutRule(keyOf(r), store.Verdict(r.Verdict))
	}
	apply := func() error {
		if err := p.Map.Put(r); err != nil {
			return fmt.Errorf("add rule %q: %w", Format(r), err)
		}
		return nil
	}
	return previous, p.change("policy add", record, apply)
}

// Delete removes the rule with r's selector. If r has a verdict, the rule
// must have that verdict. It returns the removed rule, and fails when the
// rule is neither in the map nor in the store.
func (p Policy) Delete(r Rule) (removed Rule, err error) {
	var inMap bool
	record := func(tx *store.Tx) error {
		old, err := p.Map.Get(r)
		inMap = err == nil
		if err != nil && !errors.Is(err, policymap.ErrNotFound) {
			return err
		}
		inStore := false
		if tx != nil {
			rules, err := tx.Rules()
			if err != nil {
				return err
			}
			var v store.Verdict
			if v, inStore = rules[keyOf(r)]; inStore && !inMap {
				old = r
				old.Verdict = policymap.Verdict(v)
			}
		}
		if !inMap && !inStore {
			return fmt.Errorf("no rule %q (see 'ctd policy list')", Selector(r))
		}
		if r.Verdict != policymap.VerdictUnset && old.Verdict != r.Verdict {
			return fmt.Errorf("rule %q is %v, not %v: nothing deleted", Selector(r), old.Verdict, r.Verdict)
		}
		removed = old
		if tx == nil {
			return nil
		}
		return tx.DeleteRule(keyOf(r))
	}
	apply := func() error {
		if !inMap {
			return nil
		}
		if err := p.Map.Delete(r); errors.Is(err, policymap.ErrNotFound) {
			return fmt.Errorf("no rule %q (deleted meanwhile)", Selector(r))
		} else if err != nil {
			return fmt.Errorf("delete rule %q: %w", Selector(r), err)
		}
		return nil
	}
	return removed, p.change("policy del", record, apply)
}

// SetDefault sets a direction's default verdict and returns the one it had.
func (p Policy) SetDefault(d bpf.Direction, v policymap.Verdict) (previous policymap.Verdict, err error) {
	record := func(tx *store.Tx) error {
		defaults, err := p.Map.Defaults()
		if err != nil {
			return err
		}
		previous = defaults[d]
		if tx == nil {
			return nil
		}
		return tx.SetDefault(store.Direction(d), store.Verdict(v))
	}
	return previous, p.change("policy default", record, func() error { return p.Map.SetDefault(d, v) })
}

// State is the whole policy: default verdicts and rules.
type State struct {
	// Defaults by Direction, as configured (VerdictUnset: never set, allows).
	Defaults [2]policymap.Verdict
	Rules    []Rule
	// RuleCount is the datapath's PolicyRules; it equals len(Rules)
	// unless a change is under way.
	RuleCount uint32
}

// Show reads the whole policy.
func Show(m *policymap.Map) (State, error) {
	var (
		s   State
		err error
	)
	if s.Defaults, err = m.Defaults(); err != nil {
		return State{}, err
	}
	if s.Rules, err = m.List(); err != nil {
		return State{}, err
	}
	if s.RuleCount, err = m.RuleCount(); err != nil {
		return State{}, err
	}
	return s, nil
}
