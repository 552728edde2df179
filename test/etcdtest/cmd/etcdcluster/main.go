// Command etcdcluster runs a small etcd cluster of embedded members on this
// machine until SIGINT or SIGTERM, for `make demo-cluster`: it prints the
// client URLs, comma-separated, on one line once every member is ready.
// Started again with the same --dir and --base-port it resumes the same
// cluster from its data.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/ctd-dev/ctd/test/etcdtest"
)

func main() {
	var o etcdtest.Options
	flag.IntVar(&o.Members, "members", 3, "number of members")
	flag.StringVar(&o.Host, "host", "127.0.0.1", "IP address the members listen on")
	flag.StringVar(&o.Dir, "dir", "", "directory of the members' data (required)")
	flag.IntVar(&o.BasePort, "base-port", 0, "client ports from here on, peer ports from here+100 (required)")
	flag.Parse()
	o.Fsync = true
	if o.Dir == "" || o.BasePort <= 0 || o.Members < 1 {
		fmt.Fprintln(os.Stderr, "etcdcluster: give --dir DIR and --base-port N (and --members N >= 1)")
		os.Exit(2)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	c, err := etcdtest.Run(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "etcdcluster: "+err.Error())
		os.Exit(1)
	}
	fmt.Println(strings.Join(c.Endpoints(), ","))
	<-sig
	c.StopAll()
}
