#!/bin/sh
# Installs what imds-tracer needs from the OS, once; safe to run again.
# - OS_PACKAGES (from the Makefile) when any is missing
# - kernel headers: the exact linux-headers-$(uname -r) where the distro has it, else the
#   distro's generic headers linked as /lib/modules/$(uname -r)/{build,source} so that BCC
#   compiles (the tracepoint backend reads no kernel struct, so it is exact anyway; the kprobe
#   backend takes its offsets from BTF, never from these headers)
# - tracefs mounted at /sys/kernel/tracing
set -eu
say() { echo "install-os-deps: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
	say "not root: skipping OS packages (run 'sudo make ...' to install them)"
	exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
	say "no apt-get: install BCC (python3-bcc), kernel headers, tcpdump, iproute2 yourself"
	exit 0
fi

missing=""
for p in ${OS_PACKAGES:-}; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
kver=$(uname -r)
updated=no
apt_update() { [ $updated = yes ] || { apt-get update -qq; updated=yes; }; }
if [ -n "$missing" ]; then
	say "installing:$missing"
	apt_update
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

if [ ! -e "/lib/modules/$kver/build" ]; then
	apt_update
	if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
		say "installing linux-headers-$kver"
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$kver" >/dev/null
	else
		arch=$(dpkg --print-architecture)
		flavour=cloud-$arch
		apt-cache show "linux-headers-$flavour" >/dev/null 2>&1 || flavour=$arch
		say "WARNING: no linux-headers-$kver in the distro; using linux-headers-$flavour" \
			"(enough for the tracepoint backend; the kprobe backend takes offsets from BTF)"
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$flavour" >/dev/null
		build=$(ls -d /usr/src/linux-headers-*-"$flavour" | sort -V | tail -n 1)
		common=$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n 1)
		mkdir -p "/lib/modules/$kver"
		ln -sfn "$build" "/lib/modules/$kver/build"
		ln -sfn "$common" "/lib/modules/$kver/source"
	fi
fi

if [ -d /sys/kernel/tracing ] && [ ! -e /sys/kernel/tracing/events ]; then
	mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || say "could not mount tracefs"
fi
