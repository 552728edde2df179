package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Files in the state directory.
const (
	EndpointsFile = "endpoints.json"      // the addresses that live on this node
	LeaseFile     = "cluster-lease.json"  // the node's etcd lease, kept across restarts
	StatusFile    = "cluster-status.json" // what the daemon's sync reports
	lockFile      = "endpoints.lock"
)

// LocalEndpoint is an address that lives on this node and its identity.
type LocalEndpoint struct {
	IP       netip.Addr `json:"ip"`
	Identity uint32     `json:"identity"`
}

// ReadEndpoints returns this node's endpoints, by address.
func ReadEndpoints(dir string) ([]LocalEndpoint, error) {
	b, err := os.ReadFile(filepath.Join(dir, EndpointsFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read endpoints: %w", err)
	}
	var eps []LocalEndpoint
	if err := json.Unmarshal(b, &eps); err != nil {
		return nil, fmt.Errorf("endpoints file %s is corrupt: %w", filepath.Join(dir, EndpointsFile), err)
	}
	return eps, nil
}

// ChangeEndpoints runs fn on this node's endpoints under a lock and writes
// the result atomically.
func ChangeEndpoints(dir string, fn func([]LocalEndpoint) ([]LocalEndpoint, error)) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("state directory %s: %w", dir, err)
	}
	lf, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("lock endpoints: %w", err)
	}
	defer lf.Close()
	if err := unix.Flock(int(lf.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("lock endpoints: %w", err)
	}
	eps, err := ReadEndpoints(dir)
	if err != nil {
		return err
	}
	eps, err = fn(eps)
	if err != nil {
		return err
	}
	slices.SortFunc(eps, func(a, b LocalEndpoint) int { return a.IP.Compare(b.IP) })
	return writeJSONFile(filepath.Join(dir, EndpointsFile), eps)
}

// writeJSONFile replaces path with v's JSON atomically (mode 0600).
func writeJSONFile(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// leaseRecord is the lease file: the lease a daemon restarted within its
// TTL takes up again, so that its endpoints never leave the cluster.
type leaseRecord struct {
	ID   int64  `json:"id"`
	TTL  int64  `json:"ttl_s"`
	Node string `json:"node"`
}

// StatusReport is what `ctd cluster status` prints.
type StatusReport struct {
	Node           string    `json:"node"`
	Connected      bool      `json:"connected"`
	Synced         bool      `json:"synced"`
	Revision       int64     `json:"revision"`
	IPCacheEntries int       `json:"ipcache_entries"`
	PolicyRules    int       `json:"policy_rules"`
	LeaseTTL       int64     `json:"lease_ttl_s"`
	LeaseID        string    `json:"lease_id"`
	Endpoints      int       `json:"endpoints"` // this node's, published
	Conflicts      []string  `json:"conflicts"` // addresses other nodes publish too
	PID            int       `json:"pid"`
	Updated        time.Time `json:"updated"`
}

// statusHeartbeat is how often the daemon rewrites the status file even
// when nothing changed; a file older than three of them is stale.
const statusHeartbeat = 2 * time.Second

// ReadStatus reads the status the daemon of this state directory reports.
// When no daemon runs (or it stopped reporting) it says so: not connected,
// not synced, with the last figures it reported.
func ReadStatus(dir string) (StatusReport, bool, error) {
	b, err := os.ReadFile(filepath.Join(dir, StatusFile))
	if errors.Is(err, os.ErrNotExist) {
		return StatusReport{}, false, fmt.Errorf("no cluster status in %s: is 'ctd daemon --kvstore-endpoints ...' running with this --state-dir?", dir)
	}
	if err != nil {
		return StatusReport{}, false, fmt.Errorf("read cluster status: %w", err)
	}
	var st StatusReport
	if err := json.Unmarshal(b, &st); err != nil {
		return StatusReport{}, false, fmt.Errorf("cluster status file %s is corrupt: %w", filepath.Join(dir, StatusFile), err)
	}
	live := time.Since(st.Updated) < 3*statusHeartbeat && st.PID > 0 && syscall.Kill(st.PID, 0) == nil
	if !live {
		st.Connected, st.Synced = false, false
	}
	if st.Conflicts == nil {
		st.Conflicts = []string{}
	}
	return st, live, nil
}
