package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/bpf"
	"github.com/ctd-dev/ctd/control/daemon"
	"github.com/ctd-dev/ctd/control/policy"
	"github.com/ctd-dev/ctd/control/store"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/policymap"
)

// annotationStore marks a command (or a group) that reads or writes the
// desired-state store: a store it cannot use is an error for it, while other
// commands ignore the store when it is unusable.
const annotationStore = "ctd/store"

// annotationNoFinish marks a command that does not finish pending changes
// first: the daemon (it does so itself, under its own locks), teardown (it
// removes the datapath) and state rebuild (it replaces the store).
const annotationNoFinish = "ctd/no-finish"

// skipsFinish reports whether c runs without finishing pending changes:
// annotationNoFinish, help and shell completion.
func skipsFinish(c *cobra.Command) bool {
	for p := c; p != nil; p = p.Parent() {
		switch {
		case p.Annotations[annotationNoFinish] != "", p.Name() == "help", p.Name() == "completion",
			p.Name() == cobra.ShellCompRequestCmd, p.Name() == cobra.ShellCompNoDescRequestCmd:
			return true
		}
	}
	return false
}

// usesStore reports whether c or one of its parents carries annotationStore.
func usesStore(c *cobra.Command) bool {
	for ; c != nil; c = c.Parent() {
		if c.Annotations[annotationStore] != "" {
			return true
		}
	}
	return false
}

// openStore opens the store of the state directory, bound to the pin path.
func (a *app) openStore() (*store.Store, error) {
	return store.Open(a.stateDir, &store.Options{PinPath: a.pinPath})
}

// finisher makes maps equal to a desired state: how a change that a killed
// writer left unfinished is finished (see store.Change).
func finisher(maps *loader.Maps) store.Finisher {
	return func(st *store.State) error {
		_, err := daemon.Sync(st, maps)
		return err
	}
}

// finishPending is every command's first step: a change of the desired
// state whose writer was killed midway is finished (the maps are made equal
// to the store) before the command does anything else. Commands that do
// not use the store ignore a store they cannot open.
func (a *app) finishPending(c *cobra.Command) error {
	if !store.Exists(a.stateDir) || os.Geteuid() != 0 {
		return nil // nothing to finish; or the command fails on its own
	}
	s, err := a.openStore()
	if err == nil {
		var in *store.Intent
		if in, err = s.Pending(); err == nil && in != nil && checkPinPath(a.pinPath) == nil && a.fullyPinned() {
			var maps *loader.Maps
			if maps, err = loader.OpenPinned(a.pinPath); err == nil {
				in, err = s.Finish(finisher(maps))
				maps.Close()
				if in != nil {
					fmt.Fprintf(c.ErrOrStderr(), "ctd: finished the change %q that pid %d left unfinished at %s\n", in.What, in.PID, in.Started.Format(time.RFC3339))
				}
			}
		}
	}
	if err != nil && usesStore(c) {
		return err
	}
	return nil
}

func newStateCmd(a *app) *cobra.Command {
	c := &cobra.Command{
		Use:   "state",
		Short: "Check, rebuild or compact the desired-state store (--state-dir)",
		Long: `The desired-state store (<state-dir>/state.db) holds the interfaces,
ipcache prefixes, policy rules and default verdicts ctd was told about;
'ctd daemon' restores it into the maps after a reboot.

  check                compare the store with the pinned maps
  rebuild --from-pins  replace a bad store by what the datapath enforces now
  compact              rewrite the store into a file without free pages`,
		Annotations: map[string]string{annotationStore: "yes"},
	}
	c.AddCommand(newStateCheckCmd(a), newStateRebuildCmd(a), newStateCompactCmd(a))
	return c
}

// maxDiffLines bounds the differences 'state check' prints.
const maxDiffLines = 20

func newStateCheckCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "check",
		Short: "Compare the store with the pinned maps: exit 0 when they agree, else print the differences and exit 1",
		Args:  exactArgs(0, "ctd state check"),
		RunE: func(c *cobra.Command, _ []string) error {
			if err := a.preamble(nil); err != nil {
				return err
			}
			if !store.Exists(a.stateDir) {
				return fmt.Errorf("no state store at %s: nothing to check", filepath.Join(a.stateDir, store.FileName))
			}
			s, err := a.openStore()
			if err != nil {
				return err
			}
			if err := s.Check(); err != nil {
				return err
			}
			st, err := s.Snapshot()
			if err != nil {
				return err
			}
			have, err := a.pinnedState()
			if err != nil {
				return err
			}
			diff := stateDiff(st, have)
			w := c.OutOrStdout()
			if len(diff) == 0 {
				fmt.Fprintf(w, "store %s and datapath %s agree: %d prefixes, %d rules\n", s.Path(), a.pinPath, len(st.IPCache), len(st.Policy))
				return nil
			}
			for i, d := range diff {
				if i == maxDiffLines {
					fmt.Fprintf(w, "... and %d more\n", len(diff)-maxDiffLines)
					break
				}
				fmt.Fprintln(w, d)
			}
			return fmt.Errorf("store %s and datapath %s differ in %d entries (- store only, + maps only): 'ctd daemon' makes the maps follow the store; 'ctd state rebuild --from-pins' makes the store follow the maps", s.Path(), a.pinPath, len(diff))
		},
	}
}

