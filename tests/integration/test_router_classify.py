"""The Classify RPC on a real loopback router: the committed classifier, the routing policy from settings, and
rich errors. Classify touches no other service, so the router's cache, budget and worker channels point nowhere."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from costmesh.common.v1 import common_pb2
from costmesh.router.v1 import router_pb2, router_pb2_grpc
from services.common.channels import create_channel
from services.common.pricing import PriceTable
from services.common.server import ServiceHost, full_service_name
from services.router.classifier.settings import FeatureRuleSettings, RoutingSettings
from services.router.classifier.types import Tier
from services.router.clients import GrpcBudget, GrpcCache, GrpcInfer
from services.router.config import RouterSettings
from services.router.decider import build_decider
from services.router.pipeline import Pipeline
from services.router.server import RouterServicer
from services.router.tokens import TierTokenizers

NOWHERE = "127.0.0.1:1"
HARD = (
    "A train leaves at 3 pm at 60 mph; two hours later a second train leaves at 80 mph. Each stops for 20 minutes "
    "every 100 miles, and then the first train slows by 25%. How many miles from the station does the second "
    "train catch up, and at what time? Explain each step and justify the answer. " * 3
)


@asynccontextmanager
async def router(routing: RoutingSettings) -> AsyncIterator[Any]:
    settings = RouterSettings(host="127.0.0.1", port=0, metrics_port=None, grace_period_s=0.2, routing=routing)
    host = ServiceHost(name="router", settings=settings)
    nowhere = create_channel(NOWHERE, timeout_s=0.5, max_attempts=1)
    pipeline = Pipeline(
        decider=build_decider(settings),
        cache=GrpcCache(nowhere, timeout_s=0.5, wait_ms=0),
        budget=GrpcBudget(nowhere, timeout_s=0.5, ttl_s=60),
        infer=GrpcInfer({Tier.CHEAP: nowhere, Tier.FULL: nowhere}, timeout_s=0.5),
        tokens=TierTokenizers({}),
        prices=PriceTable(),
        models={Tier.CHEAP: "cheap", Tier.FULL: "full"},
    )
    servicer = RouterServicer(pipeline=pipeline)
    host.add_service(
        full_service_name(router_pb2, "RouterService"),
        lambda server: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server),
    )
    port = await host.start()
    await host.set_serving(True)
    try:
        async with create_channel(f"127.0.0.1:{port}", timeout_s=10.0, max_attempts=1) as channel:
            yield router_pb2_grpc.RouterServiceStub(channel)
    finally:
        await host.stop()
        await nowhere.close()


def request(text: str, tenant: str = "t1", feature: str = "", max_tokens: int = 0) -> router_pb2.ClassifyRequest:
    return router_pb2.ClassifyRequest(
        attribution=common_pb2.Attribution(tenant=tenant, feature=feature),
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
    )


async def test_classify_scores_explains_and_routes() -> None:
    async with router(RoutingSettings()) as stub:
        easy = (await stub.Classify(request("What is the capital of France?"))).decision
        hard = (await stub.Classify(request(HARD))).decision
    assert easy.tier == common_pb2.TIER_CHEAP == easy.classifier_tier
    assert 0.0 <= easy.score < easy.threshold and easy.policy == "" and not easy.uncertain
    assert hard.score > easy.score
    assert hard.threshold == pytest.approx(easy.threshold)
    assert "multi_step" in hard.reasons or "numbers" in hard.reasons


async def test_feature_pin_and_tenant_share_from_settings_with_attribution_from_metadata() -> None:
    routing = RoutingSettings(
        tenant_cheap_share={"thrifty": 1.0, "strict": 0.02},
        features={"legal": FeatureRuleSettings(pin="full"), "thrifty/bulk": FeatureRuleSettings(max_tier="cheap")},
    )
    async with router(routing) as stub:
        pinned = (
            await stub.Classify(
                request("What is 2 + 2?", tenant=""),
                metadata=[("x-costmesh-tenant", "t1"), ("x-costmesh-feature", "legal")],
            )
        ).decision
        thrifty = (await stub.Classify(request(HARD, tenant="thrifty"))).decision
        strict = (await stub.Classify(request(HARD, tenant="strict"))).decision
    assert (pinned.tier, pinned.classifier_tier, pinned.policy) == (
        common_pb2.TIER_FULL,
        common_pb2.TIER_CHEAP,
        "feature_pin",
    )
    assert thrifty.tier == common_pb2.TIER_CHEAP and thrifty.policy == ""  # a 100 % cheap-share target
    assert strict.tier == common_pb2.TIER_FULL and strict.threshold < thrifty.threshold


async def test_bad_request_is_invalid_argument_with_field_violations() -> None:
    async with router(RoutingSettings()) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Classify(router_pb2.ClassifyRequest(attribution=common_pb2.Attribution(tenant="t1")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err.value)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    assert any(f.startswith("messages") for f in fields)
