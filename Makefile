# ctd build, test and CI entry points. `make test` is what CI runs (.ci/run).

GO ?= go

# Steps share the kernel and the targets' order matters: never run in parallel.
.NOTPARALLEL:

.PHONY: all deps generate check-generated build test demo demo-cluster bench clean require-root

all: build

# System packages (clang-14, libbpf, bpftool, iproute2, ping, ...): a no-op
# once installed.
deps:
	./scripts/deps.sh

# Regenerate the bpf2go outputs. The go:generate lines in bpf/ pin the
# compiler and flags (clang-14, -mcpu=v3, ...) so that the objects are
# reproducible: check-generated compares them byte for byte.
generate: deps
	$(GO) generate ./bpf/...

# Fail if the committed generated BPF objects differ from a fresh generate.
check-generated: generate
	@if ! git diff --quiet --exit-code -- bpf/ || \
	    [ -n "$$(git ls-files --others --exclude-standard -- bpf/)" ]; then \
		git status --short -- bpf/ >&2; \
		echo "generated BPF objects are stale: run make generate and commit" >&2; \
		exit 1; \
	fi

build:
	$(GO) build -o bin/ctd ./cmd/ctd

# -p 1: the tests share one kernel (netns, tc, bpffs) and 2 cores.
# The etcd tests run once more against Debian's etcd 3.4 (unpacked by
# deps.sh), the oldest etcd cluster mode supports.
ETCD34 ?= /var/cache/ctd/etcd-server/usr/bin/etcd

test: require-root deps check-generated
	$(GO) vet ./...
	$(GO) test -count=1 -p 1 -timeout 25m ./...
	CTD_ETCD_BINARY=$(ETCD34) $(GO) test -count=1 -p 1 -timeout 10m ./control/kvstore ./control/identity ./control/cluster
	CTD_ETCD_BINARY=$(ETCD34) $(GO) test -count=1 -p 1 -timeout 10m -run '^TestCluster' ./cmd/ctd ./test

demo: require-root deps build
	CTD_BIN=$(CURDIR)/bin/ctd bash scripts/demo.sh

# Three-member etcd and three namespace nodes in cluster mode (README "Cluster mode").
demo-cluster: require-root deps build
	CTD_BIN=$(CURDIR)/bin/ctd bash scripts/demo-cluster.sh

bench: require-root deps
	$(GO) run ./test/bench/cmd/benchtable

clean:
	rm -rf bin/

require-root:
	@if [ "$$(id -u)" -ne 0 ]; then \
		echo "error: 'make $(or $(MAKECMDGOALS),all)' needs root (network namespaces, tc, bpffs): run it as root, e.g. sudo make $(MAKECMDGOALS)" >&2; \
		exit 1; \
	fi
