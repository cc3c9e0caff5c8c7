#!/bin/bash
# `make deb-check`: install the built packages, prove they work with only the installed
# files, then purge them and prove every file is gone.
#
# Outside the source tree (a temp dir) and in a clean environment (system PATH, no
# venv, no XENCBT_* variables): `nbdkit xencbt --dump-plugin`, `xencbt --help`, then
# the backup story of the installed simulator package (python3 -m xensim.backupdemo):
# a full backup, two incrementals, verify, and two restores compared byte for byte
# with the disk at those moments, all through the installed /usr/bin/xencbt, which
# runs the installed plugin as `nbdkit xencbt`.
#
# The packages are purged on every exit: installed, they would shadow a development
# venv's editable install for any process started meanwhile.
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
version=$("$src/packaging/version.sh")
debs=("$src/dist/xencbt_${version}_all.deb" "$src/dist/xencbt-simulator_${version}_all.deb")
PLUGIN=/usr/share/xencbt/nbdkit-xencbt-plugin
SITE=/usr/lib/python3/dist-packages

sudo=$([ "$(id -u)" = 0 ] || echo sudo)
apt() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get -q -y "$@"; }
clean() {
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME="$work" LANG=C.UTF-8 TMPDIR=/tmp "$@"
}
step() { printf '==> %s\n' "$*"; }
fail() {
    printf 'deb-check: FAILED: %s\n' "$*" >&2
    exit 1
}

for deb in "${debs[@]}"; do
    [ -f "$deb" ] || fail "$deb is missing; run make deb"
done
status() { dpkg-query -W -f='${Status}\n' "$@" 2>/dev/null || true; }
if [[ $(status xencbt) == *"ok installed"* ]]; then
    fail "xencbt is already installed; this check would purge it (apt-get purge xencbt first)"
fi

work=$(mktemp -d /tmp/xencbt-deb-check.XXXXXX)
purged=
purge() {
    [ -n "$purged" ] && return
    purged=1
    apt purge xencbt xencbt-simulator >"$work/purge.log" 2>&1 || cat "$work/purge.log" >&2
}
trap 'purge; rm -rf "$work"' EXIT

step "installing ${debs[*]##*/}"
start=$SECONDS
apt install --install-recommends "${debs[@]}" >"$work/install.log" 2>&1 || {
    cat "$work/install.log" >&2
    fail "apt-get install"
}
dpkg-query -L xencbt xencbt-simulator | sort -u >"$work/files"
cd "$work"

step "the plugin is in nbdkit's plugin directory, with Debian's nbdkit #! line"
clean nbdkit --dump-config >config.txt
plugindir=$(sed -n 's/^plugindir=//p' config.txt)
link="$plugindir/nbdkit-xencbt-plugin"
[ "$(readlink -f "$link")" = "$PLUGIN" ] || fail "$link does not lead to $PLUGIN"
[ -x "$PLUGIN" ] || fail "$PLUGIN is not executable"
shebang="#!$(sed -n 's/^binary=//p' config.txt) python"
[ "$(head -1 "$PLUGIN")" = "$shebang" ] || fail "$PLUGIN: the #! line is not $shebang"

step "nbdkit xencbt --dump-plugin"
clean nbdkit xencbt --dump-plugin >dump.txt || fail "nbdkit xencbt --dump-plugin"
grep -qx "xencbt_version=$version" dump.txt || fail "--dump-plugin lacks xencbt_version=$version"
grep -qx "xencbt_param_vdi=.*" dump.txt || fail "--dump-plugin lacks the parameters"
grep -qx "can_extents=1" dump.txt || fail "--dump-plugin lacks can_extents=1"

step "xencbt --help"
clean xencbt --help >help.txt || fail "xencbt --help"
grep -q "^usage: xencbt" help.txt || fail "xencbt --help printed no usage"

step "the installed modules are the ones used, and xencbt runs the plugin as nbdkit xencbt"
clean python3 - "$SITE" <<'EOF' || fail "modules or plugin name"
import sys

import xencbt_cli
import xencbt_core
import xensim
from xencbt_cli.jobs.snapshot_copy import plugin

for module in (xencbt_core, xencbt_cli, xensim):
    assert module.__file__.startswith(sys.argv[1] + "/"), module.__file__
assert plugin() == ["xencbt"], plugin()
EOF

step "man pages"
for page in nbdkit-xencbt-plugin xencbt xensim; do
    grep -qx "/usr/share/man/man1/$page.1.gz" "$work/files" || fail "no man page $page(1)"
done
if command -v man >/dev/null; then
    clean man -w xencbt nbdkit-xencbt-plugin >/dev/null || fail "man cannot find the pages"
fi

step "full + incremental backups and byte-identical restores (installed xencbt and xensim)"
clean python3 -m xensim.backupdemo >demo.log 2>&1 || {
    cat demo.log >&2
    fail "the backup story"
}
grep -q "full" demo.log || fail "no full backup in the story"
grep -q "incremental" demo.log || fail "no incremental backup in the story"
identical=$(grep -c "byte-identical to the disk" demo.log || true)
[ "$identical" = 2 ] || {
    cat demo.log >&2
    fail "expected 2 byte-identical restores, got $identical"
}
sed -n '/summary/,$p' demo.log

step "apt-get purge xencbt xencbt-simulator: every installed file is gone"
purge
# Purged packages are unknown to dpkg or "not-installed"; anything else (installed,
# config-files, half-installed) means the purge did not finish.
known=$(status xencbt xencbt-simulator | grep -v ' not-installed$' || true)
[ -z "$known" ] || fail "dpkg still has the packages after purge: $known"
left=()
while read -r path; do
    # Directories shared with other packages (/usr/bin, /usr/share/man/...) stay.
    [ -d "$path" ] && [ ! -L "$path" ] && continue
    [ -e "$path" ] || [ -L "$path" ] && left+=("$path")
done <"$work/files"
for path in "$link" "$SITE/xencbt_core" "$SITE/xencbt_cli" "$SITE/xensim" /usr/share/xencbt; do
    [ -e "$path" ] || [ -L "$path" ] && left+=("$path")
done
[ ${#left[@]} = 0 ] || fail "left behind: ${left[*]}"
echo "deb-check: passed in $((SECONDS - start)) s (install, use, purge)"
