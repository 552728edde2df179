package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

func newTeardownCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:         "teardown",
		Short:       "Detach ctd everywhere and remove every pin under the pin path",
		Annotations: map[string]string{annotationNoFinish: "yes"},
		Long: `Detach ctd from every interface it is attached to: the TCX links pinned
below <pin-path>/links and, in the current network namespace, the tc filters
whose programs use this pin path's maps. Then remove every pin of ctd's below
the pin path, and the directory itself (unmounting the bpffs ctd mounted
there) if ctd created it and nothing else is in it. The conntrack table and
all other state are gone afterwards. Running it again, or where nothing is
set up, does nothing.

tc filters in other network namespaces cannot be seen from here: run teardown
in each namespace where ctd was attached in tc mode (e.g. via nsenter --net).`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := a.preamble(nil); err != nil {
				return err
			}
			return a.teardown(c.OutOrStdout())
		},
	}
}

func (a *app) teardown(w io.Writer) error {
	t, err := a.pins().Teardown()
	for _, iface := range t.Detached {
		fmt.Fprintf(w, "detached ctd from %s\n", iface)
	}
	if err != nil {
		return err
	}
	if !t.Existed {
		fmt.Fprintf(w, "nothing to tear down: %s does not exist\n", a.pinPath)
		return nil
	}
	if t.Kept != "" {
		fmt.Fprintf(w, "removed ctd's pins; kept %s: %s\n", a.pinPath, t.Kept)
		return nil
	}
	fmt.Fprintf(w, "removed %s\n", a.pinPath)
	return nil
}
