"""Client side of the standard gRPC health service, for the CLI, the supervisor and tests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


async def check(channel: grpc.aio.Channel, *, service: str = "", timeout_s: float = 2.0) -> str:
    """``SERVING``, ``NOT_SERVING``, ``SERVICE_UNKNOWN`` … or ``DOWN (<code>)`` when the call fails."""
    stub: Any = health_pb2_grpc.HealthStub(channel)  # the published stubs omit the generated methods
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.aio.AioRpcError as err:
        return f"DOWN ({err.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def check_target(target: str, *, service: str = "", timeout_s: float = 2.0) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        return await check(channel, service=service, timeout_s=timeout_s)


async def wait_serving(target: str, *, service: str = "", timeout_s: float = 60.0) -> None:
    """Wait until ``target`` reports SERVING, or raise ``TimeoutError`` with the last status seen."""
    deadline = time.monotonic() + timeout_s
    status = "never answered"
    async with grpc.aio.insecure_channel(target) as channel:
        while time.monotonic() < deadline:
            status = await check(channel, service=service, timeout_s=1.0)
            if status == "SERVING":
                return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{target} not SERVING after {timeout_s:.0f}s (last: {status})")
