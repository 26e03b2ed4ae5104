"""`python serve.py --checkpoint PATH --port 8000 [--host 127.0.0.1]`: load, start the worker, serve until
interrupted (Ctrl-C or SIGTERM end it cleanly, exit status 0)."""

from __future__ import annotations

import argparse
import os
import socket

from nemojax.errors import ConfigError

TOP_LOGPROBS = 20


def check_server_inputs(args: argparse.Namespace) -> None:
    """What can be checked before loading: the address is free, the flags fit together."""
    import jax

    if args.output is not None or args.resume:
        raise ConfigError("--output and --resume go with --prompts (without --prompts serve.py runs the HTTP server)")
    if jax.process_count() > 1 or args.coordinator_address:
        raise ConfigError("the HTTP server runs on one process; several hosts serve a --prompts file")
    try:
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except OSError as e:
        raise ConfigError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e})") from e


def run_server(args: argparse.Namespace, defaults, engine_options: dict) -> int:
    """`engine_options`: the Engine settings from the flags (`nemojax.cli.serve.engine_options`)."""
    import uvicorn

    from nemojax.generate import Engine
    from nemojax.generate.loading import end_of_turn_ids, load_checkpoint, load_encoder
    from nemojax.generate.serving import StopStrings
    from nemojax.server.app import create_app
    from nemojax.server.service import GenerationService
    from nemojax.sharding import make_mesh, parse_mesh

    check_server_inputs(args)
    encoder, tokenizer = load_encoder(args.checkpoint)
    mesh = None if args.mesh is None else make_mesh(**parse_mesh(args.mesh))
    model, variables = load_checkpoint(args.checkpoint, args.dtype, mesh, args.kv_cache_dtype)
    context = model.config.max_position_embeddings
    if args.max_model_len is not None:
        if args.max_model_len > context:
            raise ConfigError(f"--max-model-len {args.max_model_len} is beyond the model's context of {context}")
        context = args.max_model_len
    engine = Engine(model, variables, eos_ids=model.config.eos_token_id + end_of_turn_ids(tokenizer),
                    think_end_id=encoder.think_end_id, top_logprobs=TOP_LOGPROBS, mesh=mesh, **engine_options)
    del variables  # the engine holds its own placement (on CPU devices one shared copy): free the loaded one

    def stop_finder(request):
        finder = StopStrings(request.stop, tokenizer)
        return finder.stop_check if finder.active else None

    service = GenerationService(engine, args.batch_size, context, args.max_waiting, args.segment_steps, stop_finder)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
    app = create_app(service, encoder, tokenizer, defaults, name)
    service.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        service.stop()
    return 0
