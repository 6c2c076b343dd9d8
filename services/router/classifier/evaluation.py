"""Out-of-sample evaluation protocols for the classifier: how well it routes prompts from subjects and sources it
never trained on (numpy only; the trainer is passed in as a function).

A protocol is a list of *runs*; a run assigns every record to a fold (``-1``: never scored). For each fold a model
is trained on every record not in that fold and scores the fold. Then, per source family (gsm8k, mmlu, mt_bench),
RouteLLM's metrics are computed either on the out-of-fold scores of all folds together (``pooled``: one number per
run, the usual cross-validation estimate) or on each fold alone (one number per fold and run: each is what a single
trained model does on data it never saw, which is what a held-out benchmark measures).

* ``grouped-kfold``: k folds of whole groups (an MMLU subject is one group, every other prompt its own), ``seeds``
  fold assignments; pooled.
* ``subject-out``: leave one subject out — every ``family/subset`` source with a subset (each MMLU subject, each
  MT-bench category) is a fold of its own; a family without subsets (gsm8k) is split into ``question_folds`` folds
  of questions; pooled.
* ``source-out``: leave one source family out — train without gsm8k, score gsm8k; and so on; pooled.
* ``subject-halves``: the way the held-out benchmark was cut from dev's own sources — every family split in two
  halves (MMLU and MT-bench by subject / category when they have several, gsm8k by question), trained on one half,
  scored on the other, both ways, ``seeds`` times; every half is judged alone.

The baselines that every row is compared to are *length-only* (the token estimate of the prompt: no training) and
*random* scores.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.router.classifier.data import Record
from services.router.classifier.metrics import DEFAULT_NUM_RESULTS, family_metrics

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
IndexArray = npt.NDArray[np.intp]

#: (training rows, test rows) -> scores of the test rows (higher = more likely to need the full tier).
Scorer = Callable[[IndexArray, IndexArray], FloatArray]

GROUPED_KFOLD = "grouped-kfold"
SUBJECT_OUT = "subject-out"
SOURCE_OUT = "source-out"
SUBJECT_HALVES = "subject-halves"
PROTOCOLS = (GROUPED_KFOLD, SUBJECT_OUT, SOURCE_OUT, SUBJECT_HALVES)


@dataclass(frozen=True, slots=True)
class Protocol:
    name: str
    runs: tuple[IntArray, ...]  # fold of every record, per run (-1: not scored)
    pooled: bool  # metrics over all folds' out-of-fold scores together (else each fold alone)
    description: str


def group_of(r: Record) -> str:
    """MMLU: the subject (``source``); everything else: the question itself."""
    return r.source if r.family == "mmlu" else f"q:{r.prompt}"


def group_folds(records: Sequence[Record], k: int, seed: int) -> IntArray:
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
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


def _subsets(records: Sequence[Record]) -> dict[str, list[str]]:
    """Per family, its distinct sources in first-seen order (a family without subsets has one source, itself)."""
    out: dict[str, dict[str, None]] = {}
    for r in records:
        out.setdefault(r.family, {}).setdefault(r.source, None)
    return {fam: list(srcs) for fam, srcs in out.items()}


def subject_out_folds(records: Sequence[Record], question_folds: int = 10, seed: int = 0) -> IntArray:
    """Every source with several subsets in its family is a fold; a family of one source is split by question."""
    subsets = _subsets(records)
    rng = np.random.default_rng(seed)
    folds = np.full(len(records), -1, dtype=np.int64)
    next_fold = 0
    by_source: dict[str, int] = {}
    for fam, srcs in subsets.items():
        if len(srcs) > 1:
            for s in srcs:
                by_source[s] = next_fold
                next_fold += 1
        else:
            idx = np.array([i for i, r in enumerate(records) if r.family == fam], dtype=np.intp)
            folds[idx] = next_fold + rng.permutation(idx.size) % question_folds
            next_fold += question_folds
    for i, r in enumerate(records):
        if r.source in by_source:
            folds[i] = by_source[r.source]
    return folds


def source_out_folds(records: Sequence[Record]) -> IntArray:
    """One fold per source family."""
    fams: dict[str, int] = {}
    return np.array([fams.setdefault(r.family, len(fams)) for r in records], dtype=np.int64)


def halves_folds(records: Sequence[Record], seed: int) -> IntArray:
    """Two folds: a family with several sources split by source (alternately, in a random order), else by question."""
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(records), dtype=np.int64)
    half_of: dict[str, int] = {}
    for fam, srcs in _subsets(records).items():
        if len(srcs) > 1:
            order = [srcs[i] for i in rng.permutation(len(srcs))]
            half_of.update({s: i % 2 for i, s in enumerate(order)})
        else:
            idx = np.array([i for i, r in enumerate(records) if r.family == fam], dtype=np.intp)
            folds[idx] = rng.permutation(idx.size) % 2
    for i, r in enumerate(records):
        if r.source in half_of:
            folds[i] = half_of[r.source]
    return folds


def protocols(
    records: Sequence[Record], *, k: int = 5, seeds: int = 3, halves_seeds: int = 10, question_folds: int = 10
) -> dict[str, Protocol]:
    """The four protocols over ``records`` (see the module docstring)."""
    return {
        GROUPED_KFOLD: Protocol(
            GROUPED_KFOLD,
            tuple(group_folds(records, k, seed=s) for s in range(seeds)),
            pooled=True,
            description=f"{k}-fold group CV (MMLU by subject, others by question), {seeds} fold seeds, pooled",
        ),
        SUBJECT_OUT: Protocol(
            SUBJECT_OUT,
            (subject_out_folds(records, question_folds),),
            pooled=True,
            description=f"leave one subject out (each MMLU subject, each MT-bench category; gsm8k in "
            f"{question_folds} folds of questions), pooled",
        ),
        SOURCE_OUT: Protocol(
            SOURCE_OUT,
            (source_out_folds(records),),
            pooled=True,
            description="leave one source family out (train without gsm8k, score gsm8k; ...)",
        ),
        SUBJECT_HALVES: Protocol(
            SUBJECT_HALVES,
            tuple(halves_folds(records, seed=s) for s in range(halves_seeds)),
            pooled=False,
            description=f"train on half the subjects (MMLU) / categories (MT-bench) / questions (gsm8k), score the "
            f"other half, both ways, {halves_seeds} splits; each half alone",
        ),
    }


def out_of_fold(scorer: Scorer, folds: IntArray) -> FloatArray:
    """Scores of every record from the model trained without its fold (``nan`` for records in no fold)."""
    scores = np.full(folds.size, np.nan)
    for f in np.unique(folds[folds >= 0]):
        te = np.where(folds == f)[0]
        tr = np.where(folds != f)[0]
        scores[te] = scorer(tr, te)
    return scores


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One router under one protocol: per family, the APGR of every evaluation and its margin over length-only."""

    apgr: dict[str, tuple[float, ...]]
    margin: dict[str, tuple[float, ...]]  # APGR - length-only's APGR on the same prompts

    def summary(self, family: str) -> dict[str, float]:
        a, m = self.apgr[family], self.margin[family]
        return {
            "apgr": float(np.mean(a)),
            "apgr_min": float(np.min(a)),
            "apgr_max": float(np.max(a)),
            "margin": float(np.mean(m)),
            "margin_min": float(np.min(m)),
            "evaluations": len(a),
        }


