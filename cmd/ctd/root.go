package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/ctd-dev/ctd/datapath/bpffs"
	"github.com/ctd-dev/ctd/datapath/loader"
	"github.com/ctd-dev/ctd/datapath/pins"
)

// app holds the global flags every command shares.
type app struct {
	pinPath  string
	stateDir string
	kv       kvstoreFlags // cluster mode (cluster.go)

	// undo takes back what a command set up before it failed: main runs it
	// (in reverse order) when the command returns an error.
	undo []func() error
}

// noteSetup records what the pin path holds before the command creates maps
// or pins in it, so that a failure leaves it as it was: no new pins, and no
// mount or directory of ctd's where there was none (see bpffs.Before).
func (a *app) noteSetup() {
	a.undo = append(a.undo, bpffs.Note(a.pinPath).Undo)
}

// undoFailed runs the undo functions of a command that failed with err and
// adds their failures to it.
func (a *app) undoFailed(err error) error {
	for i := len(a.undo) - 1; i >= 0; i-- {
		if uerr := a.undo[i](); uerr != nil {
			err = fmt.Errorf("%w (and taking back its set-up failed: %v)", err, uerr)
		}
	}
	return err
}

// exitError makes main exit with code instead of 1.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func newRootCmd(a *app) *cobra.Command {
	root := &cobra.Command{
		Use:           "ctd",
		Short:         "Connection tracking, identities and policy for a Linux interface, in eBPF",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(c *cobra.Command, _ []string) error {
			if skipsFinish(c) {
				return nil
			}
			return a.finishPending(c)
		},
	}
	root.PersistentFlags().StringVar(&a.pinPath, "pin-path", envOr("CTD_PIN_PATH", loader.DefaultPinPath), "bpffs directory holding ctd's pinned maps and links (env CTD_PIN_PATH)")
	root.PersistentFlags().StringVar(&a.stateDir, "state-dir", envOr("CTD_STATE_DIR", "/var/lib/ctd"), "directory of ctd's desired-state store (env CTD_STATE_DIR)")
	a.kv.add(root.PersistentFlags())
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return fmt.Errorf("%s: %w (see '%s --help')", c.CommandPath(), err, c.CommandPath())
	})
	root.AddCommand(
		// Commands, one file each.
		newAttachCmd(a), newDetachCmd(a), newStatusCmd(a), newCTCmd(a), newTeardownCmd(a), newDaemonCmd(a), newIPCacheCmd(a), newPolicyCmd(a),
		newMapsCmd(a), newMetricsCmd(a), newMonitorCmd(a), newEventsCmd(a), newStateCmd(a),
		newClusterCmd(a), newEndpointCmd(a), newIdentityCmd(a), newExplainCmd(a),
	)
	return root
}

// preamble checks, in this order, what every command that touches the
// datapath needs before it does: the output format (out nil: the command
// has no -o), root, and a pin path that can be ctd's. Commands call it
// once their own arguments are parsed, so that a bad argument is reported
// as such whoever runs the command.
func (a *app) preamble(out *string) error {
	if out != nil {
		if err := checkOutput(*out); err != nil {
			return err
		}
	}
	if err := requireRoot(); err != nil {
		return err
	}
	return checkPinPath(a.pinPath)
}

// pins is the datapath's pin directory.
func (a *app) pins() pins.Dir { return pins.New(a.pinPath) }

// requireRoot fails early, in one line, where the kernel would refuse.
func requireRoot() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("ctd must run as root (or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN): current uid is %d", os.Geteuid())
	}
	return nil
}

// outputFlag adds -o/--output with the formats text and json.
func outputFlag(c *cobra.Command, out *string) {
	c.Flags().StringVarP(out, "output", "o", "text", "output format: text or json")
	_ = c.RegisterFlagCompletionFunc("output", cobra.FixedCompletions([]string{"text", "json"}, cobra.ShellCompDirectiveNoFileComp))
}

func checkOutput(out string) error {
	if out != "text" && out != "json" {
		return fmt.Errorf("invalid --output %q: valid formats are text, json", out)
	}
	return nil
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
