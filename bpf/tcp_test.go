package bpf_test

import (
	"fmt"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
)

type tcpStep struct {
	from  side
	flags uint8
	data  int
	state ctmap.State
}

func TestTCPStates(t *testing.T) {
	S, SA, A, PA, FA, R, RA := tcpSYN, tcpSYN|tcpACK, tcpACK, tcpPSH|tcpACK, tcpFIN|tcpACK, tcpRST, tcpRST|tcpACK
	handshake := []tcpStep{
		{fromOrig, S, 0, ctmap.StateSynSent},
		{fromResp, SA, 0, ctmap.StateSynRecv},
		{fromOrig, A, 0, ctmap.StateEstablished},
	}
	with := func(steps ...tcpStep) []tcpStep { return append(append([]tcpStep{}, handshake...), steps...) }
	for _, seq := range []struct {
		name  string
		steps []tcpStep
	}{
		{"data then originator closes", with(
			tcpStep{fromOrig, PA, 100, ctmap.StateEstablished},
			tcpStep{fromResp, PA, 1300, ctmap.StateEstablished},
			tcpStep{fromOrig, A, 0, ctmap.StateEstablished},
			tcpStep{fromOrig, FA, 0, ctmap.StateFinWait},
			tcpStep{fromResp, A, 0, ctmap.StateFinWait},
			tcpStep{fromResp, FA, 0, ctmap.StateClosed},
			tcpStep{fromOrig, A, 0, ctmap.StateClosed},
		)},
		{"responder closes", with(
			tcpStep{fromResp, PA, 20, ctmap.StateEstablished},
			tcpStep{fromResp, FA, 0, ctmap.StateFinWait},
			tcpStep{fromOrig, PA, 10, ctmap.StateFinWait},
			tcpStep{fromOrig, FA, 0, ctmap.StateClosed},
			tcpStep{fromResp, A, 0, ctmap.StateClosed},
		)},
		{"originator resets", with(
			tcpStep{fromOrig, PA, 5, ctmap.StateEstablished},
			tcpStep{fromOrig, R, 0, ctmap.StateClosed},
		)},
		{"responder resets", with(
			tcpStep{fromResp, RA, 0, ctmap.StateClosed},
			tcpStep{fromOrig, A, 0, ctmap.StateClosed},
		)},
		{"connection refused", []tcpStep{
			{fromOrig, S, 0, ctmap.StateSynSent},
			{fromResp, RA, 0, ctmap.StateClosed},
		}},
		{"reset while closing", with(
			tcpStep{fromOrig, FA, 0, ctmap.StateFinWait},
			tcpStep{fromResp, R, 0, ctmap.StateClosed},
		)},
	} {
		t.Run(seq.name, func(t *testing.T) {
			for _, o := range openers {
				for _, p := range pairs {
					t.Run(o.name+"/"+p.name, func(t *testing.T) {
						runTCP(t, newDatapath(t), p, o, seq.steps)
					})
				}
			}
		})
	}
}

// runTCP plays steps through the datapath and checks the verdict, the
// counters and the entry after each one.
func runTCP(t *testing.T, d *testDatapath, p pair, o opener, steps []tcpStep) *flowModel {
	t.Helper()
	m := newModel(t, unix.IPPROTO_TCP, p, o)
	start := ctmap.Now().Mono()
	var first ctmap.Flow
	for i, s := range steps {
		src, dst, dir := p.orig, p.resp, o.origDir
		if s.from == fromResp {
			src, dst, dir = p.resp, p.orig, o.respDir
		}
		frame := tcpFrame(t, src, dst, s.flags, s.data)
		want := hit(dir)
		if i == 0 {
			want = newFlow(dir)
		}
		d.expect(t, dir, frame, verdictPass, want)
		m.account(s.from, len(frame), s.flags)
		m.want.State = s.state
		got := d.onlyFlow(t, m.want)
		checkTimes(t, got, start, ctmap.Now().Mono())
		if i == 0 {
			first = got
		} else if got.FirstSeen != first.FirstSeen {
			t.Errorf("step %d (%s %s): first_seen moved from %v to %v", i, s.from, tcpFlagString(s.flags), first.FirstSeen, got.FirstSeen)
		}
		if t.Failed() {
			t.Fatalf("after step %d: %s %s", i, s.from, tcpFlagString(s.flags))
		}
	}
	return m
}

func TestTCPSynOnClosedOpensNewFlow(t *testing.T) {
	S, SA, A, FA := tcpSYN, tcpSYN|tcpACK, tcpACK, tcpFIN|tcpACK
	closed := []tcpStep{
		{fromOrig, S, 0, ctmap.StateSynSent},
		{fromResp, SA, 0, ctmap.StateSynRecv},
		{fromOrig, A, 0, ctmap.StateEstablished},
		{fromOrig, FA, 0, ctmap.StateFinWait},
		{fromResp, FA, 0, ctmap.StateClosed},
	}
	for _, o := range openers {
		for _, p := range pairs {
			for _, reopener := range []side{fromOrig, fromResp} {
				t.Run(fmt.Sprintf("%s/%s/reopened by %s", o.name, p.name, reopener), func(t *testing.T) {
					d := newDatapath(t)
					runTCP(t, d, p, o, closed)

					// A SYN-ACK does not open a connection: it is counted on the closed entry.
					d.expect(t, o.respDir, tcpFrame(t, p.resp, p.orig, SA, 0), verdictPass, hit(o.respDir))
					if f := d.flows(t); len(f) != 1 || f[0].State != ctmap.StateClosed {
						t.Fatalf("after a SYN-ACK on the closed flow: %+v, want the closed entry", f)
					}

					np, no := p, o
					if reopener == fromResp {
						np = pair{p.name, p.resp, p.orig}
						no = opener{origDir: o.respDir, respDir: o.origDir, ctFlags: ctmap.FlagOpenedIngress}
						if o.respDir == egress {
							no.ctFlags = 0
						}
					}
					runTCP(t, d, np, no, []tcpStep{
						{fromOrig, S, 0, ctmap.StateSynSent},
						{fromResp, SA, 0, ctmap.StateSynRecv},
						{fromOrig, A, 0, ctmap.StateEstablished},
					})
				})
			}
		}
	}
}

