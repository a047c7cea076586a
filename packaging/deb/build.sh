#!/bin/sh
# Builds dist/imds-tracer_<version>_all.deb with dpkg-deb alone (no debhelper, no root:
# --root-owner-group makes every file root:root).
#
# Layout of the package:
#   /usr/lib/python3/dist-packages/imds_tracer/   the package, BPF sources as real files
#   /usr/lib/python3/dist-packages/imds_tracer-<v>.dist-info/
#   /usr/bin/imds-tracer                          entry point (imds_tracer.cli:main)
#   /lib/systemd/system/imds-tracer.service
#   /etc/imds-tracer/config.toml                  conffile
#   /etc/logrotate.d/imds-tracer                  conffile
#   /usr/share/man/man1/imds-tracer.1.gz          help2man from --help (static page without it)
#   /usr/share/doc/imds-tracer/                   copyright, README, examples/ (Prometheus
#                                                 rules, Grafana dashboard, DaemonSet)
set -eu

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/packaging/deb"
cd "$ROOT"
say() { echo "deb: $*" >&2; }

PYTHON=${PYTHON:-/usr/bin/python3}
VERSION=$("$PYTHON" - <<'EOF'
import re
text = open("pyproject.toml").read()
print(re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1))
EOF
)
NAME=imds-tracer
STAGE="$ROOT/build/deb/${NAME}_${VERSION}_all"
OUT="$ROOT/dist/${NAME}_${VERSION}_all.deb"
SITE=usr/lib/python3/dist-packages

rm -rf "$STAGE"
mkdir -p "$STAGE/DEBIAN" "$ROOT/dist"

# --- the Python package: every module, the BPF sources copied as files (imds_tracer/bpf is a
# symlink to ../bpf in the source tree; the installed package must not depend on that) ---
mkdir -p "$STAGE/$SITE"
( cd "$ROOT" && find imds_tracer \( -name '*.py' -o -path 'imds_tracer/data/*.json' \) -not -path '*/__pycache__/*' -not -path 'imds_tracer/bpf/*' ) |
while read -r f; do
	install -D -m 0644 "$f" "$STAGE/$SITE/$f"
done
mkdir -p "$STAGE/$SITE/imds_tracer/bpf"
found_bpf=no
for f in "$ROOT"/bpf/*.c "$ROOT"/bpf/*.h; do
	[ -f "$f" ] || continue
	install -m 0644 "$f" "$STAGE/$SITE/imds_tracer/bpf/"
	found_bpf=yes
done
[ $found_bpf = yes ] || say "WARNING: no BPF sources in bpf/: the package cannot attach probes"

DISTINFO="$STAGE/$SITE/imds_tracer-$VERSION.dist-info"
mkdir -p "$DISTINFO"
cat > "$DISTINFO/METADATA" <<EOF
Metadata-Version: 2.1
Name: imds-tracer
Version: $VERSION
Summary: eBPF agent that finds the processes reading the cloud instance metadata service in normal (token-less) mode
License: Apache-2.0
Requires-Python: >=3.9
EOF
printf '[console_scripts]\nimds-tracer = imds_tracer.cli:main\n' > "$DISTINFO/entry_points.txt"
echo imds_tracer > "$DISTINFO/top_level.txt"
echo dpkg > "$DISTINFO/INSTALLER"

mkdir -p "$STAGE/usr/bin"
cat > "$STAGE/usr/bin/imds-tracer" <<'EOF'
#!/usr/bin/python3
# imds-tracer entry point (Debian package). BCC's Python module comes from python3-bpfcc.
import sys

from imds_tracer.cli import main

sys.exit(main())
EOF
chmod 0755 "$STAGE/usr/bin/imds-tracer"

# --- service, config, logrotate ---
install -D -m 0644 systemd/imds-tracer.service "$STAGE/lib/systemd/system/imds-tracer.service"
install -D -m 0644 packaging/config.toml "$STAGE/etc/imds-tracer/config.toml"
install -D -m 0644 packaging/logrotate/imds-tracer "$STAGE/etc/logrotate.d/imds-tracer"

# --- documentation ---
DOC="$STAGE/usr/share/doc/$NAME"
install -D -m 0644 "$HERE/copyright" "$DOC/copyright"
for f in README.md; do
	[ -f "$f" ] && install -m 0644 "$f" "$DOC/"
done
mkdir -p "$DOC/examples"
for f in packaging/prometheus/imds-tracer.rules.yml packaging/grafana/imds-tracer.json \
	packaging/kubernetes/daemonset.yaml; do
	[ -f "$f" ] && install -m 0644 "$f" "$DOC/examples/"
done

# --- man page: help2man over the staged package's --help, else a static page ---
mkdir -p "$STAGE/usr/share/man/man1"
PYTHON="$PYTHON" sh packaging/manpage.sh "$STAGE/$SITE" "$VERSION" "$STAGE/usr/share/man/man1/imds-tracer.1"
gzip -9n "$STAGE/usr/share/man/man1/imds-tracer.1"

# --- control ---
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@SIZE@/$SIZE/" "$HERE/control.in" > "$STAGE/DEBIAN/control"
install -m 0644 "$HERE/conffiles" "$STAGE/DEBIAN/conffiles"
for s in postinst prerm postrm; do
	install -m 0755 "$HERE/$s" "$STAGE/DEBIAN/$s"
done
( cd "$STAGE" && find . -type f -not -path './DEBIAN/*' -not -path './etc/*' -printf '%P\0' |
	sort -z | xargs -0 md5sum ) > "$STAGE/DEBIAN/md5sums"
chmod 0644 "$STAGE/DEBIAN/md5sums"

# normalise modes: umask of whoever builds must not leak into the package
find "$STAGE" -type d -exec chmod 0755 {} +

dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$OUT" >/dev/null
say "built $OUT ($(du -k "$OUT" | cut -f1) KiB)"
echo "$OUT"
