// Command ctd attaches ctd's connection-tracking datapath to interfaces and
// operates it: conntrack, ipcache, policy, metrics and events.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/ctd-dev/ctd/control/quote"
)

func main() {
	a := &app{}
	if err := newRootCmd(a).Execute(); err != nil {
		err = a.undoFailed(err)
		fmt.Fprintln(os.Stderr, "ctd: "+quote.Message(err.Error()))
		code := 1
		if ee := (*exitError)(nil); errors.As(err, &ee) {
			code = ee.code
		}
		os.Exit(code)
	}
}
