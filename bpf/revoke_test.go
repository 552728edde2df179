package bpf_test

import (
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/datapath/ctmap"
	"github.com/ctd-dev/ctd/datapath/metricsmap"
	"github.com/ctd-dev/ctd/test/dptest"
)

// TestRevoke: a flow whose rule is deleted is cut by a revoke in both
// directions, ICMP errors quoting it included, and stays cut against
// pickups and denied SYNs; a flow still allowed, and one opened on the
// other direction, are untouched; a SYN the policy allows again opens a
// new flow on the revoked tuple.
func TestRevoke(t *testing.T) {
	for _, fam := range []struct {
		name        string
		local, peer netip.Addr
	}{{"ipv4", local, peer}, {"ipv6", local6, peer6}} {
		t.Run(fam.name, func(t *testing.T) {
			d := policyDatapath(t)
			web := rule{ingress, peerID, unix.IPPROTO_TCP, 80, dptest.Allow}
			ssh := rule{ingress, peerID, unix.IPPROTO_TCP, 22, dptest.Allow}
			setPolicy(t, d, dptest.DenyIn(ingress), web, ssh)

			client := netip.AddrPortFrom(fam.peer, 40000)
			server := netip.AddrPortFrom(fam.local, 80)
			sshClient := netip.AddrPortFrom(fam.peer, 40001)
			sshServer := netip.AddrPortFrom(fam.local, 22)
			out := netip.AddrPortFrom(fam.local, 40002) // the local side opens this one
			outPeer := netip.AddrPortFrom(fam.peer, 443)
			handshake := func(c, s netip.AddrPort, in, back bpf.Direction) {
				t.Helper()
				d.Expect(t, in, dptest.TCP(t, c, s, dptest.SYN, nil), dptest.Pass, dptest.NewFlow(in))
				d.Expect(t, back, dptest.TCP(t, s, c, dptest.SYN|dptest.ACK, nil), dptest.Pass, dptest.Hit(back))
				d.Expect(t, in, dptest.TCP(t, c, s, dptest.ACK, nil), dptest.Pass, dptest.Hit(in))
			}
			handshake(client, server, ingress, egress)
			handshake(sshClient, sshServer, ingress, egress)
			handshake(out, outPeer, egress, ingress)

			if revoked, kept := d.Revoke(t); revoked != 0 || kept != 3 {
				t.Fatalf("revoke under the same policy: revoked %d, kept %d, want 0 and 3", revoked, kept)
			}
			delRule(t, d, web)
			d.SetConfig(t, bpf.CtdConfig{DefaultVerdict: dptest.DenyIn(ingress), PolicyRules: 1})
			if revoked, kept := d.Revoke(t); revoked != 1 || kept != 2 {
				t.Fatalf("revoke after the rule for port 80 was deleted: revoked %d, kept %d, want 1 and 2", revoked, kept)
			}

			cut := func(dir bpf.Direction) dptest.Counts {
				return dptest.One(dptest.Key{Dir: dir, Reason: metricsmap.DropRevoked})
			}
			data := dptest.Payload(100)
			d.Expect(t, ingress, dptest.TCP(t, client, server, dptest.PSH|dptest.ACK, data), dptest.Drop, cut(ingress))
			// The protected side's own retransmission: no pickup.
			d.Expect(t, egress, dptest.TCP(t, server, client, dptest.PSH|dptest.ACK, data), dptest.Drop, cut(egress))
			d.Expect(t, egress, dptest.TCP(t, server, client, dptest.FIN|dptest.ACK, nil), dptest.Drop, cut(egress))
			quoted := dptest.TCP(t, server, client, dptest.ACK, nil)
			d.Expect(t, ingress, dptest.ICMPError(t, fam.peer, fam.local, quoted), dptest.Drop, cut(ingress))
			// A SYN on the revoked tuple is judged: denied, it stays cut.
			d.Expect(t, ingress, dptest.TCP(t, client, server, dptest.SYN, nil), dptest.Drop,
				dptest.One(dptest.Key{Dir: ingress, Reason: metricsmap.DropPolicy}))
			d.Expect(t, egress, dptest.TCP(t, server, client, dptest.ACK, nil), dptest.Drop, cut(egress))

			// The other flows go on.
			d.Expect(t, ingress, dptest.TCP(t, sshClient, sshServer, dptest.PSH|dptest.ACK, data), dptest.Pass, dptest.Hit(ingress))
			d.Expect(t, egress, dptest.TCP(t, sshServer, sshClient, dptest.PSH|dptest.ACK, data), dptest.Pass, dptest.Hit(egress))
			d.Expect(t, egress, dptest.TCP(t, out, outPeer, dptest.PSH|dptest.ACK, data), dptest.Pass, dptest.Hit(egress))
			if revoked, kept := d.Revoke(t); revoked != 1 || kept != 2 {
				t.Fatalf("second revoke: revoked %d, kept %d, want 1 (revoked before) and 2", revoked, kept)
			}

			// Allowed again, a fresh SYN opens a new flow in its place.
			setPolicy(t, d, dptest.DenyIn(ingress), web, ssh)
			d.Expect(t, ingress, dptest.TCP(t, client, server, dptest.SYN, nil), dptest.Pass, dptest.NewFlow(ingress))
			d.Expect(t, egress, dptest.TCP(t, server, client, dptest.SYN|dptest.ACK, nil), dptest.Pass, dptest.Hit(egress))
			for _, f := range d.Flows(t) {
				if f.Dport == 80 && (f.Flags&ctmap.FlagRevoked != 0 || f.State != ctmap.StateSynRecv) {
					t.Fatalf("flow reopened after revocation: flags %s, state %v, want not revoked, SYN_RECV", dptest.FlagString(f.Flags), f.State)
				}
			}
		})
	}
}
