#!/usr/bin/env bash
# Print the path of a Python X.Y interpreter (`scripts/find_python.sh 3.12`), or say why none was found.
# Looks at `pythonX.Y` on PATH (a pyenv shim that cannot run is passed over), then at pyenv's versions.
set -uo pipefail
want="${1:?usage: find_python.sh X.Y}"
check='import sys; v = sys.version_info; print(sys.executable if f"{v.major}.{v.minor}" == sys.argv[1] else "")'

try() {  # the interpreter's own path when it runs and is version $want
    local found
    found="$("$@" -c "$check" "$want" 2>/dev/null)" && [ -n "$found" ] && echo "$found"
}

if command -v "python$want" >/dev/null && try "python$want"; then exit 0; fi
pyenv_root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
for dir in $(ls -d "$pyenv_root/versions/$want".* 2>/dev/null | sort -V -r); do
    if try "$dir/bin/python$want"; then exit 0; fi
done
echo "error: no Python $want found (not as python$want on PATH, nor under $pyenv_root/versions)." >&2
echo "Install Python $want, or name one: make ... PYTHON${want/./}=/path/to/python$want" >&2
exit 1
