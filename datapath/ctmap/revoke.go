package ctmap

import (
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/ctd-dev/ctd/bpf"
)

// Verdict says what Revoker.Revoke did with one entry.
type Verdict uint8

const (
	// Revoked: the policy in force denies the flow; it is marked revoked.
	Revoked = Verdict(bpf.CtrevokeRevokeOutcomeREVOKE_REVOKED)
	// Kept: the policy in force still allows the flow; it is untouched.
	Kept = Verdict(bpf.CtrevokeRevokeOutcomeREVOKE_KEPT)
	// AlreadyRevoked: the flow was revoked before.
	AlreadyRevoked = Verdict(bpf.CtrevokeRevokeOutcomeREVOKE_ALREADY)
	// Gone: there was no entry (expired, evicted or deleted meanwhile).
	Gone = Verdict(bpf.CtrevokeRevokeOutcomeREVOKE_MISSING)
)

// RevokeBatch is how many entries one run of the revoke program judges.
const RevokeBatch = int(bpf.CtrevokeRevokeLimitREVOKE_BATCH)

type revokeRecord = bpf.CtrevokeRevokeRec

const revokeRecSize = int(unsafe.Sizeof(revokeRecord{}))

// Revoker judges conntrack entries again against the policy in force and
// marks those it now denies revoked, with a small BPF program
// (bpf/ctrevoke.c) run by BPF_PROG_TEST_RUN: the judgment is the
// datapath's own policy_verdict, and the mark is set in the kernel, so
// that the datapath's concurrent updates of counters and state are kept.
type Revoker struct {
	prog *ebpf.Program
	buf  []byte
}

// NewRevoker loads the revoke program for m, judging against the policy
// and config maps (policy_v1, config_v1) the datapath uses. Close
// releases it.
func (m *Map) NewRevoker(policy, config *ebpf.Map) (*Revoker, error) {
	spec, err := bpf.LoadCtrevoke()
	if err != nil {
		return nil, fmt.Errorf("load conntrack revoke program: %w", err)
	}
	repl := map[string]*ebpf.Map{
		bpf.CtrevokeMapCt4V2:            m.t.Confirmed4,
		bpf.CtrevokeMapCt6V2:            m.t.Confirmed6,
		bpf.CtrevokeMapCt4UnconfirmedV2: m.t.Unconfirmed4,
		bpf.CtrevokeMapCt6UnconfirmedV2: m.t.Unconfirmed6,
		bpf.CtrevokeMapPolicyV1:         policy,
		bpf.CtrevokeMapConfigV1:         config,
	}
	var objs bpf.CtrevokeObjects
	if err := loadAgainst(spec, repl, &objs); err != nil {
		return nil, fmt.Errorf("load conntrack revoke program: %w", err)
	}
	objs.CtrevokeMaps.Close() // the replacements stay open
	return &Revoker{prog: objs.CtdCtRevoke, buf: make([]byte, RevokeBatch*revokeRecSize)}, nil
}

// Close unloads the program.
func (r *Revoker) Close() error { return r.prog.Close() }

// Revoke judges up to RevokeBatch entries in one program run and writes
// what it did with keys[i] to verdicts[i].
func (r *Revoker) Revoke(keys []Key, verdicts []Verdict) error {
	if len(keys) > RevokeBatch || len(verdicts) < len(keys) {
		return fmt.Errorf("revoke conntrack entries: %d keys (at most %d) for %d verdicts", len(keys), RevokeBatch, len(verdicts))
	}
	if len(keys) == 0 {
		return nil
	}
	buf := r.buf[:len(keys)*revokeRecSize]
	recs := unsafe.Slice((*revokeRecord)(unsafe.Pointer(unsafe.SliceData(buf))), len(keys))
	for i := range keys {
		recs[i] = revokeRecord{}
		recs[i].Key.Key, recs[i].Key.Family = keys[i].anyKey(), keys[i].Family
	}
	if _, err := r.prog.Run(&ebpf.RunOptions{Data: buf, DataOut: buf}); err != nil {
		return fmt.Errorf("revoke conntrack entries: %w", err)
	}
	for i := range keys {
		v := Verdict(recs[i].Outcome)
		if v < Revoked || v > Gone {
			return fmt.Errorf("revoke conntrack entries: the program left entry %d undecided (%d)", i, v)
		}
		verdicts[i] = v
	}
	return nil
}
