package bpf_test

import (
	"fmt"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/test/dptest"
)

type tcpStep struct {
	from  side
	flags uint8
	data  int
	state ctmap.State
}

func TestTCPStates(t *testing.T) {
	S, SA, A, PA, FA, R, RA := dptest.SYN, dptest.SYN|dptest.ACK, dptest.ACK, dptest.PSH|dptest.ACK, dptest.FIN|dptest.ACK, dptest.RST, dptest.RST|dptest.ACK
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
						runTCP(t, dptest.New(t), p, o, seq.steps)
					})
				}
			}
		})
	}
}

// runTCP plays steps through the datapath and checks the verdict, the
// counters and the entry after each one.
func runTCP(t *testing.T, d *dptest.Datapath, p pair, o opener, steps []tcpStep) *flowModel {
	t.Helper()
	m := newModel(t, unix.IPPROTO_TCP, p, o)
	start := ctmap.Now().Mono()
	var first ctmap.Flow
	for i, s := range steps {
		src, dst, dir := p.orig, p.resp, o.origDir
		if s.from == fromResp {
			src, dst, dir = p.resp, p.orig, o.respDir
		}
		frame := dptest.TCP(t, src, dst, s.flags, dptest.Payload(s.data))
		want := dptest.Hit(dir)
		if i == 0 {
			want = dptest.NewFlow(dir)
		}
		d.Expect(t, dir, frame, dptest.Pass, want)
		m.account(s.from, len(frame), s.flags)
		m.want.State = s.state
		got := d.OnlyFlow(t, m.want)
		dptest.CheckTimes(t, got, start, ctmap.Now().Mono())
		if i == 0 {
			first = got
		} else if got.FirstSeen != first.FirstSeen {
			t.Errorf("step %d (%s %s): first_seen moved from %v to %v", i, s.from, dptest.FlagString(s.flags), first.FirstSeen, got.FirstSeen)
		}
		if t.Failed() {
			t.Fatalf("after step %d: %s %s", i, s.from, dptest.FlagString(s.flags))
		}
	}
	return m
}

func TestTCPSynOnClosedOpensNewFlow(t *testing.T) {
	S, SA, A, FA := dptest.SYN, dptest.SYN|dptest.ACK, dptest.ACK, dptest.FIN|dptest.ACK
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
					d := dptest.New(t)
					runTCP(t, d, p, o, closed)

					// A SYN-ACK does not open a connection: it is counted on the closed entry.
					d.Expect(t, o.respDir, dptest.TCP(t, p.resp, p.orig, SA, nil), dptest.Pass, dptest.Hit(o.respDir))
					if f := d.Flows(t); len(f) != 1 || f[0].State != ctmap.StateClosed {
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
			for _, flags := range []uint8{dptest.ACK, dptest.PSH | dptest.ACK, dptest.FIN | dptest.ACK} {
				t.Run(fmt.Sprintf("%s/%s/%s", o.name, p.name, dptest.FlagString(flags)), func(t *testing.T) {
					d := dptest.New(t)
					m := newModel(t, unix.IPPROTO_TCP, p, o)
					m.want.Flags |= ctmap.FlagPickup

					frame := dptest.TCP(t, p.orig, p.resp, flags, dptest.Payload(200))
					d.Expect(t, o.origDir, frame, dptest.Pass, dptest.NewFlow(o.origDir))
					m.account(fromOrig, len(frame), flags)
					m.want.State = ctmap.StateEstablished
					if flags&dptest.FIN != 0 {
						m.want.State = ctmap.StateFinWait
					}
					d.OnlyFlow(t, m.want)

					reply := dptest.TCP(t, p.resp, p.orig, dptest.ACK, nil)
					d.Expect(t, o.respDir, reply, dptest.Pass, dptest.Hit(o.respDir))
					m.account(fromResp, len(reply), dptest.ACK)
					d.OnlyFlow(t, m.want)
				})
			}
		}
	}
}

