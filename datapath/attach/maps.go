package attach

import (
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/cilium/ebpf"
)

// ProgramMaps returns the IDs of the maps program id uses; none if there is
// no such program (any more).
func ProgramMaps(id ebpf.ProgramID) ([]ebpf.MapID, error) {
	if id == 0 {
		return nil, nil
	}
	p, err := ebpf.NewProgramFromID(id)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open program %d: %w", id, err)
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		return nil, fmt.Errorf("program %d: %w", id, err)
	}
	ids, _ := info.MapIDs()
	return ids, nil
}

// ListUsing is List narrowed to one datapath: its TCX links, which are its
// own by being pinned below linkDir, and those of ctd's tc filters whose
// programs use one of the maps mapIDs (the filters of a ctd pinned elsewhere
// are left out).
func ListUsing(linkDir string, mapIDs []ebpf.MapID) ([]Attachment, error) {
	all, err := List(linkDir)
	if err != nil {
		return nil, err
	}
	var out []Attachment
	for _, at := range all {
		if at.Mode == ModeTC {
			ours, err := usesAny(mapIDs, at.IngressProgID, at.EgressProgID)
			if err != nil {
				return nil, fmt.Errorf("tc filters of %s: %w", at.Iface, err)
			}
			if !ours {
				continue
			}
		}
		out = append(out, at)
	}
	return out, nil
}

func usesAny(mapIDs []ebpf.MapID, progs ...ebpf.ProgramID) (bool, error) {
	for _, id := range progs {
		used, err := ProgramMaps(id)
		if err != nil {
			return false, err
		}
		for _, m := range used {
			if slices.Contains(mapIDs, m) {
				return true, nil
			}
		}
	}
	return false, nil
}
