// Package policymap gives typed access to policy rules (policy_v1) and the default verdicts (config_v1).
package policymap

import (
	"errors"
	"fmt"
	"slices"
	"strconv"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/config"
)

// Verdict is a rule's or a default's decision (enum verdict in bpf/common.h).
type Verdict uint8

const (
	// VerdictUnset is a default verdict never configured; the datapath allows.
	VerdictUnset = Verdict(bpf.CtdVerdictVERDICT_UNSET)
	Allow        = Verdict(bpf.CtdVerdictVERDICT_ALLOW)
	Deny         = Verdict(bpf.CtdVerdictVERDICT_DENY)
)

func (v Verdict) String() string {
	switch v {
	case VerdictUnset:
		return "unset"
	case Allow:
		return "allow"
	case Deny:
		return "deny"
	}
	return "verdict" + strconv.Itoa(int(v))
}

// Effective is the verdict the datapath applies: unset means allow.
func (v Verdict) Effective() Verdict {
	if v == VerdictUnset {
		return Allow
	}
	return v
}

// Wildcards in a Rule.
const (
	AnyIdentity        = uint32(bpf.CtdReservedIdentityIDENTITY_ANY)
	AnyProto    uint8  = 0
	AnyPort     uint16 = 0
)

// Rule is one policy entry. The datapath matches the remote identity (the
// source on ingress, the destination on egress), the IP protocol and the
// destination port of a flow's first packet; zero fields are wildcards.
type Rule struct {
	Dir      bpf.Direction
	Identity uint32 // remote identity; AnyIdentity matches every identity
	Proto    uint8  // IP protocol; AnyProto matches every protocol
	Port     uint16 // destination port, TCP and UDP only; AnyPort matches every port
	Verdict  Verdict
}

// Key and Value are policy_v1's raw layout; Config is config_v1's.
type (
	Key    = bpf.CtdPolicyKey
	Value  = bpf.CtdPolicyValue
	Config = config.Values
)

func (r Rule) key() Key {
	return Key{Identity: r.Identity, Port: r.Port, Proto: r.Proto, Dir: uint8(r.Dir)}
}

func ruleOf(k *Key, v *Value) Rule {
	return Rule{Dir: bpf.Direction(k.Dir), Identity: k.Identity, Proto: k.Proto, Port: k.Port, Verdict: Verdict(v.Verdict)}
}

// Same reports whether r and o have the same selector (all but the verdict).
func (r Rule) Same(o Rule) bool { return r.key() == o.key() }

func (r Rule) check() error {
	switch {
	case r.Dir != bpf.Ingress && r.Dir != bpf.Egress:
		return fmt.Errorf("invalid direction %d", r.Dir)
	case r.Verdict != Allow && r.Verdict != Deny:
		return fmt.Errorf("invalid rule verdict %v: a rule allows or denies", r.Verdict)
	}
	return nil
}

// ErrNotFound is matched (errors.Is) by Delete and Get of a rule that is not in the map.
var ErrNotFound = errors.New("no such policy rule")

// Map is the policy table and the configuration it depends on.
//
// config_v1 also carries fields this package does not own (the event rate
// limit); it only changes its own, the default verdicts and PolicyRules,
// through config.Map, which serialises writers across processes.
//
// The datapath skips the rule lookups while PolicyRules is 0, so the count
// must never be 0 while a rule exists: Put raises it before inserting a new
// rule, Delete lowers it after deleting one, and both then set it to the
// number of rules actually in the map. Two processes changing rules at
// once must still be serialised by the caller (the count of one may
// overwrite the other's); ctd's are, by the state store's transaction.
type Map struct {
	policy *ebpf.Map
	config *config.Map
}

// New wraps the policy_v1 map and the configuration.
func New(policy *ebpf.Map, cfg *config.Map) *Map { return &Map{policy: policy, config: cfg} }

