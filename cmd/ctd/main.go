// Command ctd attaches ctd's connection-tracking datapath to interfaces and
// operates it: conntrack, ipcache, policy, metrics and events.
package main

import (
	"fmt"
	"os"

	"github.com/ctd-dev/ctd/control/quote"
)

func main() {
	if err := newRootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "ctd: "+quote.Message(err.Error()))
		os.Exit(1)
	}
}
