"""Client channels between services: a default deadline on every call, retries only on UNAVAILABLE.

Both come from the gRPC service config, so they hold for every stub on the channel without per-call code:
``timeout`` is the deadline a call gets when the caller sets none, and the retry policy retries only
``UNAVAILABLE`` (never ``DEADLINE_EXCEEDED`` or ``CANCELLED``). Targets may be ``host:port``, a comma-separated
list (``ipv4:127.0.0.1:50054,127.0.0.1:50064``) or ``dns:///name:port``; ``round_robin`` spreads calls over every
address the resolver returns (client-side load balancing over a headless Service).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import grpc


def service_config(*, timeout_s: float, max_attempts: int = 3, round_robin: bool = True) -> str:
    method: dict[str, object] = {"name": [{}], "timeout": f"{timeout_s:.3f}s"}
    if max_attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.05s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    config: dict[str, object] = {"methodConfig": [method]}
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    return json.dumps(config)


def normalize_target(target: str) -> str:
    """``a:1,b:2`` → ``ipv4:a:1,b:2``; anything with a scheme or a single address is left as is."""
    if "," in target and "://" not in target and not target.startswith(("ipv4:", "ipv6:")):
        return "ipv4:" + target
    return target


def channel_credentials(
    *, ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials | None:
    if ca_file is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes(),
        private_key=key_file.read_bytes() if key_file else None,
        certificate_chain=cert_file.read_bytes() if cert_file else None,
    )


def create_channel(
    target: str,
    *,
    timeout_s: float = 30.0,
    max_attempts: int = 3,
    max_message_bytes: int = 4 * 1024 * 1024,
    credentials: grpc.ChannelCredentials | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """An aio channel with a default deadline, UNAVAILABLE-only retries and round-robin balancing."""
    options: list[tuple[str, object]] = [
        ("grpc.service_config", service_config(timeout_s=timeout_s, max_attempts=max_attempts)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
    ]
    target = normalize_target(target)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options, interceptors=list(interceptors))
    return grpc.aio.insecure_channel(target, options=options, interceptors=list(interceptors))
