"""``streamfit serve``: the FastAPI prediction server (uvicorn) on the registry's champion versions."""

from __future__ import annotations

from pipeline.cli import setting_default


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve predictions over HTTP (TF Serving REST API, hot swap)",
        description="Serve the champion version of each model over HTTP. New champions "
        "(model-updates on Kafka, or the registry polled every "
        "registry_poll_s) are swapped in without dropping a request. "
        "OpenAPI docs at /docs.",
    )
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME",
        help=f"a registry model to serve; repeat for several (default: the model setting, {setting_default('model')})",
    )
    parser.add_argument("--host", dest="serve_host", help=f"address to bind (default {setting_default('serve_host')})")
    parser.add_argument("--port", dest="serve_port", type=int, help=f"port (default {setting_default('serve_port')})")
    parser.add_argument("--registry", dest="registry", help="registry root: a path or an fsspec URL")
    parser.add_argument(
        "--max-batch-size",
        dest="max_batch_size",
        type=int,
        help=f"rows per forward pass (default {setting_default('max_batch_size')})",
    )
    parser.add_argument(
        "--max-batch-wait-ms",
        dest="max_batch_wait_ms",
        type=float,
        help="longest a request waits for others to share its forward pass "
        f"(default {setting_default('max_batch_wait_ms')})",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request (off: /metrics counts them)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pipeline.broker import port_is_free
    from pipeline.cli import CommandError, settings_from
    from serving.app import create_app, run as serve

    settings = settings_from(args)
    if settings.serve_port and not port_is_free(settings.serve_host, settings.serve_port):
        raise CommandError(
            f"{settings.serve_host}:{settings.serve_port} is already in use; pass --port or set STREAMFIT_SERVE_PORT"
        )
    models = args.models or [settings.model]
    app = create_app(settings, models)
    base = f"http://{settings.serve_host}:{settings.serve_port}"
    print(
        f"serving {', '.join(models)} from {settings.registry_url} on {base} "
        f"(POST {base}/v1/models/{models[0]}:predict, docs at {base}/docs); "
        f"admin {'enabled' if settings.admin_token else 'disabled (set STREAMFIT_ADMIN_TOKEN)'}; Ctrl-C stops",
        flush=True,
    )
    serve(app, settings, access_log=args.access_log)
    return 0
