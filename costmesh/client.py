"""A small typed client for internal services calling the costmesh router.

    async with RouterClient("127.0.0.1:50051", tenant="acme", team="search", feature="answers") as cm:
        result = await cm.generate("What is the capital of France?", max_tokens=64, temperature=0)
        print(result.text, result.cost_micros, result.tier)

Every call carries a deadline (``timeout_s``) and the attribution both in the request and as gRPC metadata; the
channel retries only UNAVAILABLE. Errors arrive as ``grpc.aio.AioRpcError`` with ``google.rpc.Status`` details
(read them with ``grpc_status.rpc_status.from_call``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Literal

import grpc

from costmesh.common.v1 import common_pb2
from costmesh.router.v1 import router_pb2, router_pb2_grpc

Role = Literal["system", "user", "assistant", "tool"]
_ROLES: dict[str, common_pb2.Role.ValueType] = {
    "system": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
    "tool": common_pb2.ROLE_TOOL,
}
_TIERS: dict[str, common_pb2.Tier.ValueType] = {
    "": common_pb2.TIER_UNSPECIFIED,
    "cheap": common_pb2.TIER_CHEAP,
    "full": common_pb2.TIER_FULL,
}


def _service_config(timeout_s: float) -> str:
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": "costmesh.router.v1.RouterService"}],
                    "timeout": f"{timeout_s:.3f}s",
                    "retryPolicy": {
                        "maxAttempts": 3,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


class RouterClient:
    def __init__(
        self,
        target: str,
        *,
        tenant: str,
        team: str = "",
        feature: str = "",
        end_user: str = "",
        timeout_s: float = 60.0,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        options = [("grpc.service_config", _service_config(timeout_s)), ("grpc.enable_retries", 1)]
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=options)
        )
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self.attribution = common_pb2.Attribution(tenant=tenant, team=team, feature=feature, end_user=end_user)
        self.timeout_s = timeout_s
        md = [("x-costmesh-tenant", tenant)]
        md += [(k, v) for k, v in (("x-costmesh-team", team), ("x-costmesh-feature", feature)) if v]
        if api_key:
            md.append(("authorization", f"Bearer {api_key}"))
        self._metadata = tuple(md)

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    @staticmethod
    def messages(prompt: str | Sequence[tuple[Role, str]], system: str | None = None) -> list[common_pb2.ChatMessage]:
        turns: list[tuple[str, str]] = [("user", prompt)] if isinstance(prompt, str) else list(prompt)
        if system is not None:
            turns.insert(0, ("system", system))
        return [common_pb2.ChatMessage(role=_ROLES[role], content=text) for role, text in turns]

    @staticmethod
    def sampling(
        max_tokens: int = 0, temperature: float | None = None, seed: int | None = None, stop: Sequence[str] = ()
    ) -> common_pb2.SamplingParams:
        s = common_pb2.SamplingParams(max_tokens=max_tokens, stop=list(stop))
        if temperature is not None:
            s.temperature = temperature
        if seed is not None:
            s.seed = seed
        return s

    def _request(
        self,
        prompt: str | Sequence[tuple[Role, str]],
        *,
        system: str | None,
        max_tokens: int,
        temperature: float | None,
        seed: int | None,
        tier: str,
        request_id: str,
        feature: str | None,
    ) -> router_pb2.GenerateRequest:
        attribution = common_pb2.Attribution()
        attribution.CopyFrom(self.attribution)
        if feature is not None:
            attribution.feature = feature
        return router_pb2.GenerateRequest(
            request_id=request_id,
            attribution=attribution,
            messages=self.messages(prompt, system),
            sampling=self.sampling(max_tokens, temperature, seed),
            tier=_TIERS[tier],
        )

    async def generate(
        self,
        prompt: str | Sequence[tuple[Role, str]],
        *,
        system: str | None = None,
        max_tokens: int = 0,
        temperature: float | None = None,
        seed: int | None = None,
        tier: Literal["", "cheap", "full"] = "",
        request_id: str = "",
        feature: str | None = None,
        timeout_s: float | None = None,
    ) -> router_pb2.GenerateResult:
        request = self._request(
            prompt,
            system=system,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            tier=tier,
            request_id=request_id,
            feature=feature,
        )
        reply = await self._stub.Generate(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        return reply.result

    async def stream(
        self,
        prompt: str | Sequence[tuple[Role, str]],
        *,
        system: str | None = None,
        max_tokens: int = 0,
        temperature: float | None = None,
        tier: Literal["", "cheap", "full"] = "",
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
        base = self._request(
            prompt,
            system=system,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=None,
            tier=tier,
            request_id=request_id,
            feature=None,
        )
        request = router_pb2.GenerateStreamRequest()
        request.ParseFromString(base.SerializeToString())  # same fields, same numbers
        call = self._stub.GenerateStream(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        try:
            async for chunk in call:
                yield chunk
        finally:
            call.cancel()  # closing the iterator early cancels the request (the router bills what was generated)

    async def classify(self, prompt: str, *, max_tokens: int = 0) -> router_pb2.RouteDecision:
        request = router_pb2.ClassifyRequest(
            attribution=self.attribution, messages=self.messages(prompt), sampling=self.sampling(max_tokens)
        )
        reply = await self._stub.Classify(request, timeout=self.timeout_s, metadata=self._metadata)
        return reply.decision