func TestTCPMidStreamPickup(t *testing.T) {
	for _, o := range openers {
		for _, p := range pairs {
			for _, flags := range []uint8{tcpACK, tcpPSH | tcpACK, tcpFIN | tcpACK} {
				t.Run(fmt.Sprintf("%s/%s/%s", o.name, p.name, tcpFlagString(flags)), func(t *testing.T) {
					d := newDatapath(t)
					m := newModel(t, unix.IPPROTO_TCP, p, o)
					m.want.Flags |= ctmap.FlagPickup

					frame := tcpFrame(t, p.orig, p.resp, flags, 200)
					d.expect(t, o.origDir, frame, verdictPass, newFlow(o.origDir))
					m.account(fromOrig, len(frame), flags)
					m.want.State = ctmap.StateEstablished
					if flags&tcpFIN != 0 {
						m.want.State = ctmap.StateFinWait
					}
					d.onlyFlow(t, m.want)

					reply := tcpFrame(t, p.resp, p.orig, tcpACK, 0)
					d.expect(t, o.respDir, reply, verdictPass, hit(o.respDir))
					m.account(fromResp, len(reply), tcpACK)
					d.onlyFlow(t, m.want)
				})
			}
		}
	}
}

func TestTCPInvalidFlags(t *testing.T) {
	invalid := []uint8{
		tcpSYN | tcpFIN,
		tcpSYN | tcpFIN | tcpACK,
		tcpSYN | tcpRST,
		0,
		tcpPSH,
		tcpURG,
		tcpPSH | tcpURG,
	}
	for _, o := range openers {
		for _, p := range pairs {
			for _, flags := range invalid {
				t.Run(fmt.Sprintf("%s/%s/%s", o.name, p.name, tcpFlagString(flags)), func(t *testing.T) {
					d := newDatapath(t)
					// Without an entry: dropped, nothing created.
					d.expect(t, o.origDir, tcpFrame(t, p.orig, p.resp, flags, 0), verdictDrop, one(metricKey{o.origDir, metricsmap.DropInvalid}))
					d.noFlows(t)

					// On an established flow: dropped, the entry untouched.
					m := runTCP(t, d, p, o, []tcpStep{
						{fromOrig, tcpSYN, 0, ctmap.StateSynSent},
						{fromResp, tcpSYN | tcpACK, 0, ctmap.StateSynRecv},
						{fromOrig, tcpACK, 0, ctmap.StateEstablished},
					})
					d.expect(t, o.origDir, tcpFrame(t, p.orig, p.resp, flags, 0), verdictDrop, one(metricKey{o.origDir, metricsmap.DropInvalid}))
					d.expect(t, o.respDir, tcpFrame(t, p.resp, p.orig, flags, 0), verdictDrop, one(metricKey{o.respDir, metricsmap.DropInvalid}))
					d.onlyFlow(t, m.want)
				})
			}
		}
	}
}

func TestTCPResetWithoutEntry(t *testing.T) {
	for _, o := range openers {
		for _, p := range pairs {
			t.Run(o.name+"/"+p.name, func(t *testing.T) {
				d := newDatapath(t)
				// An RST for a connection ctd never saw needs no entry.
				d.expect(t, o.origDir, tcpFrame(t, p.orig, p.resp, tcpRST|tcpACK, 0), verdictPass, one(metricKey{o.origDir, metricsmap.FwdNew}))
				d.noFlows(t)
			})
		}
	}
}

// A GRO'd (or GSO) skb is one packet to the program and gso_segs segments on
// the wire: the flow counts segments, and bytes as the skb's length.
func TestTCPAggregateCountsSegments(t *testing.T) {
	for _, o := range openers {
		for _, p := range pairs {
			t.Run(o.name+"/"+p.name, func(t *testing.T) {
				d := newDatapath(t)
				m := runTCP(t, d, p, o, []tcpStep{
					{fromOrig, tcpSYN, 0, ctmap.StateSynSent},
					{fromResp, tcpSYN | tcpACK, 0, ctmap.StateSynRecv},
					{fromOrig, tcpACK, 0, ctmap.StateEstablished},
				})
				for _, s := range []side{fromOrig, fromResp} {
					src, dst, dir := p.orig, p.resp, o.origDir
					if s == fromResp {
						src, dst, dir = p.resp, p.orig, o.respDir
					}
					const segs = 4
					// 800-byte segments: the test run takes at most a page of data.
					frame := tcpFrame(t, src, dst, tcpPSH|tcpACK, segs*800)
					v, err := d.runCtx(t, dir, frame, &skbContext{GSOSegs: segs})
					if err != nil || v != verdictPass {
						t.Fatalf("%s aggregate: verdict %s, err %v", s, verdictName(v), err)
					}
					m.account(s, len(frame), tcpPSH|tcpACK)
					if s == fromOrig {
						m.want.PacketsOrig += segs - 1
					} else {
						m.want.PacketsReply += segs - 1
					}
					d.onlyFlow(t, m.want)
				}
			})
		}
	}
}
