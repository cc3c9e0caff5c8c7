#!/bin/bash
# `make rpm-check`: inspect the packages `make rpm` built, as far as Debian can without
# EL9 (nothing is installed): what they require and provide, that they hold every file
# of the source tree's packages and nothing built here, that the scriptlets work under
# a strict /bin/sh, and rpmlint (packaging/rpm/rpmlint.toml says what it ignores, why).
#
# The Python: rpm derives `python(abi)` from where the modules go (%{python3_sitelib},
# EL9's value in local-check/macros); it must be the version the code is checked
# against (tests/test_python_versions.py reads the same file), the one EL9's
# nbdkit-python-plugin embeds.
set -euo pipefail
cd "$(dirname "$0")/../.."
version=$(packaging/version.sh)
main=dist/xencbt-$version-1.noarch.rpm
sim=dist/xencbt-simulator-$version-1.noarch.rpm
step() { printf '==> %s\n' "$*"; }
fail() {
    printf 'rpm-check: FAILED: %s\n' "$*" >&2
    exit 1
}
for rpm in "$main" "$sim"; do
    [ -f "$rpm" ] || fail "$rpm is missing; run make rpm"
done
work=$(mktemp -d /tmp/xencbt-rpm-check.XXXXXX)
trap 'rm -rf "$work"' EXIT

python=$(sed -n 's|^%python3_sitelib *\(/usr/lib/python\(3\.[0-9]*\)/site-packages\)$|\2|p' \
    packaging/rpm/local-check/macros)
[ -n "$python" ] || fail "no %python3_sitelib in packaging/rpm/local-check/macros"
site=/usr/lib/python$python/site-packages

# has FILE LINE: LINE is one of FILE's lines (files, not pipes: grep -q on a pipe would
# SIGPIPE the writer under pipefail).
has() { grep -qxF -- "$2" "$1"; }

step "requires: python(abi) = $python, nbdkit's python plugin; provides: name = version"
for rpm in "$main" "$sim"; do
    name=$(rpm -qp --qf '%{name}' "$rpm")
    rpm -qp --requires "$rpm" | sort -u >"$work/$name.requires"
    rpm -qp --provides "$rpm" >"$work/$name.provides"
    abi=$(grep '^python(abi)' "$work/$name.requires" || true)
    [ "$abi" = "python(abi) = $python" ] || fail "$name requires '$abi', not python(abi) = $python"
    for need in /usr/bin/python3 nbdkit-server nbdkit-python-plugin python3-cryptography; do
        has "$work/$name.requires" "$need" || fail "$name does not require $need"
    done
    has "$work/$name.provides" "$name = $version-1" || fail "$name does not provide $name = $version-1"
done
for need in python3-libnbd python3-rich qemu-img /usr/bin/nbdcopy /usr/sbin/nbdkit; do
    has "$work/xencbt.requires" "$need" || fail "xencbt does not require $need"
done

step "files: every module of the tree, the plugin, man pages; nothing compiled here"
rpm -qlp "$main" | sort >"$work/main.files"
rpm -qlp "$sim" | sort >"$work/sim.files"
want() { # want LIST SRC-DIR PACKAGE-DIR: every file under SRC-DIR is in LIST
    git ls-files -- "$2" | while read -r f; do
        has "$1" "$3/${f#"$2"/}" || echo "$3/${f#"$2"/}"
    done
}
missing=$(
    want "$work/main.files" plugin/xencbt_core "$site/xencbt_core"
    want "$work/main.files" orchestrate/xencbt_cli "$site/xencbt_cli"
    want "$work/sim.files" simulator/xensim "$site/xensim"
)
[ -z "$missing" ] || fail "not packaged: $missing"
for f in /usr/bin/xencbt /usr/share/xencbt/nbdkit-xencbt-plugin \
    /usr/share/man/man1/xencbt.1.gz /usr/share/man/man1/nbdkit-xencbt-plugin.1.gz; do
    has "$work/main.files" "$f" || fail "xencbt lacks $f"
done
for f in /usr/bin/xensim /usr/share/man/man1/xensim.1.gz; do
    has "$work/sim.files" "$f" || fail "xencbt-simulator lacks $f"
done
# Byte code would be this machine's Python's (3.11), useless to EL9's 3.9: EL9's
# rpmbuild compiles its own (brp-python-bytecompile).
built=$(grep -E '\.pyc$|__pycache__' "$work/main.files" "$work/sim.files" || true)
[ -z "$built" ] || fail "byte code compiled here is packaged: $built"
both=$(comm -12 "$work/main.files" "$work/sim.files")
[ -z "$both" ] || fail "in both packages: $both"

step "scriptlets: %post links the plugin where nbdkit says, %postun leaves it on upgrade"
for rpm in "$main" "$sim"; do
    for tag in PREIN POSTIN PREUN POSTUN; do
        script=$(rpm -qp --qf "%{$tag}" "$rpm")
        [ "$script" = "(none)" ] && continue
        # EL9's /bin/sh is bash; dash is stricter about what a POSIX sh takes.
        for sh in bash dash; do
            $sh -n <<<"$script" || fail "$rpm: %$tag is not valid $sh"
        done
    done
done
post=$(rpm -qp --qf '%{POSTIN}' "$main")
postun=$(rpm -qp --qf '%{POSTUN}' "$main")
mkdir -p "$work/bin" "$work/plugins"
# A stand-in nbdkit that reports a plugin directory of our own.
printf '#!/bin/sh\necho plugindir=%s\n' "$work/plugins" >"$work/bin/nbdkit"
chmod +x "$work/bin/nbdkit"
PATH=$work/bin:/usr/bin:/bin dash -c "$post" post 1 || fail "%post failed"
[ "$(readlink "$work/plugins/nbdkit-xencbt-plugin")" = /usr/share/xencbt/nbdkit-xencbt-plugin ] ||
    fail "%post did not link the plugin into nbdkit's plugin directory"
dash -c "$postun" postun 1 || fail "%postun (upgrade) failed"
[ -L "$work/plugins/nbdkit-xencbt-plugin" ] || fail "%postun removed the link on upgrade"
printf '#!/bin/sh\n' >"$work/bin/nbdkit" # no plugindir: %post must refuse, not link "/"
if PATH=$work/bin:/usr/bin:/bin dash -c "$post" post 1 2>"$work/post.err"; then
    fail "%post succeeded without a plugin directory"
fi
grep -q 'names no plugin directory' "$work/post.err" || fail "%post failed without saying why"

step "rpmlint"
rpmlint -c packaging/rpm/rpmlint.toml "$main" "$sim" packaging/rpm/xencbt.spec \
    >"$work/rpmlint.log" 2>&1 || {
    cat "$work/rpmlint.log" >&2
    fail "rpmlint"
}
sed -n '/packages and/p' "$work/rpmlint.log"
echo "rpm-check: $main and $sim inspected (not installed: no EL9 here)"
