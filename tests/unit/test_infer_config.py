"""Worker settings: validation of the queue knobs, pass-through of engine settings, the model builder's contract."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from services.infer.app import admission_limits
from services.infer.config import InferSettings
from services.infer.domain import GenerationRequest, GenerationSummary, Message, QueueClass, Sampling
from services.infer.engine import engine_args_kwargs, engine_environment
from services.infer.jobs.runner import decode_result, encode_result
from services.infer.models import tokenizer_corpus


def make(**kw: Any) -> InferSettings:
    return InferSettings(**kw)


def test_defaults_keep_a_reserve_for_interactive_work() -> None:
    s = make()
    assert (s.tier, s.model_path, s.sqlite_file) == ("cheap", Path("var/models/cheap"), Path("var/jobs-cheap.sqlite3"))
    lim = admission_limits(s)
    assert lim.async_slots == s.max_num_seqs - s.interactive_reserve
    assert lim.async_concurrency == lim.async_slots
    assert lim.interactive_slots == s.max_num_seqs
    assert make(tier="full").model_path == Path("var/models/full")


@pytest.mark.parametrize(
    "kw",
    [
        {"interactive_reserve": 64},  # no room left for async work
        {"async_max_concurrency": 60},  # beyond max_num_seqs - reserve
        {"interactive_max_concurrency": 65},
        {"async_priority": 0},  # async must run after interactive
        {"default_max_tokens": 2000},
        {"max_output_tokens": 2048},
        {"tensor_parallel_size": 0},
        {"gpu_memory_utilization": 1.5},
        {"kv_cache_gib": 0},
        {"tier": "medium"},
    ],
)
def test_inconsistent_settings_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        make(**kw)


def test_environment_and_yaml_configure_the_worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "costmesh.yaml"
    cfg.write_text("infer:\n  max_num_seqs: 32\n  interactive_reserve: 4\n", encoding="utf-8")
    monkeypatch.setenv("COSTMESH_CONFIG", str(cfg))
    monkeypatch.setenv("COSTMESH_INFER_TIER", "full")
    monkeypatch.setenv("COSTMESH_INFER_JOB_STORE", "redis")
    monkeypatch.setenv("COSTMESH_INFER_PRICES__TIERS__FULL__INPUT_MICROS_PER_MTOK", "1")
    monkeypatch.setenv("COSTMESH_INFER_PRICES__TIERS__FULL__OUTPUT_MICROS_PER_MTOK", "2")
    monkeypatch.setenv("COSTMESH_INFER_PRICES__TIERS__FULL__CACHED_INPUT_MICROS_PER_MTOK", "3")
    s = make()
    assert (s.tier, s.job_store, s.max_num_seqs, s.interactive_reserve) == ("full", "redis", 32, 4)
    assert s.prices.price_for(tier="full").output_micros_per_mtok == 2


def test_engine_settings_pass_through_to_vllm() -> None:
    s = make(
        model_dir=Path("/models/llama"),
        served_model_name="llama-70b",
        tensor_parallel_size=4,
        gpu_memory_utilization=0.8,
        max_num_seqs=128,
        max_model_len=8192,
        max_output_tokens=4096,
        dtype="float16",
        kv_cache_gib=4,
        block_size=None,
        max_num_batched_tokens=4096,
    )
    kw = engine_args_kwargs(s)
    assert kw["model"] == "/models/llama" and kw["served_model_name"] == ["llama-70b"]
    assert (kw["tensor_parallel_size"], kw["gpu_memory_utilization"]) == (4, 0.8)
    assert (kw["max_num_seqs"], kw["max_model_len"], kw["dtype"]) == (128, 8192, "float16")
    assert kw["scheduling_policy"] == "priority" and kw["enable_prefix_caching"] is True
    assert kw["max_num_batched_tokens"] == 4096
    assert "block_size" not in kw  # vLLM's default
    assert engine_environment(s) == {"VLLM_CPU_KVCACHE_SPACE": "4"}
    assert engine_args_kwargs(make(dtype="float32"))["block_size"] == 32


def test_requests_and_results_round_trip_through_the_job_store_format() -> None:
    from services.common.attribution import Attribution
    from services.common.pricing import TokenUsage
    from services.infer.domain import FinishReason

    req = GenerationRequest(
        request_id="r",
        messages=(Message("system", "s"), Message("user", "u", name="n")),
        sampling=Sampling(max_tokens=5, temperature=0.5, top_p=0.9, stop=("x",), seed=7, ignore_eos=True),
        queue_class=QueueClass.ASYNC,
        attribution=Attribution(tenant="t", team="a", feature="f", end_user="e"),
    )
    assert GenerationRequest.from_json(req.to_json()) == req
    summary = GenerationSummary(TokenUsage(10, 5, 8), FinishReason.STOP, 1.5, 9.0, "m", "cheap")
    assert decode_result(encode_result("hello", summary)) == ("hello", summary)


def test_the_tokenizer_corpus_is_local_and_deterministic() -> None:
    a, b = list(tokenizer_corpus(500)), list(tokenizer_corpus(500))
    assert a == b and len(set(a)) > 300
