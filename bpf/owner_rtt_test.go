package bpf_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/ctd-dev/ctd/datapath/config"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/test/dptest"
)

// TestHandshakeRTT: the entry's rtt is the time from the opening SYN to the
// ACK completing the handshake, whichever side opened; it is unknown until
// then, a retransmitted SYN restarts the clock, and later packets leave it.
func TestHandshakeRTT(t *testing.T) {
	S, SA, A := dptest.SYN, dptest.SYN|dptest.ACK, dptest.ACK
	for _, o := range openers {
		for _, p := range pairs[:1] {
			for _, retransmit := range []bool{false, true} {
				name := o.name + "/" + p.name
				if retransmit {
					name += "/SYN retransmitted"
				}
				t.Run(name, func(t *testing.T) {
					d := dptest.New(t)
					send := func(fromOrig bool, flags uint8) ctmap.Flow {
						src, dst, dir := p.orig, p.resp, o.origDir
						if !fromOrig {
							src, dst, dir = p.resp, p.orig, o.respDir
						}
						d.Run(t, dir, dptest.TCP(t, src, dst, flags, nil))
						return d.Flows(t)[0]
					}
					t0 := time.Now()
					if fl := send(true, S); fl.RTT != 0 {
						t.Fatalf("rtt %d µs after the SYN, want unknown", fl.RTT)
					}
					if retransmit {
						time.Sleep(30 * time.Millisecond)
						t0 = time.Now()
						send(true, S)
					}
					time.Sleep(2 * time.Millisecond)
					if fl := send(false, SA); fl.RTT != 0 {
						t.Fatalf("rtt %d µs after the SYN-ACK, want unknown", fl.RTT)
					}
					time.Sleep(3 * time.Millisecond)
					fl := send(true, A)
					took := time.Since(t0)
					rtt := time.Duration(fl.RTT) * time.Microsecond
					if fl.State != ctmap.StateEstablished || rtt < 5*time.Millisecond || rtt > took {
						t.Fatalf("state %s, rtt %v after the handshake; want ESTABLISHED and 5ms..%v", fl.State, rtt, took)
					}
					for _, orig := range []bool{true, false, true} {
						if again := send(orig, A); again.RTT != fl.RTT {
							t.Fatalf("rtt %d µs after an established packet, was %d", again.RTT, fl.RTT)
						}
					}
				})
			}
		}
	}
}

// TestNoRTTWithoutHandshake: flows whose handshake ctd did not see (picked
// up mid-stream), and UDP flows, have no rtt.
func TestNoRTTWithoutHandshake(t *testing.T) {
	d := dptest.New(t)
	p := pairs[0]
	d.Run(t, egress, dptest.TCP(t, p.orig, p.resp, dptest.ACK, nil))
	d.Run(t, ingress, dptest.TCP(t, p.resp, p.orig, dptest.ACK, nil))
	d.Run(t, egress, dptest.UDP(t, p.orig, p.resp, nil))
	d.Run(t, ingress, dptest.UDP(t, p.resp, p.orig, nil))
	for _, fl := range d.Flows(t) {
		if fl.RTT != 0 || fl.State != ctmap.StateEstablished {
			t.Errorf("%d flow: state %s, rtt %d µs; want ESTABLISHED without rtt", fl.Proto, fl.State, fl.RTT)
		}
	}
}

// TestOwnerOff: BPF_PROG_TEST_RUN gives an egress packet a socket of the
// calling process without owner storage, so the new flow gets that
// process's cgroup and no pid (bpf/owner.h); config_v1's owner_off turns
// the attribution off. At ingress the lookup finds no socket here.
func TestOwnerOff(t *testing.T) {
	self, _ := dptest.SelfCgroup(t)
	d := dptest.New(t)
	p := pairs[0]
	for _, off := range []uint8{0, 1} {
		d.ResetCT(t)
		if err := d.Config().Update(func(v *config.Values) { v.OwnerOff = off }); err != nil {
			t.Fatal(err)
		}
		d.Run(t, egress, dptest.UDP(t, p.orig, p.resp, nil))
		d.Run(t, ingress, dptest.UDP(t, p.resp, netip.AddrPortFrom(p.orig.Addr(), 40001), nil))
		want := map[uint8]uint64{0: self, 1: 0}[off]
		for _, fl := range d.Flows(t) {
			wantCg := want
			if fl.Src == p.resp.Addr() { // opened at ingress: no socket
				wantCg = 0
			}
			if fl.CgroupID != wantCg || fl.Pid != 0 || fl.Comm != (ctmap.Comm{}) {
				t.Errorf("owner_off %d: flow %v:%d: cgroup %d pid %d comm %q; want cgroup %d, no pid or comm",
					off, fl.Src, fl.Sport, fl.CgroupID, fl.Pid, fl.Comm, wantCg)
			}
		}
	}
}
