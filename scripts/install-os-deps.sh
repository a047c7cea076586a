#!/bin/sh
# Installs what imds-tracer needs from the OS, once; safe to run again.
#
#   sh scripts/install-os-deps.sh [--dry-run] [--os-release FILE]
#
# The distribution is read from /etc/os-release (ID, ID_LIKE, VERSION_ID), which picks the
# package manager (apt-get, dnf, yum, zypper), the package names and the Python that runs
# the agent. --dry-run prints that plan and changes nothing (no root needed); the unit tests
# run it against the os-release files of every distribution we name (tests/data/os-release).
#
# - BCC from the distribution, never from PyPI. Its Python module is pure Python over libbcc:
#   where the distribution builds it for an older platform Python (RHEL 8 family: 3.6; SUSE
#   15: 3.6; Ubuntu 20.04: 3.8) the agent runs on a newer Python and finds it there
#   (imds_tracer/sources/bcc_module.py).
# - kernel headers for BCC to compile against: the running kernel's where the distribution
#   has them; on Debian/Ubuntu else the generic ones linked as /lib/modules/$(uname -r)/
#   {build,source} (every struct offset the backends read comes from BTF, not from them)
# - on Debian/Ubuntu also OS_PACKAGES (from the Makefile: the tools the tests drive)
# - tracefs mounted at /sys/kernel/tracing
set -eu
say() { echo "install-os-deps: $*" >&2; }

dry_run=no
os_release=/etc/os-release
while [ $# -gt 0 ]; do
	case $1 in
	--dry-run) dry_run=yes ;;
	--os-release) os_release=$2; shift ;;
	*) say "unknown argument $1 (use --dry-run, --os-release FILE)"; exit 2 ;;
	esac
	shift
done
[ -r "$os_release" ] || [ "$os_release" != /etc/os-release ] || os_release=/usr/lib/os-release
if [ ! -r "$os_release" ]; then
	say "cannot read $os_release: install BCC (python3-bcc), kernel headers yourself"
	exit 1
fi
case $os_release in /*) ;; *) os_release=./$os_release ;; esac   # `.` searches PATH otherwise
kver=${KERNEL_RELEASE:-$(uname -r)}

# os-release is a shell fragment by specification; read it in a subshell, keep 3 fields
fields=$(ID='' ID_LIKE='' VERSION_ID='' && . "$os_release" &&
	printf '%s|%s|%s' "$ID" "$ID_LIKE" "$VERSION_ID")
id=${fields%%|*}; rest=${fields#*|}; id_like=${rest%%|*}; version_id=${rest#*|}
major=${version_id%%.*}
major=${major:-0}
like() { case " $id $id_like " in *" $1 "*) return 0 ;; esac; return 1; }

family="" manager="" python=/usr/bin/python3 packages="" note=""
if like debian || like ubuntu; then
	family=debian manager=apt-get
	packages="python3-bpfcc bpfcc-tools linux-headers-$kver python3-venv python3-psutil"
	packages="$packages python3-prometheus-client"
	case "$id:$major" in
	# a TOML parser where python3 is older than 3.11 (tomllib)
	debian:11) packages="$packages python3-toml" ;;
	ubuntu:22) packages="$packages python3-tomli" ;;
	# 20.04's python3 is 3.8; its python3-bpfcc (python3's dist-packages) works on 3.9
	ubuntu:20) packages="$packages python3.9 python3.9-venv python3-toml" python=/usr/bin/python3.9 ;;
	esac
elif [ "$id" = amzn ]; then
	if [ "$major" -lt 2022 ]; then
		say "Amazon Linux $version_id: its Python is 3.7, below the 3.9 floor; use Amazon Linux 2023"
		exit 1
	fi
	family=al2023 manager=dnf
	packages="bcc bcc-tools python3-bcc kernel-devel-$kver kernel-headers python3-pip python3-psutil"
	note="prometheus-client comes from PyPI into the venv (make deps)"
elif like rhel || like centos || like fedora; then
	el=$major
	[ "$id" = alinux ] && el=$((major + 5))    # Alibaba Cloud Linux 3 is built from EL8
	[ "$id" = fedora ] && el=99
	if [ "$el" -lt 8 ]; then
		say "$id $version_id: too old (its Python is 3.6 with no python39 package); use an EL8 or newer"
		exit 1
	fi
	manager=dnf
	packages="bcc bcc-tools python3-bcc kernel-devel-$kver kernel-headers"
	if [ "$el" -eq 8 ]; then
		# python3 is 3.6 and BCC is built for it: the agent runs on python39
		family=el8 python=/usr/bin/python3.9
		packages="$packages python39 python39-pip python39-psutil python39-toml"
	else
		family=el$el
		[ "$id" = fedora ] && family=fedora
		packages="$packages python3-pip python3-psutil"
	fi
	note="prometheus-client comes from PyPI into the venv (make deps; EPEL has them too)"
elif like suse || like opensuse; then
	# python3 is 3.6 and python3-bcc is built for it: the agent runs on python311
	family=suse manager=zypper python=/usr/bin/python3.11
	packages="bcc-tools python3-bcc kernel-default-devel kernel-devel python311 python311-pip"
	note="psutil, prometheus-client comes from PyPI into the venv (make deps)"
else
	say "$id $version_id (like: ${id_like:-nothing}) is not a distribution we know:" \
		"install BCC's Python module, kernel headers and Python >= 3.9 yourself"
	exit 1
fi

if [ $dry_run = yes ]; then
	echo "distribution: $id $version_id"
	echo "family: $family"
	echo "manager: $manager"
	echo "packages: $packages"
	echo "python: $python"
	[ -z "$note" ] || echo "note: $note"
	exit 0
fi

if [ "$(id -u)" != 0 ]; then
	say "not root: skipping OS packages (run 'sudo make ...' to install them)"
	exit 0
fi
[ "$python" = /usr/bin/python3 ] || say "run the agent with $python: make deps PYTHON_OS=$python"
[ -z "$note" ] || say "$note"

case $manager in
dnf | yum)
	command -v dnf >/dev/null 2>&1 || manager=yum
	$manager install -y -q $packages
	;;
zypper)
	zypper --non-interactive install --no-recommends $packages
	;;
apt-get)
	missing=""
	for p in ${OS_PACKAGES:-} $(echo "$packages" | tr ' ' '\n' | grep -v "^linux-headers-"); do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
	done
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
				"(struct offsets come from BTF, not from the headers)"
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$flavour" >/dev/null
			build=$(ls -d /usr/src/linux-headers-*-"$flavour" | sort -V | tail -n 1)
			common=$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n 1)
			mkdir -p "/lib/modules/$kver"
			ln -sfn "$build" "/lib/modules/$kver/build"
			ln -sfn "$common" "/lib/modules/$kver/source"
		fi
	fi
	;;
esac

if [ -d /sys/kernel/tracing ] && [ ! -e /sys/kernel/tracing/events ]; then
	mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || say "could not mount tracefs"
fi
