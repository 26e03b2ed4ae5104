#!/usr/bin/env bash
# Regenerate one lane's pinned constraints from a fresh venv (run through `make lock`):
#   scripts/lock.sh PYTHON LOCKFILE 'EXTRAS'      e.g. scripts/lock.sh python3.12 requirements/py312.lock test,plot
# pip resolves the project's dependencies with those extras afresh (no old lock applies) and the lock is
# what `pip freeze` then lists, minus nemojax itself.
set -euo pipefail
python="$1" lock="$2" extras="$3"
pip_version="$(sed -n 's/^PIP_VERSION := //p' Makefile)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "pip==$pip_version"
"$work/venv/bin/pip" install -q ".[$extras]"
{
    echo "# Pinned constraints for $("$work/venv/bin/python" -c 'import sys; print("Python %d.%d" % sys.version_info[:2])')" \
         "with the extras [$extras]; regenerate with \`make lock\` (scripts/lock.sh)."
    "$work/venv/bin/pip" freeze --exclude nemojax
} > "$lock"
echo "wrote $lock ($(grep -vc '^#' "$lock") packages)"
