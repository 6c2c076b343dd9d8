"""Cache service benchmark: hit latency and throughput through gRPC, wake-up latency, and the hit rate of a replay.

Runs the real service (``python -m services.cache``) as separate processes on loopback: the in-process LRU store,
and the Redis store against a redis-server this script starts. The client is this process (grpc.aio).

* hit latency p50/p99 and lookups/s at concurrency 1 and 64, per store (every lookup a hit on a filled key);
* wake-up latency of coalesced waiters: from the holder's Fill call to each waiter's HIT, for the embedded store
  (asyncio events) and across two Redis replicas (pub/sub vs polling with backoff);
* the hit rate of a realistic replay (repeated questions re-spaced, re-quoted and re-timestamped, with fresh
  request ids, over three tenants) against the normalized key, versus a raw hash of the same requests, versus the
  oracle (every repeat of a question a hit); and the number of false hits (a hit that returned another question's
  answer), which must be 0.

    .venv/bin/python bench/cache.py [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import grpc
from blake3 import blake3
from grpc_health.v1 import health_pb2, health_pb2_grpc

from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.common.v1 import common_pb2
from services.common.health import wait_serving

HIT = cache_pb2.LOOKUP_OUTCOME_HIT
MISS = cache_pb2.LOOKUP_OUTCOME_MISS
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    data = tempfile.mkdtemp(prefix="costmesh-bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", data, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(data, ignore_errors=True)


@contextlib.asynccontextmanager
async def cache_server(store: str, redis_url: str = "", wake: str = "pubsub") -> AsyncIterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "COSTMESH_CACHE_PORT": str(port),
        "COSTMESH_CACHE_METRICS_PORT": str(free_port()),
        "COSTMESH_CACHE_LOG_LEVEL": "warning",
        "COSTMESH_CACHE_STORE": store,
        "COSTMESH_CACHE_REDIS_WAKE": wake,
        "COSTMESH_CACHE_MEMORY_MAX_BYTES": str(512 * 1024 * 1024),
    }
    env.pop("COSTMESH_CONFIG", None)
    if redis_url:
        env["COSTMESH_CACHE_REDIS_URL"] = redis_url
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "services.cache", cwd=ROOT, env=env)
    target = f"127.0.0.1:{port}"
    try:
        await wait_serving(target, timeout_s=30)
        yield target
    finally:
        proc.terminate()
        await proc.wait()


@contextlib.asynccontextmanager
async def stub_for(target: str) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield cache_pb2_grpc.CacheServiceStub(channel)


# -- requests ----------------------------------------------------------------------------------------------------


def lookup(tenant: str, system: str, user: str, *, wait_ms: int = 0) -> cache_pb2.LookupRequest:
    return cache_pb2.LookupRequest(
        attribution=common_pb2.Attribution(tenant=tenant, feature="support"),
        model="cheap",
        messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=system),
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=user),
        ],
        sampling=common_pb2.SamplingParams(max_tokens=256, temperature=0.0),
        wait_ms=wait_ms,
    )


def fill(result: cache_pb2.LookupResponse, tenant: str, text: str, cost_micros: int = 300) -> cache_pb2.FillRequest:
    return cache_pb2.FillRequest(
        attribution=common_pb2.Attribution(tenant=tenant, feature="support"),
        key=result.lease.key,
        lease_id=result.lease.lease_id,
        response=cache_pb2.CachedResponse(
            text=text,
            usage=common_pb2.Usage(input_tokens=120, output_tokens=180),
            cost_micros=cost_micros,
            model="cheap",
            tier=common_pb2.TIER_CHEAP,
            finish_reason=common_pb2.FINISH_REASON_STOP,
        ),
    )


SYSTEM = (
    "You are the support assistant of Acme Cloud. Answer in at most three sentences, cite the documentation page "
    "when you can, and never invent features. Current time: 2024-05-01T12:03:11Z."
)
QUESTION = "How do I rotate the API key of a service account without downtime?"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- hit latency -------------------------------------------------------------------------------------------------


@dataclass
class LatencyResult:
    store: str
    request: str
    concurrency: int
    lookups: int
    seconds: float
    lookups_per_s: float
    p50_ms: float
    p99_ms: float
    all_hits: bool


async def prefill(stub: Any, request: cache_pb2.LookupRequest) -> cache_pb2.LookupRequest:
    first = await stub.Lookup(request)
    if first.outcome == MISS:
        await stub.Fill(fill(first, "acme", "Create a second key, roll it out, then revoke the first. " * 8))
    assert (await stub.Lookup(request)).outcome == HIT
    return request


def restamped(rng: random.Random) -> cache_pb2.LookupRequest:
    """The prefilled question, re-sent later: a new timestamp, a new request id, different spacing."""
    when = datetime(2024, 5, 1, 12, 3, 11, tzinfo=UTC) + timedelta(seconds=rng.randrange(10**7))
    system = SYSTEM.replace("2024-05-01T12:03:11Z", when.isoformat(timespec="milliseconds"))
    return lookup("acme", f"{system} Request-Id: {uuid.UUID(int=rng.getrandbits(128))}", respace(QUESTION, rng))


async def hit_latency(store: str, target: str, concurrency: int, seconds: float, rounds: int) -> list[LatencyResult]:
    """Every lookup must hit. Kinds: 'health' (the gRPC floor: Health.Check on the same server and channel),
    'same' (one request repeated) and 'restamped' (a fresh timestamp, request id and spacing every time).

    The kinds run interleaved in ``rounds`` slices of ``seconds / rounds`` each, so that load from other processes
    on this shared machine falls on all of them alike."""
    rng = random.Random(1)
    kinds = ("health", "same", "restamped")
    requests = {
        "health": [lookup("acme", SYSTEM, QUESTION)],
        "same": [lookup("acme", SYSTEM, QUESTION)],
        "restamped": [restamped(rng) for _ in range(20_000)],
    }
    latencies: dict[str, list[float]] = {k: [] for k in kinds}
    elapsed = dict.fromkeys(kinds, 0.0)
    outcomes_ok = True
    async with grpc.aio.insecure_channel(target) as channel:
        stub: Any = cache_pb2_grpc.CacheServiceStub(channel)
        health: Any = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest()
        await prefill(stub, requests["same"][0])
        await prefill(stub, requests["restamped"][0])
        for i in range(300):  # warm up both sides
            await stub.Lookup(requests["restamped"][i])
            await health.Check(check)
        counter = iter(range(10**9))
        for _ in range(rounds):
            for kind in kinds:
                stop_at = time.perf_counter() + seconds / rounds
                pool = requests[kind]
                sink = latencies[kind]

                async def worker() -> None:
                    nonlocal outcomes_ok
                    while time.perf_counter() < stop_at:  # noqa: B023 - awaited within the slice
                        request = pool[next(counter) % len(pool)]  # noqa: B023
                        t0 = time.perf_counter()
                        if kind == "health":  # noqa: B023
                            await health.Check(check)
                        else:
                            result = await stub.Lookup(request)
                            outcomes_ok &= result.outcome == HIT
                        sink.append(time.perf_counter() - t0)  # noqa: B023

                started = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                elapsed[kind] += time.perf_counter() - started
    return [
        LatencyResult(
            store=store,
            request=kind,
            concurrency=concurrency,
            lookups=len(latencies[kind]),
            seconds=round(elapsed[kind], 3),
            lookups_per_s=round(len(latencies[kind]) / elapsed[kind]),
            p50_ms=round(percentile(latencies[kind], 0.50) * 1000, 3),
            p99_ms=round(percentile(latencies[kind], 0.99) * 1000, 3),
            all_hits=outcomes_ok,
        )
        for kind in kinds
    ]


# -- in-process (no gRPC) -------------------------------------------------------------------------------------------


async def in_process(store_name: str, redis_url: str, seconds: float) -> list[LatencyResult]:
    """The domain alone: servicer translation + ResponseCache.lookup + store, without gRPC, one caller."""
    from services.cache.memory_store import MemoryStore
    from services.cache.namespaces import Namespaces
    from services.cache.redis_store import RedisStore
    from services.cache.server import CacheServicer
    from services.cache.singleflight import ResponseCache
    from services.cache.store import CacheStore

    class Context:
        def invocation_metadata(self) -> tuple[()]:
            return ()

    store: CacheStore = (
        MemoryStore(max_bytes=1 << 28) if store_name == "memory" else RedisStore.from_url(redis_url, prefix="inproc")
    )
    await store.start()
    servicer = CacheServicer(cache=ResponseCache(store=store, namespaces=Namespaces()))
    ctx: Any = Context()
    rng = random.Random(2)
    results = []
    for kind, requests in (
        ("same", [lookup("acme", SYSTEM, QUESTION)]),
        ("restamped", [restamped(rng) for _ in range(20_000)]),
    ):
        first = await servicer.Lookup(requests[0], ctx)
        if first.outcome == MISS:
            await servicer.Fill(fill(first, "acme", "answer " * 60), ctx)
        latencies: list[float] = []
        ok = True
        stop_at = time.perf_counter() + seconds
        i = 0
        started = time.perf_counter()
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            result = await servicer.Lookup(requests[i % len(requests)], ctx)
            latencies.append(time.perf_counter() - t0)
            ok &= result.outcome == HIT
            i += 1
        elapsed = time.perf_counter() - started
        results.append(
            LatencyResult(
                store=f"{store_name} (in-process, no gRPC)",
                request=kind,
                concurrency=1,
                lookups=len(latencies),
                seconds=round(elapsed, 3),
                lookups_per_s=round(len(latencies) / elapsed),
                p50_ms=round(percentile(latencies, 0.50) * 1000, 3),
                p99_ms=round(percentile(latencies, 0.99) * 1000, 3),
                all_hits=ok,
            )
        )
    await store.close()
    return results


# -- wake-up latency ---------------------------------------------------------------------------------------------


@dataclass
class WakeResult:
    mode: str
    rounds: int
    waiters_per_round: int
    coalesced: int
    p50_ms: float
    p99_ms: float
    max_ms: float


async def wake_latency(mode: str, holder_target: str, waiter_target: str, rounds: int, waiters: int) -> WakeResult:
    """Holder takes the lease on one replica, waiters wait on another (or the same); then the holder fills."""
    samples: list[float] = []
    coalesced = 0
    async with stub_for(holder_target) as holder, stub_for(waiter_target) as waiting:
        await holder.GetStats(cache_pb2.GetStatsRequest(tenant="warm"))
        await waiting.GetStats(cache_pb2.GetStatsRequest(tenant="warm"))
        for r in range(rounds):
            request = lookup("acme", SYSTEM, f"{QUESTION} (round {r} of {mode})", wait_ms=10_000)
            lease = await holder.Lookup(request)
            assert lease.outcome == MISS
            done: list[float] = []

            async def wait_one() -> cache_pb2.LookupResponse:
                result = await waiting.Lookup(request)  # noqa: B023 - awaited within the round
                done.append(time.perf_counter())  # noqa: B023
                return result

            tasks = [asyncio.ensure_future(wait_one()) for _ in range(waiters)]
            await asyncio.sleep(0.08)  # every waiter is parked on the lease
            t0 = time.perf_counter()
            await holder.Fill(fill(lease, "acme", "answer"))
            results = await asyncio.gather(*tasks)
            coalesced += sum(1 for x in results if x.outcome == HIT and x.coalesced)
            samples.extend(t - t0 for t in done)
    return WakeResult(
        mode=mode,
        rounds=rounds,
        waiters_per_round=waiters,
        coalesced=coalesced,
        p50_ms=round(percentile(samples, 0.5) * 1000, 2),
        p99_ms=round(percentile(samples, 0.99) * 1000, 2),
        max_ms=round(max(samples) * 1000, 2),
    )


# -- replay hit rate ---------------------------------------------------------------------------------------------

ACTIONS = [
    "rotate an API key",
    "invite a teammate",
    "export my billing history",
    "enable two-factor authentication",
    "change the region of a bucket",
    "set up a webhook for failed payments",
    "restore a deleted project",
    "raise my rate limit",
    "connect a custom domain",
    "downgrade my plan",
]
NAMES = ["Alice", "Alicia", "Bob", "Priya", "Chen", "Joan", "John"]
AMOUNTS = [100, 1000, 250, 2500]


def base_questions() -> list[str]:
    questions = [f"How do I {a} in the dashboard?" for a in ACTIONS]
    questions += [f"Is it safe to {a} while traffic is live?" for a in ACTIONS[:5]]
    questions += [f"Is it not safe to {a} while traffic is live?" for a in ACTIONS[:5]]
    questions += [f"Write a short thank-you note to {n} for fixing the outage." for n in NAMES]
    questions += [f"Convert {n} USD to EUR at today's list rate and explain the fee." for n in AMOUNTS]
    questions += [
        "Summarize this ticket: customer says the app crashes on login since the last update; logs show a null "
        "pointer in the session refresh.",
        "Summarize this ticket: invoice #4411 was charged twice; customer wants one charge refunded.",
        "Classify the sentiment of: 'the new editor is fast but the export button is hard to find'.",
        "Classify the sentiment of: 'the new editor is slow and the export button is hard to find'.",
    ]
    return questions


def respace(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    out = []
    for w in words:
        out.append(w)
        out.append(rng.choice([" ", " ", " ", "  ", "\n", " \t"]))
    text = "".join(out[:-1])
    if rng.random() < 0.4:
        text = rng.choice(["  ", "\n", " "]) + text + rng.choice(["\n", "  ", " \n"])
    return text


def requote(text: str, rng: random.Random) -> str:
    if rng.random() < 0.5:
        text = text.replace("'", "\u2019")
    if rng.random() < 0.3:
        text = text.replace(" - ", " \u2014 ")
    return text


def stamp(tenant: str, when: datetime, rng: random.Random) -> str:
    """The system prompt as a gateway client builds it: a fixed instruction plus volatile fields."""
    style = {"acme": 0, "globex": 1, "initech": 2}[tenant]
    head = f"You are the support assistant of {tenant}. Answer in at most three sentences."
    if style == 0:
        return f"{head} Current time: {when.isoformat(timespec='milliseconds')}. Request-Id: {uuid.uuid4()}"
    if style == 1:
        return f"{head}\nDate: {format_datetime(when, usegmt=True)}\ntrace={uuid.uuid4().hex}"
    return f"{head} (ts={int(when.timestamp())}, session {rng.getrandbits(96):024x})"


@dataclass
class ReplayRequest:
    tenant: str
    question_id: int
    system: str
    user: str


def replay_workload(n: int, *, volatile: bool, seed: int = 7) -> list[ReplayRequest]:
    """n requests over three tenants; questions drawn Zipf-like, half of them re-spaced, some re-quoted. With
    ``volatile`` the system prompt also carries a fresh timestamp and request id (as many gateway clients stamp
    them); without, it is fixed per tenant."""
    rng = random.Random(seed)
    questions = base_questions()
    weights = [1 / (i + 1) ** 1.1 for i in range(len(questions))]  # Zipf-like popularity
    tenants = ["acme", "globex", "initech"]
    when = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
    workload = []
    for _ in range(n):
        when += timedelta(seconds=rng.uniform(0.5, 20))
        tenant = rng.choices(tenants, weights=[5, 3, 2])[0]
        qid = rng.choices(range(len(questions)), weights=weights)[0]
        user = questions[qid]
        if rng.random() < 0.5:
            user = respace(user, rng)
        user = requote(user, rng)
        system = stamp(tenant, when, rng) if volatile else f"You are the support assistant of {tenant}. Be brief."
        workload.append(ReplayRequest(tenant, qid, system, user))
    return workload


def raw_key(r: ReplayRequest) -> str:
    """What a gateway keys on when it hashes the request as it arrives."""
    material = [r.tenant, "cheap", [256, 0.0], [["system", r.system], ["user", r.user]]]
    return blake3(json.dumps(material, ensure_ascii=False).encode()).hexdigest()


@dataclass
class ReplayResult:
    workload: str
    requests: int
    distinct_questions: int
    oracle_hit_rate: float
    normalized_hit_rate: float
    raw_hash_hit_rate: float
    false_hits: int
    saved_micros: int
    examples: list[str] = field(default_factory=list)


async def replay(target: str, n: int, *, volatile: bool) -> ReplayResult:
    workload = replay_workload(n, volatile=volatile)
    seen_raw: set[str] = set()
    seen_questions: set[tuple[str, int]] = set()
    raw_hits = oracle_hits = hits = false_hits = saved = 0
    async with stub_for(target) as stub:
        for r in workload:
            oracle_hits += (r.tenant, r.question_id) in seen_questions
            seen_questions.add((r.tenant, r.question_id))
            key = raw_key(r)
            raw_hits += key in seen_raw
            seen_raw.add(key)
            result = await stub.Lookup(lookup(r.tenant, r.system, r.user))
            expected = f"answer to question {r.question_id} for {r.tenant}"
            if result.outcome == HIT:
                hits += 1
                saved += result.response.cost_micros
                false_hits += result.response.text != expected
            elif result.outcome == MISS:
                await stub.Fill(fill(result, r.tenant, expected))
    return ReplayResult(
        workload="re-spaced, re-quoted and re-stamped" if volatile else "re-spaced and re-quoted, fixed system prompt",
        requests=n,
        distinct_questions=len(seen_questions),
        oracle_hit_rate=round(oracle_hits / n, 4),
        normalized_hit_rate=round(hits / n, 4),
        raw_hash_hit_rate=round(raw_hits / n, 4),
        false_hits=false_hits,
        saved_micros=saved,
        examples=[repr(w.system + " | " + w.user) for w in workload[:3]],
    )


# -- main --------------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load_at_start = os.getloadavg()
    seconds = 1.5 if args.quick else args.seconds
    rounds = 8 if args.quick else 30
    latency: list[LatencyResult] = []
    wake: list[WakeResult] = []
    with redis_server() as redis_url:
        for store in ("memory", "redis"):
            async with cache_server(store, redis_url) as target:
                for concurrency in (1, 64):
                    for result in await hit_latency(store, target, concurrency, 3 * seconds, 3 if args.quick else 10):
                        latency.append(result)
                        print(
                            f"  {store:<6} {result.request:<9} c={concurrency:<2}: {result.p50_ms:7.3f} / "
                            f"{result.p99_ms:7.3f} ms {result.lookups_per_s:>6}/s",
                            file=sys.stderr,
                        )
        for store in ("memory", "redis"):
            latency.extend(await in_process(store, redis_url, seconds / 2))
        async with cache_server("memory") as target:
            wake.append(await wake_latency("memory (asyncio events)", target, target, rounds, 8))
            replayed = [await replay(target, 600 if args.quick else args.replay, volatile=True)]
        async with cache_server("memory") as target:
            replayed.append(await replay(target, 600 if args.quick else args.replay, volatile=False))
        for mode in ("pubsub", "poll"):
            async with cache_server("redis", redis_url, mode) as a, cache_server("redis", redis_url, mode) as b:
                wake.append(await wake_latency(f"redis {mode}, 2 replicas", a, b, rounds, 8))
    return {
        "benchmark": "cache",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": args.machine,
            "load_average_1m_start_end": [round(load_at_start[0], 2), round(os.getloadavg()[0], 2)],
        },
        "hit_latency": [asdict(x) for x in latency],
        "wake_latency": [asdict(x) for x in wake],
        "replay": [asdict(r) for r in replayed],
        "targets": {"hit_p50_ms_c1": 0.5, "hit_p99_ms_c1": 2.0, "lookups_per_s_c64": 4000},
    }


def print_tables(report: dict[str, Any]) -> None:
    start, end = report["machine"]["load_average_1m_start_end"]
    print(f"\n{report['machine']['cpus']} CPUs; 1-minute load average {start} at the start, {end} at the end")
    print("\nHit latency through gRPC (client and server on this machine)")
    print("(request: health = Health.Check, the gRPC floor; same = one request repeated; restamped = a fresh")
    print(" timestamp, request id and spacing every time, so nothing is memoized)")
    print(
        f"{'store':<30} {'request':<10} {'conc':>5} {'calls':>8} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8}  all hits"
    )
    for r in report["hit_latency"]:
        print(
            f"{r['store']:<30} {r['request']:<10} {r['concurrency']:>5} {r['lookups']:>8} {r['lookups_per_s']:>9} "
            f"{r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f}  {r['all_hits']}"
        )
    print("\nWake-up of coalesced waiters (from the holder's Fill call to each waiter's HIT)")
    print(f"{'mode':<28} {'rounds':>6} {'waiters':>7} {'coalesced':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for w in report["wake_latency"]:
        print(
            f"{w['mode']:<28} {w['rounds']:>6} {w['waiters_per_round']:>7} {w['coalesced']:>9} "
            f"{w['p50_ms']:>8.2f} {w['p99_ms']:>8.2f} {w['max_ms']:>8.2f}"
        )
    for r in report["replay"]:
        print(f"\nReplay ({r['workload']}): {r['requests']} requests, {r['distinct_questions']} distinct questions")
        print(f"{'key':<34} {'hit rate':>9}")
        print(f"{'oracle (every repeat a hit)':<34} {r['oracle_hit_rate']:>9.1%}")
        print(f"{'normalized key (this service)':<34} {r['normalized_hit_rate']:>9.1%}")
        print(f"{'raw hash of the request':<34} {r['raw_hash_hit_rate']:>9.1%}")
        print(f"false hits (wrong answer served): {r['false_hits']}; saved: {r['saved_micros']} micro-USD")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each latency run")
    parser.add_argument("--replay", type=int, default=3000, help="requests in the replay")
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--machine", default="", help="free-text description of the machine for the JSON")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    print_tables(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