// pinnedState reads the desired-state part of the datapath pinned at the
// pin path: ipcache, policy rules and default verdicts.
func (a *app) pinnedState() (*store.State, error) {
	maps, err := loader.OpenPinned(a.pinPath)
	if err != nil {
		return nil, err
	}
	defer maps.Close()
	return daemon.MapsState(maps)
}

// stateDiff lists how the maps' state differs from the store's, one line per
// entry, sorted: "- " the store's entry, "+ " the maps' entry.
func stateDiff(want, have *store.State) []string {
	type line struct{ entry, sign string }
	var lines []line
	add := func(sign, entry string) { lines = append(lines, line{entry, sign}) }
	for p, id := range want.IPCache {
		if got, ok := have.IPCache[p]; !ok || got != id {
			add("-", fmt.Sprintf("ipcache %v id=%d", p, id))
		}
	}
	for p, id := range have.IPCache {
		if exp, ok := want.IPCache[p]; !ok || exp != id {
			add("+", fmt.Sprintf("ipcache %v id=%d", p, id))
		}
	}
	rule := func(k store.RuleKey, v store.Verdict) string {
		return "policy " + policy.Format(policymap.Rule{Dir: k.Dir, Identity: k.Identity, Proto: k.Proto, Port: k.Port, Verdict: v})
	}
	for k, v := range want.Policy {
		if got, ok := have.Policy[k]; !ok || got != v {
			add("-", rule(k, v))
		}
	}
	for k, v := range have.Policy {
		if exp, ok := want.Policy[k]; !ok || exp != v {
			add("+", rule(k, v))
		}
	}
	for d := range want.Defaults {
		if w, h := want.Defaults[d].Effective(), have.Defaults[d].Effective(); w != h {
			add("-", fmt.Sprintf("default %v %v", bpf.Direction(d), w))
			add("+", fmt.Sprintf("default %v %v", bpf.Direction(d), h))
		}
	}
	slices.SortFunc(lines, func(a, b line) int {
		if c := strings.Compare(a.entry, b.entry); c != 0 {
			return c
		}
		return -strings.Compare(a.sign, b.sign) // "-" first
	})
	out := make([]string, len(lines))
	for i, l := range lines {
		out[i] = l.sign + " " + l.entry
	}
	return out
}

func newStateRebuildCmd(a *app) *cobra.Command {
	var fromPins bool
	c := &cobra.Command{
		Use:   "rebuild --from-pins",
		Short: "Move the store aside (never deleting it) and rebuild it from what the pinned datapath enforces now",
		Long: `Rebuild the desired-state store from the datapath pinned at --pin-path:
its ipcache, policy rules and default verdicts, and the interfaces it is
attached to in this network namespace. The old store file, if any, is
moved aside to state.db.bad-<time> first (never deleted). Use it when the
store is corrupted (ctd refuses it and says so) or lost.`,
		Args:        exactArgs(0, "ctd state rebuild --from-pins"),
		Annotations: map[string]string{annotationNoFinish: "yes"},
		RunE: func(c *cobra.Command, _ []string) error {
			if !fromPins {
				return errors.New("ctd state rebuild: missing --from-pins: the pinned datapath is the only source ctd rebuilds the store from")
			}
			if err := a.preamble(nil); err != nil {
				return err
			}
			have, err := a.pinnedState()
			if err != nil {
				return err
			}
			ats, err := a.pins().Attachments()
			if err != nil {
				return err
			}
			ifaces := make(map[string]string, len(ats))
			for _, at := range ats {
				ifaces[at.Iface] = string(at.Mode)
			}
			have.Interfaces = ifaces
			s, aside, err := store.Rebuild(a.stateDir, &store.Options{PinPath: a.pinPath}, func(tx *store.Tx) error {
				return tx.PutState(have)
			})
			if err != nil {
				return err
			}
			w := c.OutOrStdout()
			if aside != "" {
				fmt.Fprintf(w, "moved the old store aside to %s\n", aside)
			}
			fmt.Fprintf(w, "rebuilt %s from %s: %d prefixes, %d rules, %d interfaces\n", s.Path(), a.pinPath, len(have.IPCache), len(have.Policy), len(ifaces))
			return nil
		},
	}
	c.Flags().BoolVar(&fromPins, "from-pins", false, "rebuild from the maps pinned at --pin-path (required)")
	return c
}

func newStateCompactCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "compact",
		Short: "Rewrite the store into a new file without the free pages that deletions left",
		Args:  exactArgs(0, "ctd state compact"),
		RunE: func(c *cobra.Command, _ []string) error {
			if err := requireRoot(); err != nil {
				return err
			}
			if !store.Exists(a.stateDir) {
				return fmt.Errorf("no state store at %s: nothing to compact", filepath.Join(a.stateDir, store.FileName))
			}
			s, err := a.openStore()
			if err != nil {
				return err
			}
			sizes, err := s.Compact()
			if err != nil {
				return err
			}
			fmt.Fprintf(c.OutOrStdout(), "compacted %s: %s -> %s\n", s.Path(), byteSize(sizes[0]), byteSize(sizes[1]))
			return nil
		},
	}
}

// byteSize formats n bytes for people.
func byteSize(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