def _family_apgr(
    records: Sequence[Record], scores: FloatArray, idx: IndexArray, num_results: int = DEFAULT_NUM_RESULTS
) -> float:
    return family_metrics(
        records[int(idx[0])].family,
        scores[idx],
        [records[i].quality(full=False) for i in idx],
        [records[i].quality(full=True) for i in idx],
        num_results=num_results,
    ).apgr


def evaluate(
    records: Sequence[Record],
    protocol: Protocol,
    *,
    scorer: Scorer | None = None,
    fixed: Callable[[int], FloatArray] | None = None,
    baseline: FloatArray,
    families: Sequence[str],
) -> Evaluation:
    """APGR per family of a trained ``scorer`` (or of ``fixed`` scores, given the run number) under ``protocol``,
    and its margin over ``baseline`` scores (length-only) on the same prompts."""
    if (scorer is None) == (fixed is None):
        raise ValueError("give a scorer or fixed scores")
    fam = np.array([r.family for r in records])
    apgrs: dict[str, list[float]] = {f: [] for f in families}
    margins: dict[str, list[float]] = {f: [] for f in families}
    for run, folds in enumerate(protocol.runs):
        scores = fixed(run) if fixed is not None else out_of_fold(scorer, folds)  # type: ignore[arg-type]
        parts = [folds >= 0] if protocol.pooled else [folds == f for f in np.unique(folds[folds >= 0])]
        for part in parts:
            for f in families:
                idx = np.where(part & (fam == f))[0]
                if idx.size == 0:
                    continue
                a = _family_apgr(records, scores, idx)
                b = _family_apgr(records, baseline, idx)
                if math.isnan(a) or math.isnan(b):
                    continue
                apgrs[f].append(a)
                margins[f].append(a - b)
    return Evaluation(
        apgr={f: tuple(v) for f, v in apgrs.items() if v},
        margin={f: tuple(v) for f, v in margins.items() if v},
    )