func TestTCPInvalidFlags(t *testing.T) {
	invalid := []uint8{
		dptest.SYN | dptest.FIN,
		dptest.SYN | dptest.FIN | dptest.ACK,
		dptest.SYN | dptest.RST,
		0,
		dptest.PSH,
		dptest.URG,
		dptest.PSH | dptest.URG,
	}
	for _, o := range openers {
		for _, p := range pairs {
			for _, flags := range invalid {
				t.Run(fmt.Sprintf("%s/%s/%s", o.name, p.name, dptest.FlagString(flags)), func(t *testing.T) {
					d := dptest.New(t)
					// Without an entry: dropped, nothing created.
					d.Expect(t, o.origDir, dptest.TCP(t, p.orig, p.resp, flags, nil), dptest.Drop, dptest.One(dptest.Key{Dir: o.origDir, Reason: metricsmap.DropInvalid}))
					d.NoFlows(t)

					// On an established flow: dropped, the entry untouched.
					m := runTCP(t, d, p, o, []tcpStep{
						{fromOrig, dptest.SYN, 0, ctmap.StateSynSent},
						{fromResp, dptest.SYN | dptest.ACK, 0, ctmap.StateSynRecv},
						{fromOrig, dptest.ACK, 0, ctmap.StateEstablished},
					})
					d.Expect(t, o.origDir, dptest.TCP(t, p.orig, p.resp, flags, nil), dptest.Drop, dptest.One(dptest.Key{Dir: o.origDir, Reason: metricsmap.DropInvalid}))
					d.Expect(t, o.respDir, dptest.TCP(t, p.resp, p.orig, flags, nil), dptest.Drop, dptest.One(dptest.Key{Dir: o.respDir, Reason: metricsmap.DropInvalid}))
					d.OnlyFlow(t, m.want)
				})
			}
		}
	}
}

func TestTCPResetWithoutEntry(t *testing.T) {
	for _, o := range openers {
		for _, p := range pairs {
			t.Run(o.name+"/"+p.name, func(t *testing.T) {
				d := dptest.New(t)
				// An RST for a connection ctd never saw needs no entry.
				d.Expect(t, o.origDir, dptest.TCP(t, p.orig, p.resp, dptest.RST|dptest.ACK, nil), dptest.Pass, dptest.One(dptest.Key{Dir: o.origDir, Reason: metricsmap.FwdNew}))
				d.NoFlows(t)
			})
		}
	}
}

// A GRO'd (or GSO) skb is one packet to the program and gso_segs segments on
// the wire: the flow dptest.Counts segments, and bytes as the skb's length.
func TestTCPAggregateCountsSegments(t *testing.T) {
	for _, o := range openers {
		for _, p := range pairs {
			t.Run(o.name+"/"+p.name, func(t *testing.T) {
				d := dptest.New(t)
				m := runTCP(t, d, p, o, []tcpStep{
					{fromOrig, dptest.SYN, 0, ctmap.StateSynSent},
					{fromResp, dptest.SYN | dptest.ACK, 0, ctmap.StateSynRecv},
					{fromOrig, dptest.ACK, 0, ctmap.StateEstablished},
				})
				for _, s := range []side{fromOrig, fromResp} {
					src, dst, dir := p.orig, p.resp, o.origDir
					if s == fromResp {
						src, dst, dir = p.resp, p.orig, o.respDir
					}
					const segs = 4
					// 800-byte segments: the test run takes at most a page of data.
					frame := dptest.TCP(t, src, dst, dptest.PSH|dptest.ACK, dptest.Payload(segs*800))
					v, err := d.RunCtx(t, dir, frame, &dptest.SKBContext{GSOSegs: segs})
					if err != nil || v != dptest.Pass {
						t.Fatalf("%s aggregate: verdict %s, err %v", s, dptest.VerdictName(v), err)
					}
					m.account(s, len(frame), dptest.PSH|dptest.ACK)
					if s == fromOrig {
						m.want.PacketsOrig += segs - 1
					} else {
						m.want.PacketsReply += segs - 1
					}
					d.OnlyFlow(t, m.want)
				}
			})
		}
	}
}
