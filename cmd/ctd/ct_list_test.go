package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ctd-dev/ctd/control/conntrack"
	"github.com/ctd-dev/ctd/control/ifnames"
	"github.com/ctd-dev/ctd/datapath/ctmap"
)

// listFlows returns n flows of both families and three protocols, some
// owned, some revoked, with stamps a few ms apart.
func listFlows(n int) []ctmap.Flow {
	now := ctmap.Now().Mono()
	fls := make([]ctmap.Flow, n)
	for i := range fls {
		fl := ctmap.Flow{Proto: []uint8{6, 17, 1}[i%3], Src: netip.AddrFrom4([4]byte{198, 51, 100, byte(i)}),
			Dst: netip.AddrFrom4([4]byte{203, 0, 113, byte(i >> 8)}), Sport: uint16(i), Dport: 443, State: ctmap.StateEstablished,
			PacketsOrig: uint64(i), BytesOrig: uint64(i) * 1500, FirstSeen: now - time.Duration(i)*time.Millisecond, LastSeen: now,
			SrcIdentity: 2, DstIdentity: uint32(i), Ifindex: 1}
		if i%2 == 1 {
			fl.Src, fl.Dst = netip.MustParseAddr("fd00::1"), netip.AddrFrom16([16]byte{0xfd, 14: byte(i >> 8), 15: byte(i)})
		}
		if i%5 == 0 {
			fl.Flags = ctmap.FlagRevoked
		}
		if i%7 == 0 {
			fl.Pid, fl.CgroupID, fl.RTT = uint32(i), 1<<40, 123
			fl.Comm, _ = ctmap.CommOf("curl")
		}
		fls[i] = fl
	}
	return fls
}

func eachOf(fls []ctmap.Flow) func(func(ctmap.Flow) error) error {
	return func(fn func(ctmap.Flow) error) error {
		for _, fl := range fls {
			if err := fn(fl); err != nil {
				return err
			}
		}
		return nil
	}
}

// TestListOutput checks ct list's streamed output, text and JSON, against
// Line and one json.Marshal(RowOf(...)) per flow, byte for byte: empty, one
// flow, and more than the output buffer holds.
func TestListOutput(t *testing.T) {
	bt := ctmap.Now()
	for _, n := range []int{0, 1, 2, 20000} {
		fls := listFlows(n)
		names := ifnames.New()

		var wantJSON, wantText bytes.Buffer
		wantJSON.WriteString("[")
		for i, fl := range fls {
			b, err := json.Marshal(conntrack.RowOf(fl, bt, names, nil))
			if err != nil {
				t.Fatal(err)
			}
			if i > 0 {
				wantJSON.WriteString(",")
			}
			wantJSON.WriteString("\n")
			wantJSON.Write(b)
			wantText.WriteString(conntrack.Line(fl, names, nil) + "\n")
		}
		if n > 0 {
			wantJSON.WriteString("\n")
		}
		wantJSON.WriteString("]\n")
		if n == 20000 && wantJSON.Len() < 2*listBuffer {
			t.Fatalf("%d flows are %d bytes of JSON, want more than the buffer holds", n, wantJSON.Len())
		}

		for _, tc := range []struct {
			name string
			list func(*bufio.Writer, *conntrack.Encoder, func(func(ctmap.Flow) error) error) error
			want []byte
		}{{"json", listJSON, wantJSON.Bytes()}, {"text", listText, wantText.Bytes()}} {
			var out bytes.Buffer
			w := bufio.NewWriterSize(&out, listBuffer)
			if err := tc.list(w, conntrack.NewEncoder(bt, names, nil), eachOf(fls)); err != nil {
				t.Fatalf("%s, %d flows: %v", tc.name, n, err)
			}
			if err := w.Flush(); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out.Bytes(), tc.want) {
				t.Errorf("%s, %d flows: output differs from the reference at byte %d of %d (want %d bytes)", tc.name, n, firstDiff(out.Bytes(), tc.want), out.Len(), len(tc.want))
			}
			if tc.name == "json" {
				var rows []map[string]any
				if err := json.Unmarshal(out.Bytes(), &rows); err != nil || len(rows) != n {
					t.Errorf("json, %d flows: %d rows, %v", n, len(rows), err)
				}
			}
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// failWriter fails every write.
type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, errors.New("broken pipe") }

// TestListOutputError checks that a failing output stops the listing with
// its error.
func TestListOutputError(t *testing.T) {
	for name, list := range map[string]func(*bufio.Writer, *conntrack.Encoder, func(func(ctmap.Flow) error) error) error{"json": listJSON, "text": listText} {
		w := bufio.NewWriterSize(failWriter{}, listBuffer)
		listed := 0
		each := func(fn func(ctmap.Flow) error) error {
			for _, fl := range listFlows(20000) {
				listed++
				if err := fn(fl); err != nil {
					return err
				}
			}
			return nil
		}
		err := list(w, conntrack.NewEncoder(ctmap.Now(), ifnames.New(), nil), each)
		if err == nil {
			err = w.Flush()
		}
		if err == nil || !strings.Contains(err.Error(), "broken pipe") {
			t.Errorf("%s: error %v, want broken pipe", name, err)
		}
		if listed == 20000 {
			t.Errorf("%s: listed every flow after the output failed", name)
		}
	}
}

// TestGrowPipe checks that ct list's output, where it is a pipe, holds a
// buffer's worth, and that other outputs are left alone.
func TestGrowPipe(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	pipeSize := func() int {
		n, err := unix.FcntlInt(w.Fd(), unix.F_GETPIPE_SZ, 0)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	want := max(pipeSize(), listBuffer) // it never shrinks a pipe
	growPipe(w)
	if n := pipeSize(); n != want {
		t.Errorf("pipe holds %d bytes after growPipe, want %d", n, want)
	}
	// A regular file and a writer without a descriptor: no change, no panic.
	f, err := os.Create(filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	growPipe(f)
	growPipe(&bytes.Buffer{})
	if _, err := f.WriteString("ok"); err != nil {
		t.Errorf("write after growPipe on a file: %v", err)
	}
}
