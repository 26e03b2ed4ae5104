"""`make demo`: train the tiny Nemotron-H on the Python standard library's source (a few minutes on
two CPU cores), then let serve.py complete a few code prompts from the trained workdir.

    python demo.py [--workdir runs/demo] [--steps N]

Rerunning with the same workdir resumes (or, when finished, skips straight to generation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.abspath(__file__))
PROMPTS = [
    "import os\nimport sys\n\n\ndef main(",
    "class Error(Exception):\n    \"\"\"",
    "    def __init__(self, name",
    "        for i in range(",
    "if __name__ == \"__main__\":\n",
]


def run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def held_out_loss(workdir: str) -> float | None:
    """The last held-out loss recorded in the workdir's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [json.loads(line).get("eval_loss") for line in f]
    evals = [e for e in evals if e is not None]
    return evals[-1] if evals else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "demo"))
    parser.add_argument("--steps", type=int, default=400, help="training steps (0.4-1 s each on 2 CPU cores)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (which loops quickly here)")
    args = parser.parse_args()

    run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", args.workdir,
         f"--config.num_steps={args.steps}"])
    loss = held_out_loss(args.workdir)
    print(f"\nheld-out loss after {args.steps} steps: {loss:.3f} nats/token; "
          f"loss curve: {os.path.join(args.workdir, 'loss_curve.png')}\n")

    with tempfile.TemporaryDirectory() as tmp:
        prompts, output = os.path.join(tmp, "prompts.jsonl"), os.path.join(tmp, "completions.jsonl")
        with open(prompts, "w") as f:
            f.writelines(json.dumps({"prompt": p}) + "\n" for p in PROMPTS)
        run([sys.executable, "serve.py", "--checkpoint", args.workdir, "--prompts", prompts, "--output", output,
             "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature), "--top-k", "40",
             "--no-progress"])
        with open(output) as f:
            completions = [json.loads(line) for line in f]
    for prompt, completion in zip(PROMPTS, completions, strict=True):
        print("=" * 72)
        print(prompt + "\033[1m" + completion.get("text", completion.get("error", "")) + "\033[0m")
    print("=" * 72)
    return 0


if __name__ == "__main__":
    sys.exit(main())
