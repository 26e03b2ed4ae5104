"""Train or fine-tune a Nemotron-H model (`nemojax-train`, or `python train.py` in a checkout).

    nemojax-train --config tiny --workdir runs/tiny [--config.num_steps=50 ...]
    nemojax-train --config configs/tiny.py --workdir runs/ft --init-from CHECKPOINT

--config is a packaged config name (tiny, nano, super, ultra) or an ml-collections config file.
A config with a `posttrain` block (mopd_tiny, grpo_tiny) runs on-policy post-training instead
(MOPD or GRPO, `nemojax.posttrain`), with the same workdir, checkpoints, resume and signals.

Any config field is overridable as --config.field=value (nested: --config.optimizer.learning_rate=1e-3);
an unknown field is an error. Rerunning with the same --workdir resumes from its newest checkpoint that
restores (an unreadable one is reported by step and set aside). SIGTERM or Ctrl-C saves a checkpoint at the
next step and exits with status 128 + the signal number (143, 130); rerun to continue. Bad input exits
with status 2 before any work, a run stopped by repeated non-finite steps with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from nemojax.cli.common import int_in, report_errors
from nemojax.distributed import add_distributed_flags, initialize
from nemojax.posttrain.loop import is_posttrain_config, train_onpolicy
from nemojax.train.loop import TrainingDiverged, train
from nemojax.train.run_config import load_run_config
from nemojax.train.stopping import TrainingStopped


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="packaged config name (tiny, nano, super, ultra) or ml-collections config file")
    parser.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, tokenizer")
    parser.add_argument("--init-from", default=None,
                        help="fine-tune from a Hugging Face checkpoint, a nemojax model directory or a workdir")
    add_distributed_flags(parser)
    parser.add_argument("--compilation-cache", default=os.path.expanduser("~/.cache/nemojax/jax"),
                        help="persistent XLA compilation cache, so restarts skip compiling ('' disables)")
    parser.add_argument("--stop-at", type=int_in(1), default=None,
                        help="end this session after STEP with a checkpoint (rerun to continue)")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    return report_errors(lambda: run(args, overrides))


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = load_run_config(args.config, overrides)
    initialize(args)
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    try:
        if is_posttrain_config(cfg):  # MOPD / GRPO: the on-policy loop (nemojax.posttrain)
            last = train_onpolicy(cfg, args.workdir, init_from=args.init_from, stop_at=args.stop_at)
        else:
            last = train(cfg, args.workdir, init_from=args.init_from, stop_at=args.stop_at)
    except TrainingDiverged as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    except TrainingStopped as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    if not last:
        print(f"{args.workdir} has already reached step {cfg.num_steps}; nothing to train")
        return 0
    summary = ", ".join(f"{k}={last[k]:.4f}" for k in ("loss", "eval_loss") if last.get(k) is not None)
    print(f"step {last['step']}: {summary}; workdir {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
