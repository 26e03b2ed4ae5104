"""Convert checkpoints between the published Hugging Face layout and nemojax model directories (Orbax).

    python -m nemojax.convert hf-to-orbax SRC DST [--dtype keep|bfloat16|float32] [--overwrite]
    python -m nemojax.convert orbax-to-hf SRC DST [--max-shard-size 5GB] [--dtype ...] [--overwrite]

hf-to-orbax: SRC is a Hugging Face checkpoint directory (config.json, model.safetensors or shards with
model.safetensors.index.json; BF16, FP8 or NVFP4 ModelOpt), DST a new nemojax model directory that
load_pretrained, serve.py --checkpoint and train.py --init-from read: config.json, the Orbax tree under
variables/, SRC's config.json as hf_config.json, SRC's other files (tokenizer, chat template) and
conversion.json (source, quantization, nemojax version). With --dtype keep (the default) quantized
tensors stay packed and every tensor keeps its bytes; --dtype bfloat16|float32 casts float tensors and
dequantises NVFP4 / FP8 checkpoints into a float model of that dtype (no scales, no quantization config;
conversion.json names what was dequantised).

orbax-to-hf: SRC is a nemojax model directory, a training workdir (its latest checkpoint) or a step
directory; DST gets safetensors shards of at most --max-shard-size (model.safetensors.index.json when
more than one), config.json and the tokenizer files: the published layout (checked with transformers).
--dtype bfloat16|float32 casts float tensors and writes a quantized model as float tensors of that dtype.

Tensors are streamed (memory-mapped reads, one chunk or row block in memory at a time). Output is
written as DST.partial-<pid> and renamed to DST when complete. Bad input (unreadable or truncated
shard, shard missing, unknown tensor, shape disagreeing with config.json, existing DST without
--overwrite) exits with status 2 and a message naming the file and tensor.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nemojax.checkpoint.hf_shards import DEFAULT_MAX_SHARD_SIZE, parse_size
from nemojax.cli.common import report_errors

DTYPES = ("keep", "bfloat16", "float32")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemojax-convert", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{hf-to-orbax,orbax-to-hf}")
    to_orbax = commands.add_parser("hf-to-orbax", help="Hugging Face directory -> nemojax model directory (Orbax)")
    to_hf = commands.add_parser("orbax-to-hf", help="nemojax model directory / training workdir -> Hugging Face")
    to_orbax.add_argument("src", help="Hugging Face checkpoint directory")
    to_hf.add_argument("src", help="nemojax model directory, training workdir or step directory")
    for sub in (to_orbax, to_hf):
        sub.add_argument("dst", help="output directory (must not exist, unless --overwrite)")
        sub.add_argument("--dtype", choices=DTYPES, default="keep",
                         help="keep: every tensor as stored, quantized ones packed (default); bfloat16 / float32: "
                              "float tensors cast (router weights and biases excepted) and NVFP4 / FP8 weights "
                              "dequantised, giving a float (non-quantized) checkpoint")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing DST (once complete)")
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
    to_hf.add_argument("--max-shard-size", type=_size, default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                       help="largest safetensors file, e.g. 5GB (10^9 bytes), 500MB, 2GiB (default: 5GB)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        from nemojax.checkpoint.convert import hf_to_orbax, orbax_to_hf

        dtype = None if args.dtype == "keep" else args.dtype
        if args.command == "hf-to-orbax":
            summary = hf_to_orbax(args.src, args.dst, dtype, args.overwrite, progress=not args.quiet)
        else:
            summary = orbax_to_hf(args.src, args.dst, args.max_shard_size, dtype, args.overwrite,
                                  progress=not args.quiet)
        rate = summary["bytes"] / max(summary["seconds"], 1e-9) / 1e6
        print(f"{args.command}: {args.dst}: {summary['tensors']} tensors, {summary['bytes'] / 1e6:.1f} MB in "
              f"{summary['seconds']:.1f} s ({rate:.0f} MB/s)")
        return 0

    return report_errors(run)


if __name__ == "__main__":
    sys.exit(main())