// Get returns the rule with r's selector (r.Verdict is ignored).
func (m *Map) Get(r Rule) (Rule, error) {
	k := r.key()
	var v Value
	err := m.policy.Lookup(&k, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return Rule{}, ErrNotFound
	}
	if err != nil {
		return Rule{}, fmt.Errorf("look up policy rule: %w", err)
	}
	return ruleOf(&k, &v), nil
}

// Put inserts a rule or changes the verdict of the rule with its selector.
func (m *Map) Put(r Rule) error {
	if err := r.check(); err != nil {
		return err
	}
	n, err := m.count()
	if err != nil {
		return err
	}
	_, err = m.Get(r)
	isNew := errors.Is(err, ErrNotFound)
	if err != nil && !isNew {
		return err
	}
	if isNew {
		// Announce the rule before it exists, never after.
		if err := m.setRuleCount(uint32(n + 1)); err != nil {
			return err
		}
	}
	k := r.key()
	if err := m.policy.Put(&k, &Value{Verdict: uint8(r.Verdict)}); err != nil {
		err = fmt.Errorf("write policy rule: %w", err)
		return errors.Join(err, m.SyncRuleCount())
	}
	return m.SyncRuleCount()
}

// Delete removes the rule with r's selector (r.Verdict is ignored); it
// wraps ErrNotFound when there is none.
func (m *Map) Delete(r Rule) error {
	k := r.key()
	err := m.policy.Delete(&k)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return ErrNotFound
	}
	if err != nil {
		return fmt.Errorf("delete policy rule: %w", err)
	}
	return m.SyncRuleCount()
}

// List returns every rule, ordered by direction, identity, protocol and port.
func (m *Map) List() ([]Rule, error) {
	var (
		out []Rule
		k   Key
		v   Value
	)
	// policy_v1 is small (at most 65536 rules): plain iteration suffices.
	it := m.policy.Iterate()
	for it.Next(&k, &v) {
		out = append(out, ruleOf(&k, &v))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read policy rules: %w", err)
	}
	slices.SortFunc(out, Compare)
	return out, nil
}

// Compare orders rules as List does.
func Compare(a, b Rule) int {
	ka, kb := a.key(), b.key()
	switch {
	case ka.Dir != kb.Dir:
		return int(ka.Dir) - int(kb.Dir)
	case ka.Identity != kb.Identity:
		if ka.Identity < kb.Identity {
			return -1
		}
		return 1
	case ka.Proto != kb.Proto:
		return int(ka.Proto) - int(kb.Proto)
	}
	return int(ka.Port) - int(kb.Port)
}

func (m *Map) count() (int, error) {
	n := 0
	var k Key
	var v Value
	it := m.policy.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("count policy rules: %w", err)
	}
	return n, nil
}

// SyncRuleCount sets PolicyRules to the number of rules in policy_v1.
func (m *Map) SyncRuleCount() error {
	n, err := m.count()
	if err != nil {
		return err
	}
	return m.setRuleCount(uint32(n))
}

func (m *Map) setRuleCount(n uint32) error {
	return m.config.Update(func(c *Config) { c.PolicyRules = n })
}

// RuleCount returns PolicyRules as the datapath sees it.
func (m *Map) RuleCount() (uint32, error) {
	c, err := m.config.Read()
	return c.PolicyRules, err
}

// Defaults returns the default verdict of each direction, indexed by bpf.Direction.
func (m *Map) Defaults() ([2]Verdict, error) {
	c, err := m.config.Read()
	return [2]Verdict{Verdict(c.DefaultVerdict[bpf.Ingress]), Verdict(c.DefaultVerdict[bpf.Egress])}, err
}

// SetDefault sets a direction's default verdict.
func (m *Map) SetDefault(d bpf.Direction, v Verdict) error {
	if d != bpf.Ingress && d != bpf.Egress {
		return fmt.Errorf("invalid direction %d", d)
	}
	if v != Allow && v != Deny {
		return fmt.Errorf("invalid default verdict %v: allow or deny", v)
	}
	return m.config.Update(func(c *Config) { c.DefaultVerdict[d] = uint8(v) })
}
