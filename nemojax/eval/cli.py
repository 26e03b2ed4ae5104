"""`python -m nemojax.eval needle` (or `nemojax-eval needle`): long-context recall of a checkpoint.

    nemojax-eval needle --checkpoint DIR --lengths 1k,4k,16k [--depths 0,0.25,0.5,0.75,1] [--samples N]
        [--seed S] [--batch-size B] [--prefill-chunk C] [--dtype D] [--output results.json]

For every length (prompt tokens; `k` = 1024, `m` = 1048576) and depth, `--samples` prompts with a needle
"The special magic number for KEY is VALUE." in corpus filler (`nemojax.eval.haystack`) are answered
greedily through the serving engine and scored by exact match of the first number answered. Prints
recall per length and depth; `--output` writes the table and every case as JSON.

Bad input (lengths, depths, a missing checkpoint or tokenizer, a length beyond the model's context, an
unwritable output) ends with `error: MESSAGE` and exit status 2 before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from nemojax.cli.common import int_in, report_errors
from nemojax.errors import CheckpointError, ConfigError, NemojaxError, OutputError

DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"
ANSWER_TOKENS = 16  # greedy tokens generated per answer (a 7-digit value and some slack)
_SCALES = {"k": 1 << 10, "m": 1 << 20}


def parse_lengths(text: str) -> list[int]:
    """'1k,4k,300' -> [1024, 4096, 300] (sorted, without repeats); ConfigError naming the bad entry."""
    lengths = set()
    for item in text.split(","):
        entry = item.strip().lower()
        scale = _SCALES.get(entry[-1:], 1)
        digits = entry[:-1] if scale > 1 else entry
        if not digits.isdigit():
            raise ConfigError(f"--lengths: {item.strip()!r} is not a length (expected e.g. 512, 4k, 1m)")
        if int(digits) * scale < 1:
            raise ConfigError(f"--lengths: {item.strip()!r} must be at least 1 token")
        lengths.add(int(digits) * scale)
    return sorted(lengths)


def parse_depths(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0] (sorted, without repeats); ConfigError unless each is in [0, 1]."""
    depths = set()
    for item in text.split(","):
        try:
            depth = float(item)
        except ValueError:
            raise ConfigError(f"--depths: {item.strip()!r} is not a number in [0, 1]") from None
        if not 0.0 <= depth <= 1.0:
            raise ConfigError(f"--depths: {item.strip()!r} is outside [0, 1]")
        depths.add(depth)
    return sorted(depths)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nemojax-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    needle = commands.add_parser("needle", help="needle-in-a-haystack recall per context length")
    needle.add_argument("--checkpoint", required=True, help="HF directory, nemojax model directory or workdir")
    needle.add_argument("--lengths", required=True, help="prompt lengths in tokens, e.g. 1k,4k,16k")
    needle.add_argument("--depths", default=DEFAULT_DEPTHS, help="needle depths in [0, 1] (0: start of the haystack)")
    needle.add_argument("--samples", type=int_in(1, 10_000), default=1, help="prompts per (length, depth)")
    needle.add_argument("--seed", type=int_in(0), default=0, help="chooses the filler, keys and values")
    needle.add_argument("--batch-size", type=int_in(1, 4096), default=4, help="prompts served at once")
    needle.add_argument("--prefill-chunk", type=int_in(16, 1 << 20), default=256, help="prompt tokens per prefill step")
    needle.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    needle.add_argument("--output", default=None, help="write the recall table and every case to this JSON file")
    return parser.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> tuple[list[int], list[float], int]:
    """(lengths, depths, the model's context) after every check that needs no weights."""
    from nemojax.config import FLOAT_DTYPES, dtype_name, resolve_model_config
    from nemojax.generate.jsonl import check_writable
    from nemojax.generate.loading import tokenizer_dir

    lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)
    if args.dtype is not None:
        try:
            name = dtype_name(args.dtype)
        except ConfigError:
            name = None
        if name not in FLOAT_DTYPES:
            raise ConfigError(f"--dtype {args.dtype}: expected one of {FLOAT_DTYPES}")
    if args.output is not None:
        check_writable(args.output, "--output")
    if not os.path.isdir(args.checkpoint):
        raise CheckpointError(f"--checkpoint {args.checkpoint}: no such checkpoint directory")
    if tokenizer_dir(args.checkpoint) is None:
        raise ConfigError(f"--checkpoint {args.checkpoint} has no tokenizer.json; the haystack is text and needs one")
    try:
        context = resolve_model_config(args.checkpoint).max_position_embeddings
    except NemojaxError:
        raise
    except Exception as e:  # a reader failure (corrupt config.json, ...) is a bad checkpoint
        raise CheckpointError(f"--checkpoint {args.checkpoint}: cannot read its config ({type(e).__name__}: {e})"
                              ) from e
    too_long = [n for n in lengths if n + ANSWER_TOKENS > context]
    if too_long:
        raise ConfigError(f"--lengths: {too_long[0]} tokens (+ {ANSWER_TOKENS} answer tokens) exceed the model's "
                          f"context of {context} (max_position_embeddings); the longest allowed is "
                          f"{context - ANSWER_TOKENS}")
    return lengths, depths, context


def run(args: argparse.Namespace) -> int:
    from nemojax.eval.haystack import make_cases
    from nemojax.eval.needle import engine_answers, format_table, run_needle, summarize
    from nemojax.generate import Engine
    from nemojax.generate.loading import end_of_turn_ids, load_checkpoint, load_encoder

    lengths, depths, _ = check_inputs(args)
    _, tokenizer = load_encoder(args.checkpoint)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    prefix = tokenizer.encode("", add_special_tokens=True).ids  # what the tokenizer adds to every text (BOS)
    try:
        cases = make_cases(encode, prefix, lengths, depths, args.samples, args.seed)
    except ConfigError as e:
        raise ConfigError(f"--lengths: {e}") from e
    model, variables = load_checkpoint(args.checkpoint, args.dtype)
    engine = Engine(model, variables, eos_ids=model.config.eos_token_id + end_of_turn_ids(tokenizer),
                    prefill_chunk=args.prefill_chunk)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    outcomes = run_needle(cases, engine_answers(engine, decode, ANSWER_TOKENS, args.batch_size))
    summary = summarize(outcomes)
    print(format_table(summary))
    if args.output is not None:
        record = {"checkpoint": args.checkpoint, "lengths": lengths, "depths": depths, "samples": args.samples,
                  "seed": args.seed, **summary}
        try:
            with open(args.output, "w") as f:
                json.dump(record, f, indent=2)
        except OSError as e:
            raise OutputError(f"--output {args.output}: cannot write ({e.strerror or e})") from e
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return report_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
