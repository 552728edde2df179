#!/usr/bin/env bash
# Installs the system packages ctd needs to build, generate and test on
# Debian bookworm. Idempotent: packages already installed are left alone and,
# when nothing is missing, no network access happens at all.
set -euo pipefail

PACKAGES=(
	clang-14
	llvm-14
	libbpf-dev
	bpftool
	iproute2
	iputils-ping
	socat
	nftables
	linux-perf
	linux-libc-dev
	gcc-multilib
	time
)

# Debian's etcd 3.4 (etcd-server), the oldest etcd cluster mode supports:
# `make test` runs the etcd tests against it as well. It is unpacked here,
# not installed, so that no etcd service is set up or started.
ETCD34_DIR=${ETCD34_DIR:-/var/cache/ctd/etcd-server}
ETCD34=$ETCD34_DIR/usr/bin/etcd

missing=()
for pkg in "${PACKAGES[@]}"; do
	# dpkg -s succeeds for removed-but-configured packages too; check the status line.
	if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
		missing+=("$pkg")
	fi
done

if [ "${#missing[@]}" -eq 0 ] && [ -x "$ETCD34" ]; then
	exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
	echo "deps.sh: missing packages: ${missing[*]}; run as root (sudo make deps)" >&2
	exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if [ "${#missing[@]}" -gt 0 ]; then
	echo "deps.sh: installing: ${missing[*]}"
	apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ ! -x "$ETCD34" ]; then
	echo "deps.sh: unpacking etcd-server (etcd 3.4) into $ETCD34_DIR"
	tmp=$(mktemp -d)
	chmod 755 "$tmp" # apt-get download fetches as the _apt user
	trap 'rm -rf "$tmp"' EXIT
	(cd "$tmp" && apt-get download -qq etcd-server)
	mkdir -p "$ETCD34_DIR"
	dpkg-deb -x "$tmp"/etcd-server_*.deb "$ETCD34_DIR"
	"$ETCD34" --version | head -1
fi
