"""``streamfit console``: the web console of a running pipeline and its registry."""

from __future__ import annotations

from pipeline.cli import setting_default


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "console",
        help="serve the web console: pipeline, learning, models, dead letters, try it",
        description="Serve the web console of the pipeline these settings describe: live rates, lag and dead "
        "letters from Kafka, prequential accuracy and the gate's verdicts from training-metrics, the registry's "
        "versions and lineage, and a prediction form. It writes nothing, except promote, rollback and pin, "
        "which go to serving's admin routes with the admin token entered in the page. `streamfit up` runs it too.",
    )
    parser.add_argument(
        "--host", dest="console_host", help=f"address to bind (default {setting_default('console_host')})"
    )
    parser.add_argument(
        "--port", dest="console_port", type=int, help=f"port (default {setting_default('console_port')})"
    )
    parser.add_argument(
        "--model", dest="model", help="the model its Learning page follows (default: the model setting)"
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from console.app import ConsoleServer, create_app, listening_socket
    from pipeline.cli import CommandError, run_until_stopped, settings_from
    from pipeline.kafka import bootstrap

    settings = settings_from(args)
    sock = listening_socket(settings.console_host, settings.console_port)
    if settings.console_port and sock.getsockname()[1] != settings.console_port:
        sock.close()
        raise CommandError(
            f"{settings.console_host}:{settings.console_port} is already in use; "
            "pass --port or set STREAMFIT_CONSOLE_PORT"
        )
    server = ConsoleServer(create_app(settings, lambda: bootstrap(settings)), sock).start()
    print(f"console on {server.url} (serving {settings.serve_host}:{settings.serve_port}); Ctrl-C stops", flush=True)
    run_until_stopped(server.thread.is_alive)
    server.stop()
    return 0
