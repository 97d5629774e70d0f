"""Channel set-up shared by `Client` and `AsyncClient`: targets, retries and load balancing.

`target` is one address (`"host:port"`), a gRPC target URI (`"dns:///bitserve.internal:50051"`,
`"ipv4:10.0.0.1:50051,10.0.0.2:50051"`), or a list of `"host:port"` addresses, which becomes an
`ipv4:`/`ipv6:` target (host names are resolved once, here). gRPC balances the calls over every
address with `round_robin`.

The default service config retries a call that fails with UNAVAILABLE (a server stopping,
restarting or not reachable yet) up to 4 attempts with jittered exponential backoff (0.1 s, then
x2 up to 2 s). gRPC never retries a call once response data has arrived, so a stream is never
replayed after its first message. Pass `service_config=` (a dict in gRPC's service config JSON
shape) to replace it; `{}` turns retries and balancing off.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from typing import Any

SERVICE = "bitserve.v1.Inference"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

DEFAULT_SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


def _split(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} must be host:port (IPv6 as [addr]:port)")
    return host.strip("[]"), port


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        ips = [ipaddress.ip_address(i[4][0]) for i in infos]
        # IPv4 first: servers bound to 0.0.0.0 (the default) do not listen on ::1.
        return next((ip for ip in ips if ip.version == 4), ips[0])


def target_of(target: str | Sequence[str]) -> str:
    """One gRPC target for an address, a target URI, or a list of host:port addresses."""
    if isinstance(target, str):
        return target
    addresses = list(target)
    if not addresses:
        raise ValueError("target: at least one address is required")
    resolved = [(_ip(host), port) for host, port in map(_split, addresses)]
    versions = {ip.version for ip, _ in resolved}
    if len(versions) > 1:
        raise ValueError(f"target: cannot mix IPv4 and IPv6 addresses in one channel: {addresses}")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in resolved)
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in resolved)


def options(service_config: dict[str, Any] | None) -> list[tuple[str, Any]]:
    config = DEFAULT_SERVICE_CONFIG if service_config is None else service_config
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(config)),
    ]
