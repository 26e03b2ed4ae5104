"""Generate completions for a file of prompts.

    python serve.py --checkpoint PATH --prompts IN.jsonl --output OUT.jsonl [--max-new-tokens N]
        [--temperature T] [--top-k K] [--top-p P] [--min-p P] [--seed S] [--stop STR ...] [--ignore-eos]
        [--batch-size B] [--speculative mtp --num-draft-tokens K] [--reasoning on|off|medium|low]
        [--thinking-budget N] [--stats STATS.json] [--mesh data=..,fsdp=..,tensor=..,expert=..]

PATH is a Hugging Face directory (published layout), a nemojax model directory, or a train.py
workdir (latest checkpoint and its tokenizer). Input lines: {"prompt": ...}, {"messages": [...]}
or {"input_ids": [...]}, each optionally overriding max_new_tokens, temperature, top_k, top_p,
min_p, seed, stop, ignore_eos, reasoning, thinking_budget. Output: one line per input line, in
order: {"output_ids", "text", "finish_reason"}, or {"error"} for a line that cannot be served.
An unreadable checkpoint or prompt file exits with status 2.

`--mesh` shards the model and the caches over the devices (sizes multiply to the device count, one
may be -1 for the rest; the default fsdp=-1 uses every device of every process). Several hosts: start
one process per host with the same arguments plus `--coordinator-address/--num-processes/--process-id`
(or let a cluster such as SLURM be detected); process 0 writes the output.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    from nemojax.chat import REASONING_MODES
    from nemojax.distributed import add_distributed_flags

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompts", required=True, help="JSONL file of prompts")
    p.add_argument("--output", required=True, help="JSONL file of completions (one line per prompt line)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop strings (need a tokenizer)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence ids")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill step")
    p.add_argument("--speculative", choices=["mtp"], default=None)
    p.add_argument("--num-draft-tokens", type=int, default=3)
    p.add_argument("--reasoning", choices=REASONING_MODES, default="on")
    p.add_argument("--thinking-budget", type=int, default=None, help="force </think> after N thinking tokens")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--stats", default=None, help="write throughput statistics (JSON) here")
    p.add_argument("--mesh", default="fsdp=-1",
                   help="device mesh, e.g. tensor=4,expert=2; -1 takes the remaining devices (default: fsdp=-1)")
    p.add_argument("--no-progress", action="store_true")
    add_distributed_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from nemojax.errors import NemojaxError

    try:
        return run(args)
    except NemojaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    import jax

    from nemojax.distributed import initialize
    from nemojax.errors import ConfigError, DataError
    from nemojax.generate import Defaults, Engine
    from nemojax.generate.loading import end_of_turn_ids, load_checkpoint, load_encoder
    from nemojax.generate.serving import serve
    from nemojax.generate.stats import stats_record
    from nemojax.sharding import make_mesh, parse_mesh, resolve_mesh_shape

    if args.batch_size < 1 or args.max_new_tokens < 1 or args.prefill_chunk < 1:
        raise ConfigError("--batch-size, --max-new-tokens and --prefill-chunk must be positive")
    if args.speculative and args.num_draft_tokens < 1:
        raise ConfigError("--num-draft-tokens must be at least 1")
    try:
        with open(args.prompts) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except OSError as e:
        raise DataError(f"cannot read prompts {args.prompts}: {e}") from e
    mesh_shape = parse_mesh(args.mesh)
    initialize(args)
    mesh_shape = resolve_mesh_shape(mesh_shape, jax.device_count())
    single = math.prod(mesh_shape.values()) == 1 and jax.process_count() == 1
    mesh = None if single else make_mesh(**mesh_shape)
    model, variables = load_checkpoint(args.checkpoint, args.dtype, mesh)
    encoder, tokenizer = load_encoder(args.checkpoint)
    engine = Engine(model, variables, eos_ids=model.config.eos_token_id + end_of_turn_ids(tokenizer),
                    think_end_id=encoder.think_end_id, prefill_chunk=args.prefill_chunk,
                    num_draft_tokens=args.num_draft_tokens if args.speculative else 0, mesh=mesh)
    defaults = Defaults(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop),
                        ignore_eos=args.ignore_eos, thinking_budget=args.thinking_budget, reasoning=args.reasoning)
    progress = not args.no_progress and jax.process_index() == 0
    records = serve(lines, engine, encoder, tokenizer, defaults, args.batch_size, progress=progress)
    if jax.process_index() != 0:  # several hosts run the same program; one writes
        return 0
    with open(args.output, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(stats_record(engine.stats, engine.k), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
