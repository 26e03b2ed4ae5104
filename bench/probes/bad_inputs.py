"""Bad inputs, tried as a new user would, against every CLI and the public loading API; counts per outcome.

    PYTHONPATH=. python bench/probes/bad_inputs.py [--label after] [--only serve,line,train,plan,load]

Each probe states what should happen: a bad input is refused (exit status 2, a message naming the
input, no traceback, before any work is lost), a valid input is served, and work already done is kept.
The outcome is classed as one of: refused cleanly, served (valid input handled), traceback, OOM,
silently wrong, valid refused, lost work, refused without naming the input, timeout. serve.py,
train.py and load_pretrained run in this process (their `main(argv)`); the planner, and probes that
could exhaust memory, run in subprocesses under a 6 GB address-space limit. Writes
bench/results/bad_inputs_<label>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "nemojax-probe-xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

import plan_load_probes  # noqa: E402, F401  (each module registers its probes)
import serve_probes  # noqa: E402, F401
import train_probes  # noqa: E402, F401
from fixtures import REPO, Fixtures  # noqa: E402
from runner import PROBES, count_generate_calls  # noqa: E402

GROUPS = ("serve", "line", "train", "plan", "load")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="after")
    parser.add_argument("--only", default="", help="comma-separated groups: serve,line,train,plan,load")
    parser.add_argument("--match", default="", help="run only probes whose name contains one of these ('|'-separated)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="instead of running, merge result files (a later file's probe replaces an earlier "
                             "one; probes no longer in the list are left out)")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = parser.parse_args()
    if args.merge:
        merged: dict[tuple[str, str], dict] = {}
        for path in args.merge:
            with open(path) as f:
                merged.update({(r["group"], r["probe"]): r for r in json.load(f)["results"]})
        current = {(p.group, p.name) for p in PROBES}  # probes since renamed or dropped are left out
        write_results([r for key, r in merged.items() if key in current], args.label, None, args.out, "")
        return 0
    groups = set(filter(None, args.only.split(",")))
    patterns = args.match.split("|")
    chosen = sorted((p for p in PROBES if (not groups or p.group in groups) and any(m in p.name for m in patterns)),
                    key=lambda p: GROUPS.index(p.group))
    count_generate_calls()
    started = time.time()
    with tempfile.TemporaryDirectory() as root:
        fx = Fixtures(root)
        results = []
        for p in chosen:
            begin = time.time()
            try:
                outcome, detail = p.run(fx)
            except Exception as e:  # noqa: BLE001 - a broken probe is reported, not fatal
                outcome, detail = "probe failed", f"{type(e).__name__}: {e}"
            results.append({"group": p.group, "probe": p.name, "outcome": outcome, "detail": detail,
                            "seconds": round(time.time() - begin, 1)})
            print(f"{p.group:6} {outcome:26} {p.name}  | {detail[:110]}", flush=True)
    suffix = "" if not (groups or args.match) else "_partial"
    write_results(results, args.label, round(time.time() - started), args.out, suffix)
    return 0


def write_results(results: list[dict], label: str, seconds: int | None, out: str, suffix: str) -> None:
    """bad_inputs_<label><suffix>.json and .md: counts per outcome, then every probe."""
    counts = Counter(r["outcome"] for r in results)
    summary = {"label": label, "probes": len(results), "counts": dict(counts.most_common()), "seconds": seconds,
               "results": results}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"bad_inputs_{label}{suffix}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"# Bad-input probes ({label}): {len(results)} probes", "",
             "Made by `bench/probes/bad_inputs.py` (see its docstring for the outcome classes).", "",
             "| outcome | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.most_common()]
    lines += ["", "| group | probe | outcome | detail |", "|---|---|---|---|"]
    lines += [f"| {r['group']} | {r['probe']} | {r['outcome']} | {r['detail'][:100].replace('|', '/')} |"
              for r in results]
    with open(os.path.join(out, f"bad_inputs_{label}{suffix}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(json.dumps(summary["counts"]))


if __name__ == "__main__":
    sys.exit(main())
