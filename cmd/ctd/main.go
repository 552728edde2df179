// Command ctd attaches ctd's connection-tracking datapath to interfaces and
// operates it: conntrack, ipcache, policy, metrics and events.
package main

import (
	"fmt"
	"os"
)

func main() {
	if err := newRootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "ctd: "+err.Error())
		os.Exit(1)
	}
}
