#!/bin/sh
# Builds dist/imds-tracer-<version>-1.noarch.rpm (and the .src.rpm) with rpmbuild, in a private
# _topdir under build/rpm. On Debian, rpmbuild comes from the `rpm` package; the spec's
# fallback macros stand in for systemd-rpm-macros / python3-rpm-macros there. An rpm built on
# Debian is a check of the spec only: its python3_sitelib and python(abi) are the build
# machine's (3.11); build the rpm you ship on the target distribution (rpmbuild or mock), or
# rebuild the .src.rpm there: rpmbuild --rebuild dist/imds-tracer-*.src.rpm
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
say() { echo "rpm: $*" >&2; }
if ! command -v rpmbuild >/dev/null 2>&1; then
	say "rpmbuild not found: apt-get install rpm (Debian/Ubuntu) or dnf install rpm-build"
	exit 1
fi
PYTHON=${PYTHON:-/usr/bin/python3}
VERSION=$("$PYTHON" -c 'import re; print(re.search(r"^version\s*=\s*\"([^\"]+)\"", open("pyproject.toml").read(), re.M).group(1))')
TOP="$ROOT/build/rpm"
SRC="$TOP/src/imds-tracer-$VERSION"
rm -rf "$TOP"
mkdir -p "$SRC" "$TOP/SOURCES" "$ROOT/dist"

# the source tarball: the files the spec installs, BPF sources dereferenced
cp -RL imds_tracer "$SRC/imds_tracer"
find "$SRC" -name __pycache__ -type d -exec rm -rf {} +
mkdir -p "$SRC/bpf" "$SRC/systemd" "$SRC/packaging"
cp bpf/*.c bpf/*.h "$SRC/bpf/"
cp systemd/imds-tracer.service "$SRC/systemd/"
cp -R packaging/config.toml packaging/logrotate packaging/prometheus packaging/grafana \
	packaging/kubernetes "$SRC/packaging/"
[ -f pyproject.toml ] && cp pyproject.toml "$SRC/"
[ -f README.md ] && cp README.md "$SRC/"
PYTHON="$PYTHON" sh packaging/manpage.sh "$ROOT" "$VERSION" "$SRC/imds-tracer.1"
tar -C "$TOP/src" -czf "$TOP/SOURCES/imds-tracer-$VERSION.tar.gz" "imds-tracer-$VERSION"

# On Debian the rpm database is empty: BuildRequires cannot be checked there.
nodeps=""
if ! rpm -q python3 >/dev/null 2>&1; then
	say "no python3 in the rpm database (not an rpm-based system): building with --nodeps"
	nodeps=--nodeps
	# and its python dependency generator needs python3-packaging; the Requires are explicit
	set -- --define "__pythondist_requires %{nil}" --define "__pythondist_provides %{nil}" \
		--define "__brp_compress %{nil}"  # Debian runs it with dash; the spec gzips itself
else
	set --
fi
rpmbuild -ba --quiet $nodeps \
	--define "_topdir $TOP" \
	--define "version_override $VERSION" \
	--define "_build_id_links none" "$@" \
	packaging/rpm/imds-tracer.spec
for f in "$TOP"/RPMS/noarch/*.rpm "$TOP"/SRPMS/*.rpm; do
	cp "$f" dist/
	say "built dist/$(basename "$f") ($(du -k "$f" | cut -f1) KiB)"
done
ls "$ROOT"/dist/imds-tracer-"$VERSION"-*.noarch.rpm
