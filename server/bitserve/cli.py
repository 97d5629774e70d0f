"""`bitserve` console script: args -> settings -> app."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from bitserve.errors import ConfigError
from bitserve.settings import build_settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bitserve", description="Serve quantized Hugging Face checkpoints over gRPC."
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the gRPC server")
    s.add_argument("--config", "-c", help="YAML config file (default: the embedded demo config)")
    s.add_argument("--host", help="override server.host")
    s.add_argument("--port", type=int, help="override server.port")
    s.add_argument("--metrics-port", type=int, help="override server.metrics_port (-1 disables)")
    s.add_argument(
        "--openai-port", type=int, help="override server.openai_port (OpenAI-compatible HTTP; 0: a free port)"
    )
    s.add_argument("--log-level", help="override server.log_level")
    s.add_argument("--metrics-host", help="override server.metrics_host (default: --host)")
    s.add_argument("--tls-cert", help="override server.tls_cert_file (PEM; serve TLS)")
    s.add_argument("--tls-key", help="override server.tls_key_file (PEM)")
    s.add_argument("--tls-client-ca", help="override server.tls_client_ca_file (PEM; mutual TLS)")
    s.add_argument("--auth-tokens-file", help="override server.auth_tokens_file (bearer tokens, one a line)")
    c = sub.add_parser("check-config", help="validate a config file and exit")
    c.add_argument("--config", "-c", required=True)
    h = sub.add_parser("health", help="query grpc.health.v1 (exit 0 when SERVING); for container probes")
    h.add_argument("--target", default="127.0.0.1:50051")
    h.add_argument("--service", default="", help="model name, or empty for the whole server")
    h.add_argument("--timeout", type=float, default=5.0)
    h.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --root-certs)")
    h.add_argument("--root-certs", help="PEM file of roots to trust (implies --tls)")
    h.add_argument("--token-env", help="environment variable holding a bearer token (if health needs one)")
    return p


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from bitserve_client.security import channel

    token = os.environ.get(args.token_env, "") if args.token_env else ""
    with channel(args.target, [], tls=args.tls, root_certificates=args.root_certs, token=token or None) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"{args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    print(status)
    return 0 if r.status == health_pb2.HealthCheckResponse.SERVING else 1


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    server = {
        k: v
        for k, v in {
            "host": getattr(args, "host", None),
            "port": getattr(args, "port", None),
            "metrics_port": getattr(args, "metrics_port", None),
            "openai_port": getattr(args, "openai_port", None),
            "log_level": getattr(args, "log_level", None),
            "metrics_host": getattr(args, "metrics_host", None),
            "tls_cert_file": getattr(args, "tls_cert", None),
            "tls_key_file": getattr(args, "tls_key", None),
            "tls_client_ca_file": getattr(args, "tls_client_ca", None),
            "auth_tokens_file": getattr(args, "auth_tokens_file", None),
        }.items()
        if v is not None
    }
    return {"server": server} if server else {}


def _default_config() -> Any:
    """The embedded default config, after checking that its model packages are installed."""
    from bitserve.models import demo  # prepares the real-weight demo models (see README)

    return demo.default_config()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "health":
        return _health(args)

    try:
        if args.command == "serve" and not args.config and not os.environ.get("BITSERVE_CONFIG"):
            settings = build_settings(config_data=_default_config(), overrides=_overrides(args))
        else:
            path = args.config or os.environ["BITSERVE_CONFIG"]
            settings = build_settings(path, overrides=_overrides(args))
    except ConfigError as e:
        print(f"bitserve: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        from bitserve.api.security import load_token_tenants

        try:  # the token file/env too: a token naming an undefined tenant is a config error
            load_token_tenants(settings.server)
        except ConfigError as e:
            print(f"bitserve: config error: {e}", file=sys.stderr)
            return 2
        print(f"config OK: {len(settings.models)} models")
        return 0
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from bitserve.ipc.client import EngineGaveUp

    try:
        asyncio.run(_serve(settings))
    except ConfigError as e:
        print(f"bitserve: config error: {e}", file=sys.stderr)
        return 2
    except EngineGaveUp as e:  # exit_on_engine_failure: let the orchestrator replace us
        print(f"bitserve: {e}", file=sys.stderr)
        return 3
    return 0


async def _serve(settings) -> None:
    from bitserve.api.server import Server

    server = Server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start(wait_until_loaded=False)
    try:
        await server.serve_until(stop)
    finally:
        logging.getLogger(__name__).info("shutting down (grace %.1fs)", settings.server.grace_period_s)
        await server.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
