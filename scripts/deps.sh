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

missing=()
for pkg in "${PACKAGES[@]}"; do
	# dpkg -s succeeds for removed-but-configured packages too; check the status line.
	if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
		missing+=("$pkg")
	fi
done

if [ "${#missing[@]}" -eq 0 ]; then
	exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
	echo "deps.sh: missing packages: ${missing[*]}; run as root (sudo make deps)" >&2
	exit 1
fi

echo "deps.sh: installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
