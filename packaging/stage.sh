#!/bin/bash
# stage.sh DIR: copy the source tree into DIR as a release would hold it: tracked and
# new files, never what .gitignore excludes (.venv, caches, build/, dist/).
set -euo pipefail
dest=$1
cd "$(dirname "$0")/.."
mkdir -p "$dest"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf - | tar -xf - -C "$dest"
else
    tar --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
        --exclude='__pycache__' --exclude='*.egg-info' -cf - . | tar -xf - -C "$dest"
fi
