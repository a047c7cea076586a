#!/bin/sh
# Writes the imds-tracer(1) man page: help2man over `imds-tracer --help` (each command's own
# --help in a COMMANDS section, FILES/OVERHEAD/CAVEATS from packaging/imds-tracer.h2m), or a
# static page when help2man or a working --help is missing.
#   sh packaging/manpage.sh PACKAGE_PARENT_DIR VERSION OUTPUT
set -eu
PKGDIR=$1 VERSION=$2 OUT=$3
PYTHON=${PYTHON:-/usr/bin/python3}
HERE=$(cd "$(dirname "$0")" && pwd)
say() { echo "manpage: $*" >&2; }
SUMMARY="find processes reading the cloud instance metadata service in token-less mode"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/imds-tracer" <<EOS
#!/bin/sh
PYTHONPATH="$PKGDIR" PYTHONDONTWRITEBYTECODE=1 exec "$PYTHON" -m imds_tracer "\$@"
EOS
chmod 0755 "$tmp/imds-tracer"

include="$tmp/include.h2m"
cp "$HERE/imds-tracer.h2m" "$include"
echo "[COMMANDS]" >> "$include"
for cmd in run replay report doctor; do
	"$tmp/imds-tracer" "$cmd" --help > "$tmp/$cmd.txt" 2>/dev/null || continue
	printf '.SS "imds-tracer %s"\n.nf\n' "$cmd" >> "$include"
	sed -e 's/\\/\\e/g' -e 's/^\./\\\&./' -e 's/-/\\-/g' "$tmp/$cmd.txt" >> "$include"
	printf '.fi\n' >> "$include"
done

export LC_ALL=C.UTF-8
if command -v help2man >/dev/null 2>&1 && "$tmp/imds-tracer" --help >/dev/null 2>&1 &&
	help2man --no-info --locale=C.UTF-8 --section=1 --name="$SUMMARY" --include="$include" \
		--version-string="$VERSION" --output="$OUT" "$tmp/imds-tracer" 2>/dev/null; then
	say "from --help (help2man)"
else
	say "help2man or a working --help missing: static page"
	{
		echo ".TH IMDS-TRACER 1 \"\" \"imds-tracer $VERSION\" \"User Commands\""
		echo ".SH NAME"
		echo "imds-tracer \\- $SUMMARY"
		echo ".SH SYNOPSIS"
		echo ".B imds-tracer run"
		echo "[\\-\\-backend auto|kprobe|tracepoint] [\\-\\-config FILE] [\\-\\-log\\-dir DIR] [\\-\\-json FILE|\\-] [\\-\\-metrics\\-addr HOST:PORT] [\\-\\-quiet]"
		echo ".br"
		echo ".B imds-tracer replay"
		echo "FILE... [\\-\\-log\\-dir DIR] [\\-\\-json FILE|\\-] [\\-\\-metrics\\-addr HOST:PORT]"
		echo ".br"
		echo ".B imds-tracer report"
		echo "[\\-\\-log\\-dir DIR] [\\-\\-since 14d] [\\-\\-json]"
		echo ".br"
		echo ".B imds-tracer doctor"
		echo ".br"
		echo ".B imds-tracer"
		echo "\\-\\-version | \\-\\-help"
		sed 's/^\[\(.*\)\]$/.SH \1/' "$include"
	} > "$OUT"
fi
sed -i '/^\.\\" DO NOT MODIFY THIS FILE/d' "$OUT"
