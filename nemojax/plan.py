"""Will a model fit? Parameter counts and per-device memory for a mesh, before renting machines.

    python -m nemojax.plan CONFIG [--mesh data=..,fsdp=..,tensor=..,expert=..] [--devices N]
        [--weights bf16|fp8|nvfp4-experts|nvfp4|release] [--batch B --seq-len T] [--prefill-chunk C] [--train]
        [--remat none|full|dots] [--grouped-matmul kernel|ragged-dot|cpu-tiled] [--device h100-80gb|h200|...]
        [--kv-cache-dtype fp8|bf16|fp32] [--context-parallel] [--request-tokens N] [--json] [--no-compile]

CONFIG is a configs/ name (tiny, nano, super, ultra), a configs/*.py file, a config.json or a
checkpoint directory (Hugging Face, a nemojax model directory, a training workdir or step directory).
Activation memory comes from ahead-of-time compiles on as many fake CPU devices as the mesh has (no
real memory is used). A mesh axis with more shards than the model can use (tensor beyond the heads,
expert beyond the experts, fsdp beyond the hidden size, data beyond the batch) is refused before any
device is simulated. A serving plan also reports the whole cache of one request of --request-tokens
tokens (default 1,048,576) with bf16 and with fp8 KV. See docs/planning.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from nemojax.cli.common import int_in, report_errors
from nemojax.config import INT32_MAX, KV_CACHE_DTYPES, resolve_model_config
from nemojax.errors import ConfigError
from nemojax.planning.layout import MAX_DEVICES, check_mesh_for_model, mesh_devices, mesh_text, use_fake_cpu_devices
from nemojax.planning.matmuls import GROUPED_MATMUL_CHOICES
from nemojax.planning.report import DEVICE_MEMORY, PlanRequest, format_plan, make_plan
from nemojax.planning.weights import WEIGHT_FORMATS
from nemojax.sharding import parse_mesh, resolve_mesh_shape

REMAT_CHOICES = ("none", "full", "dots")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nemojax.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="configs/ name, configs/*.py, config.json or checkpoint directory")
    p.add_argument("--mesh", default=None, help="axis sizes, e.g. data=1,fsdp=2,tensor=4,expert=1 "
                                                "(default: fsdp over all devices)")
    p.add_argument("--devices", type=int_in(1, MAX_DEVICES), default=None,
                   help="device count (default: the mesh's, else 8)")
    p.add_argument("--weights", default="bf16", choices=WEIGHT_FORMATS)
    p.add_argument("--batch", type=int_in(1), default=1, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int_in(1), default=4096, help="context length (cache size, or training length)")
    p.add_argument("--prefill-chunk", type=int_in(1), default=None, help="serving: tokens per prefill step "
                                                                   "(default min(seq-len, 1024))")
    p.add_argument("--train", action="store_true", help="plan a training step (AdamW) instead of serving")
    p.add_argument("--remat", default=None, choices=REMAT_CHOICES, help="override the config's remat policy")
    p.add_argument("--grouped-matmul", default="kernel", choices=GROUPED_MATMUL_CHOICES,
                   help="how the routed experts are compiled: a grouped GEMM kernel (default), XLA's ragged_dot "
                        "lowering, or the CPU path (docs/planning.md)")
    p.add_argument("--device", default="h200", choices=sorted(DEVICE_MEMORY), help="accelerator memory to check")
    p.add_argument("--kv-cache-dtype", default=None, choices=sorted(KV_CACHE_DTYPES),
                   help="serving: K/V storage of the attention caches (default: the compute dtype)")
    p.add_argument("--context-parallel", action="store_true",
                   help="serving: KV caches sharded along the sequence over the mesh axes the batch leaves unused")
    p.add_argument("--request-tokens", type=int_in(1), default=2**20,
                   help="serving: report the whole cache of one request this long (default 1,048,576)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--no-compile", action="store_true", help="skip the activation compiles (fast)")
    return p


def resolve_mesh(mesh: str | None, devices: int | None) -> dict[str, int]:
    """The mesh sizes; they must multiply to the device count when both are given."""
    if mesh is None:
        return parse_mesh(f"fsdp={devices or 8}")
    shape = parse_mesh(mesh)
    if -1 in shape.values():
        shape = resolve_mesh_shape(shape, devices or 8)
    if devices is not None and mesh_devices(shape) != devices:
        raise ConfigError(f"--mesh {mesh_text(shape)} uses {mesh_devices(shape)} devices, "
                          f"but --devices is {devices}: the axis sizes must multiply to the device count")
    return shape


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_errors(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    config = resolve_model_config(args.config)
    if args.remat is not None:
        config = config.replace(remat=args.remat)
    mesh_shape = resolve_mesh(args.mesh, args.devices)
    if args.batch * args.seq_len > INT32_MAX:
        raise ConfigError(f"--batch {args.batch} x --seq-len {args.seq_len} is more than {INT32_MAX} tokens")
    check_mesh_for_model(mesh_shape, config, args.batch, compile=not args.no_compile)
    request = PlanRequest(mesh_shape=mesh_shape, weights=args.weights, batch=args.batch, seq_len=args.seq_len,
                          prefill_chunk=args.prefill_chunk, train=args.train, device=args.device,
                          compile_activations=not args.no_compile, grouped_matmul=args.grouped_matmul,
                          kv_cache_dtype=args.kv_cache_dtype, request_tokens=args.request_tokens,
                          context_parallel=args.context_parallel)
    request.validate()  # everything is checked before a device is simulated
    use_fake_cpu_devices(1 if args.no_compile else mesh_devices(mesh_shape))
    plan = make_plan(config, request, name=args.config)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
