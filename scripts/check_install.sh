#!/usr/bin/env bash
# The package as a user installs it, outside the checkout (run by `make check-install`):
#   scripts/check_install.sh VENV
# builds the wheel `pip install .` builds, checks that it holds the packaged configs, installs it into
# VENV (its dependencies are already there), then runs `nemojax-plan nano` and a 5-step
# `nemojax-train --config tiny` from an empty directory and checks what they wrote.
set -euo pipefail
venv="$(cd "$1" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
unset PYTHONPATH

"$venv/bin/pip" wheel -q --no-deps -w "$work/dist" .
wheel=("$work"/dist/nemojax-*.whl)
"$venv/bin/python" - "${wheel[0]}" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
want = [f"nemojax/configs/{n}.py" for n in ("tiny", "nano", "super", "ultra")] + ["nemojax/cli/train.py"]
missing = [n for n in want if n not in names]
assert not missing, f"{sys.argv[1]} lacks {missing}"
print(f"wheel: {len(names)} files, packaged configs present")
PY
"$venv/bin/pip" install -q --no-deps --force-reinstall "${wheel[0]}"

cd "$work"
where="$("$venv/bin/python" -c 'import nemojax, os; print(os.path.dirname(nemojax.__file__))')"
case "$where" in */site-packages/nemojax) ;; *) echo "error: nemojax imported from $where, not site-packages" >&2; exit 1 ;; esac

"$venv/bin/nemojax-plan" nano > plan.txt
grep -q "^verdict: FITS" plan.txt || { echo "error: nemojax-plan nano printed no verdict:" >&2; cat plan.txt >&2; exit 1; }

"$venv/bin/nemojax-train" --config tiny --workdir "$work/W" --config.num_steps=5 --config.seq_len=32 \
    --config.batch_size=2 --config.eval_every=5 --config.eval_batches=1 --config.checkpoint_every=5 > train.txt 2>&1 \
    || { cat train.txt >&2; exit 1; }
"$venv/bin/python" - "$work/W" <<'PY'
import json, os, sys
records = [json.loads(line) for line in open(os.path.join(sys.argv[1], "metrics.jsonl"))]
assert records and records[-1]["step"] == 5 and records[-1].get("eval_loss") is not None, records[-1:]
print(f"nemojax-train: 5 steps, held-out loss {records[-1]['eval_loss']:.3f}")
PY
echo "check-install: ok (nemojax from $where)"
