#!/bin/bash
# `make rpm`: build packaging/rpm/xencbt.spec here, on Debian, into dist/.
#
# The spec is written for EL9 (pyproject-rpm-macros); Debian's rpmbuild lacks those
# macros and EL9's packages, so local-check/ stands in for the macros and dependencies
# are not checked (--nodeps).  What this proves: the spec parses, builds, and its
# packages hold the files, scripts and #! line they should.  What it cannot: that the
# EL9 dependency names resolve and that it installs and runs on EL9.
set -euo pipefail
cd "$(dirname "$0")/../.."
version=$(packaging/version.sh)
spec=packaging/rpm/xencbt.spec
top=$PWD/build/rpm

spec_version=$(rpmspec -q --srpm --qf '%{version}' "$spec" 2>/dev/null)
[ "$spec_version" = "$version" ] || {
    echo "build-rpm: $spec says Version $spec_version, xencbt_core says $version" >&2
    exit 1
}
rm -rf "$top"
mkdir -p "$top/SOURCES" dist
packaging/stage.sh "$top/stage/xencbt-$version"
tar -C "$top/stage" -czf "$top/SOURCES/xencbt-$version.tar.gz" "xencbt-$version"

PATH=/usr/sbin:/usr/bin:/sbin:/bin rpmbuild -bb --nodeps \
    --define "_topdir $top" \
    --load packaging/rpm/local-check/macros \
    "$spec" >"$top/rpmbuild.log" 2>&1 || {
    tail -40 "$top/rpmbuild.log" >&2
    exit 1
}
cp "$top"/RPMS/noarch/xencbt-*.rpm dist/

rpm=dist/xencbt-$version-1.noarch.rpm
files=$(rpm -qlp "$rpm")
for f in /usr/bin/xencbt /usr/share/xencbt/nbdkit-xencbt-plugin \
    /usr/lib/python3.9/site-packages/xencbt_core/params.py \
    /usr/lib/python3.9/site-packages/xencbt_cli/main.py \
    /usr/share/man/man1/xencbt.1 /usr/share/man/man1/nbdkit-xencbt-plugin.1; do
    # Man pages are compressed on EL9 (brp-compress), not by Debian's rpmbuild.
    grep -qx "$f\(\.gz\)\?" <<<"$files" || { echo "build-rpm: $rpm lacks $f" >&2; exit 1; }
done
if grep -q xensim <<<"$files"; then
    echo "build-rpm: the simulator is in $rpm" >&2
    exit 1
fi
rpm2cpio "$rpm" | (cd "$top" && cpio -i --quiet --to-stdout ./usr/share/xencbt/nbdkit-xencbt-plugin) \
    >"$top/plugin"
shebang=$(sed -n 1p "$top/plugin")
[ "$shebang" = "#!/usr/sbin/nbdkit python" ] || {
    echo "build-rpm: the plugin's #! line is '$shebang'" >&2
    exit 1
}
# (Output captured first: grep -q on a pipe would SIGPIPE the writer under pipefail.)
scripts=$(rpm -qp --scripts "$rpm")
grep -q 'nbdkit --dump-config' <<<"$scripts" || {
    echo "build-rpm: no %post linking the plugin" >&2
    exit 1
}
# Smoke test of the payload (Debian's Python 3.11 and nbdkit stand in for EL9's): the
# command and the plugin start from the unpacked files alone.
root=$top/root
mkdir -p "$root"
rpm2cpio "$rpm" | (cd "$root" && cpio -idm --quiet)
site=$root/usr/lib/python3.9/site-packages
PYTHONPATH=$site /usr/bin/python3 "$root/usr/bin/xencbt" --help >/dev/null
dump=$(PYTHONPATH=$site nbdkit python "$root/usr/share/xencbt/nbdkit-xencbt-plugin" --dump-plugin)
grep -qx "xencbt_version=$version" <<<"$dump" || {
    echo "build-rpm: the packaged plugin does not start" >&2
    exit 1
}
echo "built: dist/xencbt-$version-1.noarch.rpm dist/xencbt-simulator-$version-1.noarch.rpm"
